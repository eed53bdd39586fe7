"""The record layer: AEAD records under a keyed session, plain records, and the replay window.

Modes (first byte): 0 open a record under a keyed channel, 1 open a plain
record, 2 seal the rest under fixed keys and open it again (must round-trip),
3 drive a replay window with counters and compare it with a model.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

from vna_agent.dataplane.errors import RecordError, ReplayedRecord
from vna_agent.dataplane.plain import PlainChannel
from vna_agent.dataplane.record import ReplayWindow
from vna_agent.dataplane.wire import MAX_RECORD

from ._dataplane import keyed_pair
from ._input import Reader

MAX_LEN = 4096
_WINDOW = 64  # a small window so the fuzzer reaches both of its edges


def _open_secure(record: bytes) -> None:
    _, rx = keyed_pair()
    try:
        payload, _ = rx.open(memoryview(record))
    except RecordError:
        return
    assert len(payload) == len(record) - 32


def _open_plain(record: bytes) -> None:
    try:
        payload, _ = PlainChannel().open(memoryview(record))
    except RecordError:
        return
    assert len(payload) == len(record) - 16


def _round_trip(r: Reader) -> None:
    flags = r.byte()
    payload = r.rest()
    tx, rx = keyed_pair()
    out = memoryview(bytearray(MAX_RECORD))
    n = tx.seal_into(payload, flags, out)
    got, got_flags = rx.open(out[:n])
    assert bytes(got) == payload and got_flags == flags


def _window(r: Reader) -> None:
    w = ReplayWindow(_WINDOW)
    seen: set[int] = set()
    top = -1
    for raw in iter(lambda: r.take(3), b""):
        op, counter = raw[0] & 1, int.from_bytes(raw[1:], "big") >> 4
        fresh = counter not in seen and counter > top - _WINDOW
        try:
            w.check(counter) if op else w.accept(counter)
            assert fresh, counter
        except ReplayedRecord:
            assert not fresh, counter
            continue
        if not op:
            seen.add(counter)
            top = max(top, counter)
        with contextlib.suppress(ReplayedRecord):
            w.check_low32(counter & 0xFFFFFFFF)


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte() % 4
    if mode == 0:
        _open_secure(r.rest())
    elif mode == 1:
        _open_plain(r.rest())
    elif mode == 2:
        _round_trip(r)
    else:
        _window(r)


def seeds() -> Iterator[bytes]:
    """Records sealed by the implementation (secure and plain), a window run."""
    tx, _ = keyed_pair()
    out = memoryview(bytearray(MAX_RECORD))
    for payload in (b"", b"\x00" * 60, bytes(range(256)) * 4):
        n = tx.seal_into(payload, 1, out)
        yield b"\x00" + bytes(out[:n])
        n = PlainChannel().seal_into(payload, 2, out)
        yield b"\x01" + bytes(out[:n])
    yield b"\x02\x01" + b"frame" * 20
    yield b"\x03" + b"".join(struct.pack("!BH", op, c << 4 & 0xFFFF) for op, c in ((0, 5), (0, 3), (1, 5), (0, 900)))
