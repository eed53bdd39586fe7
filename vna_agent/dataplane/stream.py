"""Stream tunnel over TCP (WAN/Internet).

Wire: every message is ``u32 length (big-endian) || message``; the first
messages are the handshake (initiation from the client, response from the
server), then records (``DATA`` or ``PLAIN``). Rekey initiations travel on
the same connection. Several records are batched into one socket write.

Partial writes are asyncio's job: records are written through a selector
transport, which keeps whatever the kernel did not take and sends it in
order, and tells us (``pause_writing``) to stop reading the TAP until its
buffer drains. Receiving uses ``recv_into`` a preallocated ring buffer
(``BufferedProtocol``) and decrypts records in place of the next read.

Once the channel has keys, the link hands the socket and the TAP to the
native fast path (:mod:`.fastpath`) when it is built: asyncio stops
reading the socket, handshake messages come back as events, and every
write (handshakes, keepalives) goes through the fast path so that nothing
interleaves with its records. The fast path is stopped before the socket
is closed.

The client reconnects with exponential backoff and jitter, so it may come
up before its server; the server accepts one authenticated connection per
peer and a new authenticated connection replaces the old one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import structlog

from .errors import DecodeError, HandshakeError, LinkDown, RecordError, TransportError
from .fastpath import FastPath
from .link import Backoff, FrameSink, LogLimiter, tune_tcp
from .session import Channel, RekeyPolicy, SecureChannel
from .stats import DropReason, TunnelState
from .wire import MAX_MESSAGE, STREAM_LEN, MsgType

log = structlog.get_logger("vna_agent.dataplane.stream")

RX_BUFFER = 1 << 20
#: Receive buffer of a connection before it is authenticated (handshake messages are < 200 bytes).
PENDING_BUFFER = 4096
TX_BUFFER = 1 << 19
FLUSH_AT = 1 << 18
WRITE_HIGH = 4 << 20
WRITE_LOW = 1 << 20
MAX_PENDING_ACCEPTS = 32
_LEN = STREAM_LEN
_LEN_SIZE = STREAM_LEN.size
_DATA = int(MsgType.DATA)
_PLAIN = int(MsgType.PLAIN)
_HANDSHAKE = (int(MsgType.INITIATION), int(MsgType.RESPONSE))
_EMPTY = memoryview(b"")


class _Conn(asyncio.BufferedProtocol):
    """One TCP connection: framing, receive ring buffer, flow-control callbacks."""

    def __init__(self, owner: _StreamLink) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        # Until authenticated only handshake messages are valid: a small buffer, so that junk
        # connections cost no megabyte each; the full ring comes with authentication (grow()).
        self._buf = bytearray(PENDING_BUFFER)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._grow = False
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.paused = False
        self.expiry: asyncio.TimerHandle | None = None
        """The pending-handshake timer (server), cancelled when the connection goes."""

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_tcp(sock)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.owner.on_connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.expiry is not None:
            self.expiry.cancel()  # the timer would keep the connection (and its buffer) alive
            self.expiry = None
        if self._end > self._start:  # a message that never completed is junk like any other: counted
            self._start = self._end = 0
            self.owner.sink.stats.drop(DropReason.INCOMPLETE)
        if not self.ready.done():
            self.ready.set_exception(TransportError("connection closed before the handshake"))
            self.ready.exception()  # retrieved: nobody else may await it
        if not self.closed.done():
            self.closed.set_result(None)
        self.owner.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        self.owner.on_pause(self, True)

    def resume_writing(self) -> None:
        self.paused = False
        self.owner.on_pause(self, False)

    def grow(self) -> None:
        """The connection is authenticated: the full receive ring from the next read on."""
        self._grow = len(self._buf) < RX_BUFFER

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._grow:  # not inside _parse, which holds views of the old buffer
            self._grow = False
            unparsed = self._mv[self._start : self._end]
            self._buf = bytearray(RX_BUFFER)
            self._buf[: len(unparsed)] = unparsed
            self._mv = memoryview(self._buf)
            self._start, self._end = 0, len(unparsed)
        if len(self._buf) - self._end < min(MAX_MESSAGE + _LEN_SIZE, len(self._buf)):
            n = self._end - self._start
            self._buf[:n] = bytes(self._mv[self._start : self._end])
            self._start, self._end = 0, n
        return self._mv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # close

    def take_unparsed(self) -> bytes:
        """Bytes received but not parsed yet (a partial message), handed to the fast path."""
        data = bytes(self._mv[self._start : self._end])
        self._start = self._end = 0
        return data

    # -- parsing -------------------------------------------------------------

    def _parse(self) -> None:
        buf, mv = self._buf, self._mv
        start, end = self._start, self._end
        owner = self.owner
        channel = owner.channel
        sink = owner.sink
        stats = sink.stats
        deliver = sink.deliver
        limit = min(MAX_MESSAGE, len(buf) - _LEN_SIZE)  # a pending connection's buffer holds handshakes only
        while end - start >= _LEN_SIZE:
            (ln,) = _LEN.unpack_from(buf, start)
            if ln == 0 or ln > limit:
                stats.drop(DropReason.DECODE)
                suppressed = owner.refusals.allow(time.monotonic())
                if suppressed is not None:
                    log.warning("stream_framing_error", length=ln, peer=self.peername, suppressed=suppressed)
                self._start = self._end = 0  # counted here, not again as incomplete
                self.abort()
                return
            s = start + _LEN_SIZE
            if end - s < ln:
                break
            start = s + ln
            typ = buf[s]
            if typ in (_DATA, _PLAIN):
                if owner.conn is not self:
                    stats.drop(DropReason.NO_SESSION)
                    continue
                try:
                    payload, flags = channel.open(mv[s:start])
                except RecordError as exc:
                    stats.drop(exc.reason)
                    continue
                deliver(payload, flags)
            elif typ in _HANDSHAKE:
                owner.on_handshake(self, bytes(mv[s:start]))
                if self.transport is None or self.transport.is_closing():
                    self._start = self._end = 0  # refused and counted; what follows is discarded with it
                    return
                if self._grow:  # authenticated: records may follow, the next read brings the full ring
                    limit = MAX_MESSAGE
            else:
                stats.drop(DropReason.DECODE)
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    # -- sending -------------------------------------------------------------

    def write(self, data: memoryview | bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def send_message(self, msg: bytes) -> None:
        self.write(_LEN.pack(len(msg)) + msg)

    def abort(self) -> None:
        if self.owner.fast_conn is self:
            self.owner.disengage()  # the native thread must let go of the socket before it closes
        if self.transport is not None:
            self.transport.abort()


class _StreamLink:
    """Batching sender shared by client and server; the active connection carries records."""

    def __init__(self, channel: Channel, sink: FrameSink, *, policy: RekeyPolicy | None = None) -> None:
        self.channel = channel
        self.sink = sink
        self.policy = policy or RekeyPolicy()
        self.conn: _Conn | None = None
        self._out = bytearray(TX_BUFFER)
        self._omv = memoryview(self._out)
        self._pos = 0
        self._room = TX_BUFFER - _LEN_SIZE - channel.overhead
        self.fast: FastPath | None = None
        self.fast_conn: _Conn | None = None
        self.refusals = LogLimiter()
        """Junk from unauthenticated connections is counted always, logged once a second."""

    # -- native fast path --------------------------------------------------------

    def engage(self, conn: _Conn) -> None:
        """Hand ``conn`` to the fast path once its channel has keys (no-op when unavailable)."""
        ch = self.channel
        if self.fast is not None or conn is not self.conn or not isinstance(ch, SecureChannel):
            return
        t = conn.transport
        if t is None or t.is_closing() or not ch.session_table():
            return
        self.flush()
        if t.get_write_buffer_size():
            return  # asyncio still holds bytes for this socket; the next handshake or tick tries again
        sock = t.get_extra_info("socket")
        if sock is None:
            return
        fast = self.sink.fast_path(
            sock.fileno(),
            stream=True,
            on_message=lambda msg, _addr: self._fast_message(conn, msg),
            on_closed=lambda err: self._fast_closed(conn, err),
        )
        if fast is None:
            return
        t.pause_reading()
        self.fast, self.fast_conn = fast, conn
        fast.start(conn.take_unparsed())
        log.info("stream_fastpath_engaged", peer=_fmt(conn.peername))

    def disengage(self) -> None:
        """Stop the fast path (idempotent); the Python data path takes over."""
        fast, conn = self.fast, self.fast_conn
        if fast is None:
            return
        self.fast = self.fast_conn = None
        fast.stop()
        self.sink.fast_path_ended()
        # The connection is not read again: the native ring may hold part of a record, so
        # every caller aborts it (the client reconnects, the server waits for the peer).
        if conn is not None:
            conn.abort()

    def _fast_message(self, conn: _Conn, msg: bytes) -> None:
        if self.fast_conn is not conn:  # queued on a connection that is gone
            return
        if msg and msg[0] in _HANDSHAKE:
            self.on_handshake(conn, msg)
            if self.fast is not None:
                self.fast.sync()
        else:
            self.sink.stats.drop(DropReason.DECODE)

    def _fast_closed(self, conn: _Conn, err: int) -> None:
        if self.fast_conn is conn:
            log.info("stream_fastpath_closed", peer=_fmt(conn.peername), errno=err)
            conn.abort()

    # -- Link API --------------------------------------------------------------

    def send_frame(self, frame: memoryview, flags: int) -> None:
        if self.conn is None:
            raise LinkDown("no connection")
        pos = self._pos
        if pos + len(frame) > self._room:
            self.flush()
            pos = 0
        n = self.channel.seal_into(frame, flags, self._omv[pos + _LEN_SIZE :])
        _LEN.pack_into(self._out, pos, n)
        pos += _LEN_SIZE + n
        self._pos = pos
        if pos >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        pos = self._pos
        if pos:
            self._pos = 0
            conn = self.conn
            if conn is not None:
                conn.write(self._omv[:pos])

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()

    def info(self) -> dict[str, object]:
        c = self.conn
        return {"peer": _fmt(c.peername) if c else None, "connected": c is not None}

    # -- helpers ---------------------------------------------------------------

    def _send_keepalive(self) -> None:
        if self.fast is not None:
            self.fast.send_keepalive()
            return
        try:
            self.send_frame(_EMPTY, 0)
        except RecordError as exc:
            self.sink.stats.drop(exc.reason)
            return
        self.sink.stats.keepalives_out += 1
        self.flush()

    def _send_handshake(self, conn: _Conn, msg: bytes) -> None:
        if self.fast is not None and self.fast_conn is conn:
            if not self.fast.send_message(msg):
                conn.abort()
            return
        self.flush()
        conn.send_message(msg)

    # -- callbacks from _Conn ----------------------------------------------------

    def on_connected(self, conn: _Conn) -> None:
        raise NotImplementedError

    def on_handshake(self, conn: _Conn, msg: bytes) -> None:
        raise NotImplementedError

    def on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        if self.fast_conn is conn:
            self.disengage()
        if conn is self.conn:
            self.conn = None
            self._pos = 0
            self.channel.reset()
            st = self.sink.stats
            st.disconnects += 1
            log.info("stream_disconnected", peer=_fmt(conn.peername), error=str(exc) if exc else None)
            if conn.paused:
                self.sink.resume_device()

    def on_pause(self, conn: _Conn, paused: bool) -> None:
        if conn is self.conn:
            if paused:
                self.sink.pause_device()
            else:
                self.sink.resume_device()

    def _activate(self, conn: _Conn) -> None:
        old = self.conn
        self.conn = conn
        conn.grow()
        self._pos = 0
        st = self.sink.stats
        st.connects += 1
        st.state = TunnelState.UP if self.channel.ready or not self.channel.encrypted else TunnelState.HANDSHAKING
        if old is not None and old is not conn:
            old.abort()
        if not conn.ready.done():
            conn.ready.set_result(None)


def _fmt(addr: Any) -> str | None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return None if addr is None else str(addr)


class StreamClient(_StreamLink):
    """Connects to a :class:`StreamServer`, initiates handshakes, reconnects with backoff."""

    def __init__(
        self,
        host: str,
        port: int,
        channel: Channel,
        sink: FrameSink,
        *,
        policy: RekeyPolicy | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(channel, sink, policy=policy)
        self.host = host
        self.port = port
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout

    async def open(self) -> None:
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stats = self.sink.stats
        while True:
            stats.state = TunnelState.CONNECTING
            conn: _Conn | None = None
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, proto = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
                conn = proto
                async with asyncio.timeout(self.policy.rekey_timeout):
                    await conn.ready
                self.backoff.reset()
                log.info("stream_up", server=f"{self.host}:{self.port}")
                await conn.closed
            except (OSError, TransportError) as exc:
                log.debug("stream_connect_failed", server=f"{self.host}:{self.port}", error=str(exc))
            except TimeoutError:
                if conn is not None:
                    stats.handshakes_failed += 1
                    log.warning("stream_handshake_timeout", server=f"{self.host}:{self.port}")
                    conn.abort()
            finally:
                if conn is not None and conn.transport is not None:
                    conn.abort()
            await asyncio.sleep(self.backoff.next())

    def on_connected(self, conn: _Conn) -> None:
        self.channel.reset()
        if not self.channel.encrypted:
            self._activate(conn)
            return
        self.sink.stats.state = TunnelState.HANDSHAKING
        conn.send_message(self.channel.begin_handshake())

    def on_handshake(self, conn: _Conn, msg: bytes) -> None:
        stats = self.sink.stats
        try:
            self.channel.handle_handshake(msg)
        except HandshakeError as exc:
            stats.handshakes_failed += 1
            log.warning("stream_handshake_failed", server=_fmt(conn.peername), error=str(exc))
            conn.abort()
            return
        stats.handshakes += 1
        stats.last_handshake = time.time()
        if conn is not self.conn:
            self._activate(conn)
        if self.fast is not None:
            self.fast.sync()  # seal under the new session from now on
        stats.state = TunnelState.UP
        self._send_keepalive()  # confirms the new session to the responder
        if self.fast is None:
            asyncio.get_running_loop().call_soon(self.engage, conn)

    def tick(self) -> None:
        ch = self.channel
        fast = self.fast
        if fast is not None:
            fast.tick()
        ch.expire()
        if fast is not None:
            fast.sync()
        conn = self.conn
        if conn is None or not ch.encrypted or not ch.ready:
            return
        if fast is None:
            self.engage(conn)
        if ch.handshake_overdue():
            log.warning("stream_rekey_unanswered", server=f"{self.host}:{self.port}")
            conn.abort()
        elif ch.wants_handshake():
            self._send_handshake(conn, ch.begin_handshake())


class StreamServer(_StreamLink):
    """Listens for its peer; one authenticated connection carries the tunnel."""

    def __init__(
        self,
        host: str,
        port: int,
        channel: Channel,
        sink: FrameSink,
        *,
        policy: RekeyPolicy | None = None,
    ) -> None:
        super().__init__(channel, sink, policy=policy)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._pending: set[_Conn] = set()

    @property
    def bound_port(self) -> int:
        """The listening port (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise TransportError("not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Conn(self), self.host, self.port, reuse_address=True, family=socket.AF_UNSPEC
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.sink.stats.state = TunnelState.LISTENING
        log.info("stream_listening", address=f"{self.host}:{self.bound_port}")

    async def run(self) -> None:
        if self._server is None:
            await self.open()
        assert self._server is not None
        try:
            await asyncio.Event().wait()
        finally:
            self._server.close()
            for c in list(self._pending):
                c.abort()
            if self.conn is not None:
                self.conn.abort()

    def on_connected(self, conn: _Conn) -> None:
        if not self.channel.encrypted:
            self._activate(conn)
            return
        if len(self._pending) >= MAX_PENDING_ACCEPTS:
            self.sink.stats.drop(DropReason.QUEUE_FULL)
            conn.abort()
            return
        self._pending.add(conn)
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.policy.rekey_timeout, self._expire_pending, conn)

    def _expire_pending(self, conn: _Conn) -> None:
        if conn in self._pending:
            self._pending.discard(conn)
            self.sink.stats.handshakes_failed += 1
            suppressed = self.refusals.allow(time.monotonic())
            if suppressed is not None:
                log.warning("stream_handshake_timeout", peer=_fmt(conn.peername), suppressed=suppressed)
            conn.abort()

    def on_handshake(self, conn: _Conn, msg: bytes) -> None:
        stats = self.sink.stats
        try:
            reply = self.channel.handle_handshake(msg)
        except HandshakeError as exc:
            stats.handshakes_refused += 1
            suppressed = self.refusals.allow(time.monotonic())
            if suppressed is not None:
                log.warning(
                    "stream_handshake_refused",
                    peer=_fmt(conn.peername),
                    reason=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            conn.abort()
            return
        if reply is None:  # pragma: no cover - responders always reply
            raise DecodeError("responder produced no reply")
        stats.handshakes += 1
        stats.last_handshake = time.time()
        if conn is not self.conn:
            self._pending.discard(conn)
            self.channel.forget_established()
            self._activate(conn)
        if self.fast is not None:
            self.fast.sync()  # the native side must know the new session before the peer uses it
        self._send_handshake(conn, reply)
        if self.fast is None:
            asyncio.get_running_loop().call_soon(self.engage, conn)

    def on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        self._pending.discard(conn)
        was_active = conn is self.conn
        super().on_lost(conn, exc)
        if was_active:
            self.sink.stats.state = TunnelState.LISTENING

    def tick(self) -> None:
        fast = self.fast
        if fast is not None:
            fast.tick()
        self.channel.expire()
        if fast is not None:
            fast.sync()
        elif self.conn is not None:
            self.engage(self.conn)
        if self.conn is not None and self.channel.ready:
            self.sink.stats.state = TunnelState.UP
