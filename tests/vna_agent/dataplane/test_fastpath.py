"""The native fast path (``_fastpath.Pump``) against the Python record layer: same wire, same checks.

The pump's "TAP" is one end of a SOCK_SEQPACKET pair (one frame per read, like a TAP);
its link is a stream socketpair or a real UDP socket on loopback. The other side of
every exchange is the Python implementation (:mod:`vna_agent.dataplane.record`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vna_agent.dataplane import fastpath
from vna_agent.dataplane import handshake as hs
from vna_agent.dataplane.keys import StaticKeyPair
from vna_agent.dataplane.record import RecordSession
from vna_agent.dataplane.wire import FLAG_BUNDLE, MAX_RECORD, PIECE_HEADER, RECORD_HEADER, STREAM_LEN, MsgType

needs_native = pytest.mark.skipif(not fastpath.available(), reason="the native fast path is not built")

if fastpath.available():
    from vna_agent.dataplane import _fastpath  # type: ignore[attr-defined]


def test_the_fast_path_is_built_where_the_toolchain_is() -> None:
    """A machine with a compiler and the headers must not silently fall back to the Python data path."""
    headers = (Path("/usr/include/openssl/evp.h"), Path(sysconfig.get_paths()["include"]) / "Python.h")
    if not shutil.which("cc") or not all(h.exists() for h in headers):
        pytest.skip("no C toolchain or headers here: the Python data path is expected")
    assert fastpath._fastpath is not None, "setup.py did not build vna_agent/dataplane/_fastpath.c"


def _sessions(a: int = 11, b: int = 22) -> tuple[RecordSession, RecordSession]:
    """A keyed pair: (the pump's session, the Python peer's session)."""
    ini, resp = StaticKeyPair.generate(), StaticKeyPair.generate()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=a, timestamp=hs.tai64n(1))
    reply, rkeys = hs.create_response(hs.consume_initiation(resp, msg), sender_index=b)
    return RecordSession(hs.consume_response(state, reply)), RecordSession(rkeys)


def _row(s: RecordSession, kind: int = 0) -> tuple[Any, ...]:
    return s.fastpath_row(kind)


def _seal(s: RecordSession, payload: bytes, flags: int = 0) -> bytes:
    out = bytearray(MAX_RECORD)
    return bytes(out[: s.seal_into(payload, flags, memoryview(out))])


def _open(s: RecordSession, rec: bytes) -> tuple[bytes, int]:
    _, flags, _, _, counter = RECORD_HEADER.unpack_from(rec)
    return bytes(s.open(counter, memoryview(rec))), flags


def _initiation_to(node: StaticKeyPair, index: int = 77) -> bytes:
    """A genuine initiation addressed to ``node`` (its mac1 is keyed by node's public key)."""
    msg, _ = hs.create_initiation(StaticKeyPair.generate(), node.public, sender_index=index, timestamp=hs.tai64n(1))
    return msg


def _response_to(node: StaticKeyPair, index: int = 88) -> bytes:
    """A genuine response to an initiation ``node`` sent."""
    other = StaticKeyPair.generate()
    msg, _ = hs.create_initiation(node, other.public, sender_index=5, timestamp=hs.tai64n(1))
    reply, _ = hs.create_response(hs.consume_initiation(other, msg), sender_index=index)
    return reply


def _wait(pred: Callable[[], Any], timeout: float = 3.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := pred():
            return value
        time.sleep(0.005)
    raise AssertionError("timed out")


class Rig:
    """A pump between a frame socket (``tap``) and a link socket (``peer``)."""

    def __init__(self, *, stream: bool = True, chunk: int = 0, vnet: bool = False, **pump_options: Any) -> None:
        self.tap_pump, self.tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if stream:
            self.link_pump, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.link_pump = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.link_pump.bind(("127.0.0.1", 0))
            self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.peer.bind(("127.0.0.1", 0))
        for s in (self.tap_pump, self.link_pump):
            s.setblocking(False)
        self.tap.settimeout(3)
        self.peer.settimeout(3)
        self.native, self.python = _sessions()
        self.pump: Any = _fastpath.Pump(
            self.tap_pump.fileno(), self.link_pump.fileno(), stream, vnet, 32768, chunk, **pump_options
        )
        self.identity = StaticKeyPair.generate()  # the pump's node: handshakes must be addressed to it
        self.pump.set_static(self.identity.public.raw)
        self.pump.set_sessions([_row(self.native)])
        if not stream:
            self.pump.set_peer(*self.peer.getsockname())
        self._buf = b""

    def close(self) -> None:
        self.pump.stop()
        for s in (self.tap_pump, self.tap, self.link_pump, self.peer):
            s.close()

    def send_record(self, rec: bytes) -> None:
        self.peer.sendall(STREAM_LEN.pack(len(rec)) + rec)

    def recv_message(self) -> bytes:
        while True:
            if len(self._buf) >= 4:
                (n,) = STREAM_LEN.unpack_from(self._buf)
                if len(self._buf) >= 4 + n:
                    msg, self._buf = self._buf[4 : 4 + n], self._buf[4 + n :]
                    return msg
            self._buf += self.peer.recv(1 << 20)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _frames_of(payload: bytes, flags: int) -> list[bytes]:
    if not flags & FLAG_BUNDLE:
        return [payload]
    out, pos = [], 0
    while pos < len(payload):
        (n,) = struct.unpack_from("!H", payload, pos)
        out.append(payload[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


@needs_native
def test_frames_sealed_natively_open_in_python_bundled_as_queued(rig: Rig) -> None:
    small = [os.urandom(n) for n in (60, 1514, 9000)]
    big = os.urandom(60000)
    for f in (*small, big):
        rig.tap.send(f)
    rig.pump.start()  # one drain finds all four queued: the small ones share a record
    bundle, flags = _open(rig.python, rig.recv_message())
    assert flags & FLAG_BUNDLE and _frames_of(bundle, flags) == small
    alone, flags = _open(rig.python, rig.recv_message())
    assert alone == big and not flags & FLAG_BUNDLE
    st = rig.pump.stats()
    assert (st["records_out"], st["frames_out"], st["bytes_out"]) == (2, 4, sum(map(len, small)) + len(big))


@needs_native
def test_records_sealed_in_python_open_natively(rig: Rig) -> None:
    rig.pump.start()
    frames = [os.urandom(n) for n in (42, 1500, 65000)]
    bundle = b"".join(struct.pack("!H", len(f)) + f for f in frames[:2])
    rig.send_record(_seal(rig.python, bundle, FLAG_BUNDLE))
    rig.send_record(_seal(rig.python, frames[2]))
    rig.send_record(_seal(rig.python, b""))  # keepalive
    assert [rig.tap.recv(1 << 17) for _ in frames] == frames
    st = _wait(lambda: (s := rig.pump.stats())["keepalives_in"] == 1 and s)
    assert (st["records_in"], st["frames_in"], st["drops"]["bad_tag"]) == (2, 3, 0)


@needs_native
def test_replayed_altered_and_unknown_records_are_dropped(rig: Rig) -> None:
    rig.pump.start()
    rec = _seal(rig.python, b"genuine" * 10)
    altered = bytearray(_seal(rig.python, b"altered" * 10))
    altered[-1] ^= 1
    stranger, _ = _sessions(33, 44)
    rig.send_record(rec)
    rig.send_record(rec)  # replay
    rig.send_record(bytes(altered))
    rig.send_record(_seal(stranger, b"who?"))  # receiver index the pump does not know
    rig.send_record(_seal(rig.python, b"after"))
    assert rig.tap.recv(1 << 17) == b"genuine" * 10
    assert rig.tap.recv(1 << 17) == b"after"
    drops = _wait(lambda: (d := rig.pump.stats()["drops"])["no_session"] and d)
    assert (drops["replay"], drops["bad_tag"], drops["no_session"]) == (1, 1, 1)


@needs_native
def test_a_counter_outside_the_python_window_is_still_refused(rig: Rig) -> None:
    """The window Python handed over at engagement holds: a record it already accepted is a replay."""
    early = _seal(rig.python, b"seen by python")
    _open(rig.native, early)  # the Python data path accepted it before the pump took over
    rig.pump.set_sessions([_row(rig.native)])
    rig.pump.start()
    rig.send_record(early)
    rig.send_record(_seal(rig.python, b"new"))
    assert rig.tap.recv(1 << 17) == b"new"
    assert _wait(lambda: rig.pump.stats()["drops"]["replay"]) == 1


@needs_native
def test_handshakes_surface_as_events_and_the_next_session_is_promoted(rig: Rig) -> None:
    rig.pump.start()
    initiation = _initiation_to(rig.identity)
    rig.peer.sendall(STREAM_LEN.pack(len(initiation)) + initiation)
    assert _wait(rig.pump.take) == [(_fastpath.EV_MESSAGE, 0, initiation, None)]
    nxt_native, nxt_python = _sessions(55, 66)
    rig.pump.set_sessions([_row(rig.native), _row(nxt_native, kind=1)])
    rig.tap.send(b"still old")
    assert _open(rig.python, rig.recv_message())[0] == b"still old"
    rig.send_record(_seal(nxt_python, b"first under next"))
    assert rig.tap.recv(1 << 17) == b"first under next"
    assert _wait(rig.pump.take) == [(_fastpath.EV_ROTATED, 55, b"", None)]
    rig.tap.send(b"sealed under next")
    assert _open(nxt_python, rig.recv_message())[0] == b"sealed under next"


@needs_native
def test_resync_never_reuses_a_counter(rig: Rig) -> None:
    rig.pump.start()
    counters = []
    for i in range(3):
        rig.tap.send(b"x%d" % i)
        counters.append(RECORD_HEADER.unpack_from(rig.recv_message())[4])
    rig.pump.set_sessions([_row(rig.native)])  # Python's copy still says next_counter 0
    rig.tap.send(b"after resync")
    msg = rig.recv_message()
    counters.append(RECORD_HEADER.unpack_from(msg)[4])
    assert counters == sorted(set(counters)) and len(counters) == 4
    assert rig.pump.session_counters()[11][0] == 4


@needs_native
def test_end_of_stream_is_reported_once(rig: Rig) -> None:
    rig.pump.start()
    rig.peer.shutdown(socket.SHUT_WR)
    assert _wait(rig.pump.take) == [(_fastpath.EV_CLOSED, 0, b"", None)]
    assert rig.pump.stats()["closed"] == 1
    rig.pump.stop()
    rig.pump.stop()  # idempotent


@needs_native
def test_a_framing_error_closes_the_link() -> None:
    r = Rig()
    try:
        r.pump.start()
        r.peer.sendall(STREAM_LEN.pack(0))
        kind, *_ = _wait(r.pump.take)[0]
        assert kind == _fastpath.EV_CLOSED and r.pump.stats()["drops"]["decode"] == 1
    finally:
        r.close()


@needs_native
def test_bad_arguments_are_refused_with_typed_errors(rig: Rig) -> None:
    row = list(_row(rig.native))
    with pytest.raises(ValueError, match="key"):
        rig.pump.set_sessions([(*row[:2], b"short", *row[3:])])
    with pytest.raises(ValueError, match="window"):
        rig.pump.set_sessions([(*row[:8], b"\0" * 8)])
    with pytest.raises(ValueError, match="too many"):
        rig.pump.set_sessions([tuple(row)] * 5)
    with pytest.raises(TypeError):
        rig.pump.set_sessions([("not", "a", "row")])
    with pytest.raises(ValueError, match="IP address"):
        rig.pump.set_peer("not-an-address", 1)
    rig.pump.start()
    with pytest.raises(ValueError, match="feed"):
        rig.pump.feed(b"late")
    rig.tap.send(b"the old table survived the refused ones")
    assert _open(rig.python, rig.recv_message())[0] == b"the old table survived the refused ones"


# -- datagrams ---------------------------------------------------------------------------


def _reassemble(sock: socket.socket) -> bytes:
    pieces: dict[int, bytes] = {}
    count = None
    while count is None or len(pieces) < count:
        dg = sock.recv(65536)
        typ, _idx, count, _, _, _, off = PIECE_HEADER.unpack_from(dg)
        assert typ == MsgType.PIECE
        pieces[off] = dg[PIECE_HEADER.size :]
    return b"".join(pieces[k] for k in sorted(pieces))


@needs_native
def test_datagram_records_split_and_reassembled_like_python() -> None:
    r = Rig(stream=False, chunk=1000)
    try:
        r.pump.start()
        big = os.urandom(20000)
        r.tap.send(big)
        assert _open(r.python, _reassemble(r.peer))[0] == big
        r.tap.send(b"small")
        assert _open(r.python, r.peer.recv(65536))[0] == b"small"
        # the other way: Python's pieces, out of order, one duplicated
        payload = os.urandom(5000)
        rec = _seal(r.python, payload)
        _, _, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
        chunks = [rec[o : o + 1200] for o in range(0, len(rec), 1200)]
        dgrams = [
            PIECE_HEADER.pack(MsgType.PIECE, i, len(chunks), 0, receiver, counter & 0xFFFFFFFF, i * 1200) + c
            for i, c in enumerate(chunks)
        ]
        dest = r.link_pump.getsockname()
        for dg in [*reversed(dgrams), dgrams[0]]:
            r.peer.sendto(dg, dest)
        assert r.tap.recv(1 << 17) == payload
        assert r.pump.take() == []  # same address as configured: no peer event
        # an authenticated record from another address: the pump follows it and says so
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as moved:
            moved.bind(("127.0.0.1", 0))
            moved.sendto(_seal(r.python, b"roamed"), dest)
            assert r.tap.recv(1 << 17) == b"roamed"
            assert _wait(r.pump.take) == [(_fastpath.EV_PEER, 0, b"", moved.getsockname())]
            r.tap.send(b"follows")
            moved.settimeout(3)
            assert _open(r.python, moved.recv(65536))[0] == b"follows"
        assert r.pump.stats()["drops"]["decode"] == 0
    finally:
        r.close()


@needs_native
def test_datagram_handshakes_surface_with_their_address() -> None:
    r = Rig(stream=False)
    try:
        r.pump.start()
        msg = _response_to(r.identity)
        r.peer.sendto(msg, r.link_pump.getsockname())
        assert _wait(r.pump.take) == [(_fastpath.EV_MESSAGE, 0, msg, r.peer.getsockname())]
    finally:
        r.close()


# -- review findings: no blocking under the lock, bounded events, safe construction ---------------------


def _pair_of_pumps(bufsize: int) -> tuple[Any, Any, list[socket.socket]]:
    """Two stream pumps wired back to back over a socketpair with tiny buffers; returns (a, b, sockets)."""
    a_native, b_native = _sessions()
    tap_a, tap_a_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap_b, tap_b_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link_a, link_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (link_a, link_b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    for s in (tap_a, tap_a_peer, tap_b, tap_b_peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    pa = _fastpath.Pump(tap_a.fileno(), link_a.fileno(), True, False)
    pb = _fastpath.Pump(tap_b.fileno(), link_b.fileno(), True, False)
    pa.set_sessions([_row(a_native)])
    pb.set_sessions([_row(b_native)])
    return pa, pb, [tap_a, tap_a_peer, tap_b, tap_b_peer, link_a, link_b]


@needs_native
def test_both_directions_at_full_load_never_deadlock() -> None:
    """Each pump keeps reading its socket while its own output waits for room (the other is doing the same)."""
    pa, pb, socks = _pair_of_pumps(4096)
    _, tap_a_peer, _, tap_b_peer, *_ = socks
    frames = [i.to_bytes(4, "big") * 350 for i in range(3000)]
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def blast(sock: socket.socket) -> None:
        for f in frames:
            sock.send(f)

    def drain(sock: socket.socket, key: str) -> None:
        sock.settimeout(10)
        while len(got[key]) < len(frames):
            got[key].append(sock.recv(4096))

    import threading

    try:
        pa.start()
        pb.start()
        workers = [
            threading.Thread(target=blast, args=(tap_a_peer,)),
            threading.Thread(target=blast, args=(tap_b_peer,)),
            threading.Thread(target=drain, args=(tap_a_peer, "a")),
            threading.Thread(target=drain, args=(tap_b_peer, "b")),
        ]
        for w in workers:
            w.start()
        t0 = time.monotonic()
        while any(w.is_alive() for w in workers) and time.monotonic() - t0 < 20:
            pa.stats(), pb.session_counters()  # the GIL and the lock stay free while output waits
            time.sleep(0.01)
        for w in workers:
            w.join(1)
        assert got["a"] == frames and got["b"] == frames
    finally:
        pa.stop()
        pb.stop()
        for s in socks:
            s.close()


@needs_native
def test_output_waiting_for_room_blocks_nothing_and_resumes_in_order(rig: Rig) -> None:
    rig.link_pump.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rig.pump.start()
    rig.tap.setblocking(False)
    frames: list[bytes] = []
    with contextlib.suppress(BlockingIOError):  # back-pressure: the pump stops reading the TAP
        for i in range(2000):
            rig.tap.send(bytes([i % 256]) * 1400)
            frames.append(bytes([i % 256]) * 1400)
    rig.tap.settimeout(3)
    assert _wait(lambda: rig.pump.stats()["output_blocked"])  # the peer reads nothing yet
    t0 = time.monotonic()
    assert rig.pump.send_message(_initiation_to(StaticKeyPair.generate()))  # queued behind the records
    rig.pump.set_sessions([_row(rig.native)])
    assert time.monotonic() - t0 < 0.5
    opened: list[bytes] = []
    handshake_after = None
    while len(opened) < len(frames) or handshake_after is None:
        msg = rig.recv_message()
        if msg[0] == MsgType.INITIATION:
            handshake_after = len(opened)  # behind every record sealed before it was queued
            continue
        payload, flags = _open(rig.python, msg)
        opened += _frames_of(payload, flags)
    assert opened == frames and handshake_after > 0
    _wait(lambda: not rig.pump.stats()["output_blocked"])


@needs_native
def test_only_a_few_handshake_messages_are_queued_and_noise_is_counted(rig: Rig) -> None:
    rig.pump.start()
    genuine = _initiation_to(rig.identity)
    noise = [
        *(bytes([9]) + os.urandom(100) for _ in range(50)),  # no handshake type
        *(bytes([MsgType.INITIATION]) + os.urandom(147) for _ in range(50)),  # not the initiation size
        *(genuine[:-16] + os.urandom(16) for _ in range(50)),  # the size, not the mac1
    ]
    for msg in [*noise, *[genuine] * 20]:
        rig.peer.sendall(STREAM_LEN.pack(len(msg)) + msg)
    assert _wait(lambda: (d := rig.pump.stats()["drops"])["decode"] == 50 and d["handshake"] == 100 + 12)
    events = rig.pump.take()
    assert events == [(_fastpath.EV_MESSAGE, 0, genuine, None)] * 8  # the quota per take()
    rig.peer.sendall(STREAM_LEN.pack(len(genuine)) + genuine)
    assert _wait(rig.pump.take) == [(_fastpath.EV_MESSAGE, 0, genuine, None)]


@needs_native
def test_a_failed_device_is_reported_once_not_spun_on(rig: Rig) -> None:
    rig.pump.start()
    rig.tap.close()  # the far end of the "TAP" is gone: reads return end of file
    kind, *_ = _wait(rig.pump.take)[0]
    assert kind == _fastpath.EV_DEVICE
    time.sleep(0.2)
    assert rig.pump.take() == [] and rig.pump.stats()["drops"]["device"] == 1


@needs_native
def test_construction_errors_leave_other_descriptors_alone() -> None:
    for bad in ((-1, 0, True, False), ("x", 1, True, False), (0, 1, True, False, 10)):
        with pytest.raises((TypeError, ValueError)):
            _fastpath.Pump(*bad)
    os.fstat(0)  # a failed Pump must not have closed stdin (or whatever holds fd 0)
    blank = _fastpath.Pump.__new__(_fastpath.Pump)
    with pytest.raises(RuntimeError, match="init"):
        blank.take()
    r = Rig()
    try:
        with pytest.raises(RuntimeError, match="once"):
            r.pump.__init__(r.tap_pump.fileno(), r.link_pump.fileno(), True, False)
    finally:
        r.close()


@needs_native
def test_a_promotion_survives_a_stale_session_table(rig: Rig) -> None:
    """Python re-installs its table before it has heard of the promotion: the pump keeps sealing under next."""
    rig.pump.start()
    nxt_native, nxt_python = _sessions(55, 66)
    rows = [_row(rig.native), _row(nxt_native, kind=1)]
    rig.pump.set_sessions(rows)
    rig.send_record(_seal(nxt_python, b"confirms next"))
    assert rig.tap.recv(1 << 17) == b"confirms next"
    rig.pump.set_sessions(rows)  # stale: still says next is kind 1
    rig.tap.send(b"under next")
    assert _open(nxt_python, rig.recv_message())[0] == b"under next"


@needs_native
def test_datagram_falls_back_to_single_pieces_when_gso_is_refused_and_retries_later() -> None:
    """Issue 9 finding 7: one refusal (a forged ICMP "too big" can cause it) must not turn GSO off for good."""
    r = Rig(stream=False, chunk=1000, gso_retry=0.2)
    try:
        r.link_pump.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: the kernel refuses UDP_SEGMENT sends
        r.pump.start()
        big = os.urandom(20000)
        r.tap.send(big)
        assert _open(r.python, _reassemble(r.peer))[0] == big
        assert r.pump.stats()["gso"] == 0
        assert (_fastpath.EV_MSGSIZE, 22, b"", None) in _wait(r.pump.take)  # EINVAL: Python re-reads the path MTU
        r.link_pump.setsockopt(socket.SOL_SOCKET, 11, 0)  # the path takes GSO again

        def back() -> bool:
            r.tap.send(big)
            assert _open(r.python, _reassemble(r.peer))[0] == big
            return bool(r.pump.stats()["gso"])

        assert _wait(back, timeout=5)
    finally:
        r.close()


@needs_native
def test_frames_without_a_session_are_counted_per_frame(rig: Rig) -> None:
    rig.pump.set_sessions([])  # keys gone (the link was reset): nothing may be sealed
    for n in (60, 70, 80):
        rig.tap.send(bytes(n))
    rig.pump.start()
    assert _wait(lambda: rig.pump.stats()["drops"]["no_session"]) == 3  # one bundle, three frames
    assert rig.pump.stats()["records_out"] == 0
