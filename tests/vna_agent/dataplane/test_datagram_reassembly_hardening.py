"""Review findings 1 and 2 (issue 9), Python datagram path: reassembly is tied to the split's geometry.

Pieces get reassembly state only with a known receiver index and an in-window
counter; offsets are ``idx * piece_len``; a record is exactly the bytes its
pieces carry; forged pieces with another geometry or source cannot block the
genuine record.
"""

from __future__ import annotations

import os

import structlog

from vna_agent.dataplane.datagram import MAX_PARTIALS, DatagramLink
from vna_agent.dataplane.record import REPLAY_WINDOW_BITS
from vna_agent.dataplane.session import SecureChannel
from vna_agent.dataplane.wire import PIECE_HEADER, RECORD_HEADER, MsgType

from .test_datagram_pieces import ADDR, Sink, _receiver, _secure_pair, _sender

ATTACKER = ("192.0.2.66", 5555)


def _spy_open(rx: DatagramLink) -> list[int]:
    """Lengths of every record the receiver hands to its channel."""
    sizes: list[int] = []
    real = rx.channel.open

    def spy(record: memoryview) -> tuple[memoryview, int]:
        sizes.append(len(record))
        return real(record)

    rx.channel.open = spy  # type: ignore[method-assign]
    return sizes


def _piece(idx: int, count: int, receiver: int, seq: int, off: int, body: bytes) -> memoryview:
    return memoryview(PIECE_HEADER.pack(MsgType.PIECE, idx, count, 0, receiver, seq, off) + body)


def _keyed_receiver() -> tuple[SecureChannel, DatagramLink, Sink, int]:
    tx_ch, rx_ch = _secure_pair()
    rx, sink = _receiver(rx_ch)
    assert tx_ch.current is not None
    return tx_ch, rx, sink, tx_ch.current.remote_index


def _split(tx_ch: SecureChannel, size: int) -> tuple[bytes, list[bytes]]:
    """A random frame of ``size`` bytes and the pieces the implementation sends for it."""
    tx, wire = _sender(tx_ch)
    frame = os.urandom(size)
    tx.send_frame(memoryview(frame), 0)
    return frame, wire


def test_sparse_offsets_buy_no_crypto() -> None:
    """Two tiny pieces (16-byte header at 0, one byte at 66079) must not become a 66 KB record."""
    _, rx, sink, receiver = _keyed_receiver()
    sizes = _spy_open(rx)
    header = RECORD_HEADER.pack(MsgType.DATA, 0, 0, receiver, 0)
    rx._on_datagram(_piece(0, 2, receiver, 0, 0, header), ATTACKER)
    rx._on_datagram(_piece(1, 2, receiver, 0, 66079, b"x"), ATTACKER)
    assert sizes == []  # nothing reached AES-GCM
    assert sum(sink.stats.drops.values()) >= 1
    assert sink.frames == []


def test_offsets_must_follow_piece_indexes() -> None:
    _, rx, sink, receiver = _keyed_receiver()
    sizes = _spy_open(rx)
    body = os.urandom(1000)
    for idx, off in ((1, 1005), (2, 1000), (0, 8)):  # off != idx * len
        rx._on_datagram(_piece(idx, 4, receiver, 1, off, body), ATTACKER)
    # the last piece longer than the others, and a last piece at an offset no piece length explains
    rx._on_datagram(_piece(3, 4, receiver, 1, 3000, body + b"y"), ATTACKER)
    rx._on_datagram(_piece(3, 4, receiver, 1, 3001, b"y"), ATTACKER)
    assert rx._partials == {} and sizes == []
    assert sink.stats.drops == {"decode": 5}


def test_mixed_piece_lengths_never_expose_uncovered_bytes() -> None:
    """Pieces of one (receiver, seq) but different lengths are separate splits; neither completes."""
    _, rx, _, receiver = _keyed_receiver()
    sizes = _spy_open(rx)
    rx._on_datagram(_piece(0, 2, receiver, 2, 0, os.urandom(1000)), ATTACKER)
    rx._on_datagram(_piece(1, 2, receiver, 2, 500, os.urandom(10)), ATTACKER)  # would leave 500..1000 stale
    assert sizes == []
    assert len(rx._partials) == 2


def test_pieces_for_unknown_receivers_allocate_nothing_and_evict_nothing() -> None:
    tx_ch, rx, sink, receiver = _keyed_receiver()
    frame, wire = _split(tx_ch, 20000)
    for d in wire[:-1]:
        rx._on_datagram(memoryview(d), ADDR)
    assert len(rx._partials) == 1
    for i in range(4 * MAX_PARTIALS):  # off-path junk: random receiver indexes
        rx._on_datagram(_piece(0, 3, receiver ^ (i + 1), i, 0, b"j" * 100), ATTACKER)
    assert len(rx._partials) == 1
    assert sink.stats.drops == {"no_session": 4 * MAX_PARTIALS}
    rx._on_datagram(memoryview(wire[-1]), ADDR)
    assert sink.frames == [frame]


