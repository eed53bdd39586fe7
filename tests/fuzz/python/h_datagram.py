"""Datagram reassembly and dispatch: any UDP payloads from the peer's or another address.

The input is a list of datagrams (``u16 length || bytes``); the first byte
picks the channel (keyed or plain), a flag byte per datagram its source, and
mode 2 hands the first datagram to the GRO run path as a coalesced buffer.
Invariants: every datagram is accounted for (delivered, a counted drop, a
handshake outcome or held in a partial record), no record longer than the
bytes received reaches the channel, and reassembly state stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

from vna_agent.dataplane.datagram import MAX_PARTIALS, DatagramLink
from vna_agent.dataplane.plain import PlainChannel
from vna_agent.dataplane.session import Channel

from ._dataplane import OTHER_ADDR, PEER_ADDR, CountingSink, keyed_pair
from ._input import Reader, frame_chunks

MAX_LEN = 16384


def _receiver(plain: bool) -> tuple[DatagramLink, CountingSink, list[int]]:
    ch: Channel = PlainChannel() if plain else keyed_pair()[1]
    sink = CountingSink()
    link = DatagramLink(ch, sink, path_mtu=1500)
    opened: list[int] = []
    real = ch.open

    def spy(record: memoryview) -> tuple[memoryview, int]:
        opened.append(len(record))
        return real(record)

    ch.open = spy  # type: ignore[method-assign]
    return link, sink, opened


def _held(link: DatagramLink) -> int:
    return sum(p.got for p in link._partials.values())


def _gro_run(link: DatagramLink, dg: bytes, seg: int) -> None:
    n = len(dg)
    link._rx[:n] = dg
    if seg and seg < n and not link._on_run(n, seg, PEER_ADDR):
        for off in range(0, n, seg):
            link._on_datagram(link._rx_mv[off : min(off + seg, n)], PEER_ADDR)


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    link, sink, opened = _receiver(plain=bool(mode & 1))
    received = 0
    if mode & 2:
        seg = r.byte() << 4
        run = next(r.chunks(), b"")
        received += len(run)
        _gro_run(link, run, seg)
    for dg in r.chunks():
        addr = OTHER_ADDR if dg[:1] == b"\xff" else PEER_ADDR
        dg = dg[1:]
        received += len(dg)
        accounted, held = sink.accounted(), _held(link)
        link._on_datagram(memoryview(dg), addr)
        # delivered, dropped, a handshake outcome, or one more piece held (completing or
        # evicting a partial counts its record instead)
        assert sink.accounted() > accounted or _held(link) > held, dg
        assert len(link._partials) <= MAX_PARTIALS
        assert not opened or max(opened) <= received, (opened, received)
    assert len(link._pool) + len(link._partials) <= MAX_PARTIALS + 1


def _wire(plain: bool) -> list[tuple[bytes, int]]:
    """What a sender's ``sendmsg`` calls carry (buffer, GSO segment size) for a few frame sizes."""
    tx_ch: Channel = PlainChannel(initiator=True) if plain else keyed_pair()[0]
    tx = DatagramLink(tx_ch, CountingSink(), remote=PEER_ADDR, path_mtu=1500)
    tx.peer = PEER_ADDR
    runs: list[tuple[bytes, int]] = []
    tx._send = lambda bufs, seg: runs.append((b"".join(bytes(b) for b in bufs), seg))  # type: ignore[method-assign]
    for size in (0, 200, 4000, 9000):
        tx.send_frame(memoryview(bytes(size)), 1)
    return runs


def seeds() -> Iterator[bytes]:
    """What the implementation sends: split records (one GSO run each), small records, keepalives."""
    for plain in (False, True):
        runs = _wire(plain)
        wire = [data[i : i + (seg or len(data))] for data, seg in runs for i in range(0, len(data), seg or len(data))]
        mode = int(plain)
        yield frame_chunks([b"\x00" + w for w in wire], prefix=bytes([mode]))
        run, seg = next((data, seg) for data, seg in runs if seg)
        yield frame_chunks([run[: MAX_LEN // 2], b"\x00" + wire[0]], prefix=bytes([mode | 2, seg >> 4]))
