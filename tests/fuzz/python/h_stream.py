"""Stream framing on a tunnel server's TCP connection, bytes split into reads at any points.

The first byte picks the connection's state: 0 a fresh (unauthenticated)
connection, so the bytes meet the handshake path; 1 the active connection
of a keyed channel, so they meet the record path. The second byte seeds the
read sizes. Invariants: no exception; every complete message is delivered, a
counted drop or a handshake outcome, or the connection is aborted (framing
error); the receive ring never exceeds its size.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

from vna_agent.dataplane.session import RekeyPolicy
from vna_agent.dataplane.stream import RX_BUFFER, StreamServer, _Conn
from vna_agent.dataplane.wire import MAX_RECORD, STREAM_LEN

from ._dataplane import PEER_ADDR, CountingSink, initiator, keyed_pair, responder
from ._input import Reader

MAX_LEN = 65536
_LOOP = asyncio.new_event_loop()


class MemoryTransport(asyncio.Transport):
    """What ``_Conn`` uses of a selector transport, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER_ADDR if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        return None


def _feed(conn: _Conn, data: bytes, rng: random.Random, transport: MemoryTransport) -> None:
    pos = 0
    while pos < len(data) and not transport.closing:
        n = min(len(data) - pos, rng.choice((1, 3, 4, 5, 17, 1000, 70000)))
        buf = conn.get_buffer(n)
        assert len(buf) >= 1 and conn._end <= RX_BUFFER
        n = min(n, len(buf))
        buf[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n


async def _run(data: bytes) -> None:
    r = Reader(data)
    active = r.byte() & 1
    rng = random.Random(r.byte())
    sink = CountingSink()
    channel = keyed_pair()[1] if active else responder()
    server = StreamServer("127.0.0.1", 0, channel, sink, policy=RekeyPolicy(rekey_timeout=0.0))
    conn = _Conn(server)
    transport = MemoryTransport()
    conn.connection_made(transport)
    if active:
        server._pending.discard(conn)
        server._activate(conn)
    body = r.rest()
    _feed(conn, body, rng, transport)
    complete = _complete_messages(body)
    assert transport.closing or sink.accounted() >= complete, (sink.accounted(), complete)
    await asyncio.sleep(0)  # the pending-handshake timer (rekey_timeout 0) fires
    conn.connection_lost(None)
    assert not body or sink.accounted() >= 1, "bytes from a peer left no trace in the counters"


def _complete_messages(body: bytes) -> int:
    n = pos = 0
    while pos + 4 <= len(body):
        (ln,) = STREAM_LEN.unpack_from(body, pos)
        if pos + 4 + ln > len(body):
            break
        pos += 4 + ln
        n += 1
    return n


def one_input(data: bytes) -> None:
    _LOOP.run_until_complete(_run(data))


def seeds() -> Iterator[bytes]:
    """A real initiation (fresh connection) and framed records of the keyed channel (active one)."""
    init_msg = initiator().begin_handshake()
    yield b"\x00\x07" + STREAM_LEN.pack(len(init_msg)) + init_msg
    tx, _ = keyed_pair()
    out = memoryview(bytearray(MAX_RECORD))
    stream = b""
    for size in (0, 60, 1500, 9000):
        n = tx.seal_into(bytes(size), 1, out)
        stream += STREAM_LEN.pack(n) + bytes(out[:n])
    yield b"\x01\x03" + stream
    yield b"\x01\x05" + STREAM_LEN.pack(0)