def test_pieces_outside_the_window_allocate_nothing() -> None:
    tx_ch, rx, sink, receiver = _keyed_receiver()
    tx, wire = _sender(tx_ch)
    for _ in range(REPLAY_WINDOW_BITS + 10):  # move the window well past 0
        tx.send_frame(memoryview(b"k"), 0)
    for d in wire:
        rx._on_datagram(memoryview(d), ADDR)
    assert len(sink.frames) == REPLAY_WINDOW_BITS + 10
    top = REPLAY_WINDOW_BITS + 9
    for seq in (0, 5, top, top + (1 << 25), (top - REPLAY_WINDOW_BITS) & 0xFFFFFFFF):
        rx._on_datagram(_piece(0, 2, receiver, seq, 0, b"z" * 100), ATTACKER)
    assert rx._partials == {}
    assert sink.stats.drops == {"replay": 5}
    rx._on_datagram(_piece(0, 2, receiver, top + 1, 0, b"z" * 100), ATTACKER)  # the next record may start
    assert len(rx._partials) == 1


def test_forged_piece_with_other_geometry_does_not_lose_the_record() -> None:
    """An on-path forger pre-poisons the next counter with one tiny piece; the record still arrives."""
    tx_ch, rx, sink, receiver = _keyed_receiver()
    frame, wire = _split(tx_ch, 30000)
    count = PIECE_HEADER.unpack_from(wire[0])[2]
    rx._on_datagram(_piece(1, count + 1, receiver, 0, 1, b"p"), ADDR)  # from the peer's own address
    rx._on_datagram(_piece(0, count, receiver, 0, 0, b"p" * 7), ATTACKER)  # another source
    for d in wire:
        rx._on_datagram(memoryview(d), ADDR)
    assert sink.frames == [frame]


def test_duplicate_piece_is_a_counted_drop() -> None:
    tx_ch, rx, sink, _ = _keyed_receiver()
    _, wire = _split(tx_ch, 5000)
    rx._on_datagram(memoryview(wire[0]), ADDR)
    rx._on_datagram(memoryview(wire[0]), ADDR)
    assert sink.stats.drops == {"replay": 1}


def test_record_header_must_match_its_pieces() -> None:
    """A record whose own header names another counter than its pieces never reaches the AEAD."""
    tx_ch, rx, sink, _ = _keyed_receiver()
    sizes = _spy_open(rx)
    _, wire = _split(tx_ch, 5000)
    relabelled = [bytearray(d) for d in wire]
    for d in relabelled:
        PIECE_HEADER.pack_into(d, 0, *PIECE_HEADER.unpack_from(d)[:5], 1, PIECE_HEADER.unpack_from(d)[6])
    for d in relabelled:
        rx._on_datagram(memoryview(bytes(d)), ADDR)
    assert sizes == [] and sink.stats.drops == {"decode": 1}


def test_empty_datagram_is_a_counted_drop() -> None:
    """Found by the atheris harness ``datagram``: a zero-length UDP payload left no trace in the counters."""
    _, rx, sink, _ = _keyed_receiver()
    rx._on_datagram(memoryview(b""), ATTACKER)
    assert sink.stats.drops == {"decode": 1}


def test_refused_handshakes_are_counted_always_and_logged_once_a_second() -> None:
    _, rx, sink, _ = _keyed_receiver()
    with structlog.testing.capture_logs() as logs:
        for _ in range(200):
            rx._on_datagram(memoryview(b"\x01" + bytes(131)), ATTACKER)
    assert sink.stats.handshakes_refused == 200
    assert 1 <= len([e for e in logs if e["event"] == "datagram_handshake_refused"]) <= 2


def test_gro_runs_of_many_sizes_keep_few_slice_tables() -> None:
    """Each GRO segment size got a table of ~128 KiB / size views, kept forever: junk of every size grew one each."""
    _, rx, _, receiver = _keyed_receiver()
    for seg in range(100, 300):
        chunk = seg - PIECE_HEADER.size
        run = b"".join(_piece(i, 3, receiver, seg, i * chunk, bytes(chunk)).tobytes() for i in range(2))
        rx._rx[: len(run)] = run
        assert rx._on_run(len(run), seg, ATTACKER)
    assert len(rx._src_slices) <= 4
