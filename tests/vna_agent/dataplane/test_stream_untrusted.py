"""Stream tunnel server against junk connections (issue 9): every one leaves a counted trace, logs stay bounded."""

from __future__ import annotations

import structlog

from tests.fuzz.python._dataplane import CountingSink, initiator, responder
from tests.fuzz.python.h_stream import MemoryTransport
from vna_agent.dataplane.stream import MAX_PENDING_ACCEPTS, PENDING_BUFFER, StreamServer, _Conn
from vna_agent.dataplane.wire import MAX_MESSAGE, STREAM_LEN


def _server() -> tuple[StreamServer, CountingSink]:
    sink = CountingSink()
    return StreamServer("127.0.0.1", 0, responder(), sink), sink


def _connect(server: StreamServer) -> tuple[_Conn, MemoryTransport]:
    conn, transport = _Conn(server), MemoryTransport()
    conn.connection_made(transport)
    return conn, transport


def _feed(conn: _Conn, data: bytes) -> None:
    buf = conn.get_buffer(len(data))
    buf[: len(data)] = data
    conn.buffer_updated(len(data))


async def test_message_cut_short_by_the_close_is_counted() -> None:
    server, sink = _server()
    conn, _ = _connect(server)
    _feed(conn, STREAM_LEN.pack(1000) + b"x" * 10)
    assert sink.accounted() == 0  # waiting for the rest
    conn.connection_lost(None)
    assert sink.stats.drops == {"incomplete": 1}


async def test_refused_handshake_is_counted_once() -> None:
    server, sink = _server()
    conn, transport = _connect(server)
    junk = b"\x01" + bytes(131)
    _feed(conn, STREAM_LEN.pack(len(junk)) + junk + STREAM_LEN.pack(50) + b"tail")
    assert transport.closing
    conn.connection_lost(None)
    assert sink.stats.handshakes_refused == 1 and sink.stats.drops == {}


async def test_framing_error_is_counted_once() -> None:
    server, sink = _server()
    conn, transport = _connect(server)
    _feed(conn, STREAM_LEN.pack(0) + b"more")
    conn.connection_lost(None)
    assert transport.closing and sink.stats.drops == {"decode": 1}


async def test_connections_past_the_pending_limit_are_counted() -> None:
    server, sink = _server()
    conns = [_connect(server) for _ in range(MAX_PENDING_ACCEPTS + 3)]
    assert sum(t.closing for _, t in conns) == 3
    assert sink.stats.drops == {"queue_full": 3}


async def test_refusals_are_logged_once_a_second() -> None:
    server, sink = _server()
    junk = b"\x01" + bytes(131)
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            conn, _ = _connect(server)
            _feed(conn, STREAM_LEN.pack(len(junk)) + junk)
            conn.connection_lost(None)
    assert sink.stats.handshakes_refused == 100
    refused = [e for e in logs if e["event"] == "stream_handshake_refused"]
    assert 1 <= len(refused) <= 2 and refused[0]["suppressed"] == 0


async def test_unauthenticated_connections_hold_a_small_buffer_and_no_timer() -> None:
    """A junk connection cost a 1 MiB ring, kept alive 5 s by its handshake timer (100 MiB at 20 junk conns/s)."""
    server, sink = _server()
    conn, transport = _connect(server)
    assert len(conn.get_buffer(-1)) <= PENDING_BUFFER and conn.expiry is not None
    _feed(conn, STREAM_LEN.pack(PENDING_BUFFER) + b"x")  # longer than any handshake: junk
    assert transport.closing and sink.stats.drops == {"decode": 1}
    conn.connection_lost(None)
    assert conn.expiry is None and conn not in server._pending


async def test_authenticated_connection_gets_the_full_ring() -> None:
    tx = initiator()
    server, _ = _server()
    conn, transport = _connect(server)
    init = tx.begin_handshake()
    _feed(conn, STREAM_LEN.pack(len(init)) + init)
    assert server.conn is conn and not transport.closing and transport.written > 0
    assert len(conn.get_buffer(-1)) >= MAX_MESSAGE + STREAM_LEN.size
