"""Datagram record splitting (GSO layout), reassembly in any order, loss and tampering (no sockets)."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import pytest

from vna_agent.dataplane.datagram import DatagramLink
from vna_agent.dataplane.keys import Peer, PeerAllowList, StaticKeyPair
from vna_agent.dataplane.plain import PlainChannel
from vna_agent.dataplane.session import Channel, SecureChannel
from vna_agent.dataplane.stats import TunnelStats
from vna_agent.dataplane.wire import PIECE_HEADER, MsgType

ADDR = ("192.0.2.1", 4000)


class Sink:
    def __init__(self) -> None:
        self.stats = TunnelStats()
        self.frames: list[bytes] = []

    def deliver(self, payload: memoryview, flags: int) -> None:
        self.frames.append(bytes(payload))

    def pause_device(self) -> None:
        pass

    def resume_device(self) -> None:
        pass


def _sender(channel: Channel, path_mtu: int = 1500) -> tuple[DatagramLink, list[bytes]]:
    link = DatagramLink(channel, Sink(), remote=ADDR, path_mtu=path_mtu)
    link.peer = ADDR
    wire: list[bytes] = []

    def capture(bufs: list[memoryview], seg: int) -> None:
        data = b"".join(bytes(b) for b in bufs)
        if seg:  # what UDP_SEGMENT does: equal segments, the last one shorter
            wire.extend(data[i : i + seg] for i in range(0, len(data), seg))
        else:
            wire.append(data)

    link._send = capture  # type: ignore[method-assign]
    return link, wire


def _receiver(channel: Channel) -> tuple[DatagramLink, Sink]:
    sink = Sink()
    return DatagramLink(channel, sink, path_mtu=1500), sink


def _secure_pair() -> tuple[SecureChannel, SecureChannel]:
    ki, kr = StaticKeyPair.generate(), StaticKeyPair.generate()
    ini = SecureChannel(ki, PeerAllowList(), remote=Peer("r", kr.public), initiator=True)
    resp = SecureChannel(kr, PeerAllowList([Peer("i", ki.public)]), initiator=False)
    reply = resp.handle_handshake(ini.begin_handshake())
    assert reply is not None
    ini.handle_handshake(reply)
    return ini, resp


@pytest.mark.parametrize("secure", [False, True])
def test_superpacket_split_fits_path_and_reassembles_in_any_order(secure: bool) -> None:
    tx_ch, rx_ch = _secure_pair() if secure else (PlainChannel(initiator=True), PlainChannel())
    tx, wire = _sender(tx_ch)
    rx, sink = _receiver(rx_ch)
    frame = os.urandom(65000)
    tx.send_frame(memoryview(frame), 1)
    assert all(len(d) <= 1500 - 28 for d in wire)
    assert len(wire) == -(-(65000 + tx_ch.overhead) // (1472 - PIECE_HEADER.size))
    assert {d[0] for d in wire} == {MsgType.PIECE}
    counts = {PIECE_HEADER.unpack_from(d)[2] for d in wire}
    assert counts == {len(wire)}
    random.Random(7).shuffle(wire)
    for d in wire:
        rx._on_datagram(memoryview(d), ADDR)
    assert sink.frames == [frame]
    assert rx.peer == ADDR  # learned from an authenticated record


def test_small_frames_are_not_split() -> None:
    tx, wire = _sender(PlainChannel(initiator=True))
    rx, sink = _receiver(PlainChannel())
    tx.send_frame(memoryview(b"x" * 1400), 0)
    assert len(wire) == 1 and wire[0][0] == MsgType.PLAIN
    rx._on_datagram(memoryview(wire[0]), ADDR)
    assert sink.frames == [b"x" * 1400]


def test_one_lost_piece_loses_the_record_and_is_counted() -> None:
    tx, wire = _sender(PlainChannel(initiator=True))
    rx, sink = _receiver(PlainChannel())
    tx.send_frame(memoryview(os.urandom(30000)), 0)
    for d in wire[:-1]:
        rx._on_datagram(memoryview(d), ADDR)
    assert sink.frames == [] and len(rx._partials) == 1
    for p in rx._partials.values():
        p.created -= 5
    rx.tick()
    assert rx._partials == {}
    assert rx.sink.stats.drops == {"incomplete": 1}
    # duplicates of a completed record's pieces are harmless
    tx2, wire2 = _sender(PlainChannel(initiator=True))
    tx2.send_frame(memoryview(b"y" * 5000), 0)
    for d in wire2 + wire2[:1]:
        rx._on_datagram(memoryview(d), ADDR)
    assert sink.frames == [b"y" * 5000]


def test_tampered_piece_fails_the_tag() -> None:
    tx_ch, rx_ch = _secure_pair()
    tx, wire = _sender(tx_ch)
    rx, sink = _receiver(rx_ch)
    tx.send_frame(memoryview(os.urandom(10000)), 0)
    bad = bytearray(wire[3])
    bad[100] ^= 1
    wire[3] = bytes(bad)
    for d in wire:
        rx._on_datagram(memoryview(d), ADDR)
    assert sink.frames == [] and rx.sink.stats.drops == {"bad_tag": 1}
    assert rx.peer is None  # an unauthenticated record does not move the peer


def test_smaller_path_mtu_gives_smaller_pieces() -> None:
    tx, wire = _sender(PlainChannel(initiator=True), path_mtu=1280)
    tx.send_frame(memoryview(bytes(20000)), 0)
    assert max(map(len, wire)) == 1280 - 28


def _gro(rx: DatagramLink, segments: list[bytes]) -> bool:
    """Feed segments as one GRO batch (all but the last the same size)."""
    data = b"".join(segments)
    rx._rx[: len(data)] = data
    return rx._on_run(len(data), len(segments[0]), ADDR)


@pytest.mark.parametrize("split_at", [None, 20])
def test_gro_batches_take_the_fast_path(split_at: int | None) -> None:
    tx_ch, rx_ch = _secure_pair()
    tx, wire = _sender(tx_ch)
    rx, sink = _receiver(rx_ch)
    frame = os.urandom(64000)
    tx.send_frame(memoryview(frame), 1)
    runs = [wire] if split_at is None else [wire[:split_at], wire[split_at:]]
    for run_ in reversed(runs):  # batches may arrive in any order
        assert _gro(rx, run_)
    assert sink.frames == [frame]


def test_gro_batch_that_is_not_one_run_falls_back() -> None:
    tx, wire = _sender(PlainChannel(initiator=True))
    rx, sink = _receiver(PlainChannel())
    tx.send_frame(memoryview(os.urandom(20000)), 0)
    mixed = [wire[0], wire[2], wire[1]]
    assert not _gro(rx, mixed)
    assert not _gro(rx, wire[3:5] + wire[3:4])  # last header not the expected successor
    for d in wire:
        rx._on_datagram(memoryview(d), ADDR)
    assert len(sink.frames) == 1


class _BlockingSock:
    """Stands in for the UDP socket: refuses sends while ``block`` is set."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.block = True
        self.sent: list[bytes] = []

    def sendmsg(self, bufs: list[bytes], anc: object = (), flags: int = 0, addr: object = None) -> int:
        if self.block:
            raise BlockingIOError
        data = b"".join(bytes(b) for b in bufs)
        self.sent.append(data)
        return len(data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        pass


class _PausingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_device(self) -> None:
        self.paused = True

    def resume_device(self) -> None:
        self.paused = False


async def test_full_socket_queues_and_pauses_the_device() -> None:
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = _PausingSink()
    link = DatagramLink(PlainChannel(initiator=True), sink, remote=ADDR, path_mtu=1500)
    fake = _BlockingSock(real.fileno())
    link.sock = fake  # type: ignore[assignment]
    link.peer = ADDR
    try:
        link.send_frame(memoryview(b"a" * 100), 0)
        link.send_frame(memoryview(b"b" * 20000), 0)  # split: queued as GSO batches
        assert sink.paused and fake.sent == []
        fake.block = False
        await asyncio.sleep(0.05)  # the real socket is writable: the queue drains in order
        assert not sink.paused
        assert fake.sent[0][0] == MsgType.PLAIN and fake.sent[0].endswith(b"a" * 100)
        assert all(d[0] == MsgType.PIECE for d in fake.sent[1:])
    finally:
        link.sock = None
        asyncio.get_running_loop().remove_writer(real.fileno())
        real.close()
