"""Datagram tunnel over UDP (inside a data center).

Wire, one UDP payload each:

* handshake messages as they are (retransmitted by the initiator with
  backoff until answered);
* a record that fits one datagram, as it is (``DATA``/``PLAIN``);
* a bigger record split into ``PIECE`` messages::

      type=6 | piece index | piece count | 0 | receiver index (4)
      | counter low 32 bits (4) | byte offset in the record (4) | record bytes

  All pieces but the last are the same size, so one ``sendmsg`` with
  ``UDP_SEGMENT`` (GSO) sends a run of them; the receiver enables
  ``UDP_GRO`` and gets runs back in one ``recvmsg`` with the segment size
  in a control message. The record (and its AEAD tag) is checked only once
  reassembled. IP fragmentation is never used (DF is set, pieces are sized
  from the path MTU).

**Loss:** one lost piece loses the whole record; with TSO superpackets that
is up to 64 KiB of inner TCP data, which the inner TCP then retransmits.
Partial records are dropped (counter ``incomplete``) when they age out or
when more than ``MAX_PARTIALS`` are open.

**Untrusted pieces:** a piece opens reassembly state only if its receiver
index names a session and its counter may still open (the replay window's
``check_low32``); its offset must be ``idx * piece_len``, all pieces but the
last the same length, the last no longer; the record is exactly the bytes its
pieces carried and its own header must name the same index and counter, so
no forged piece buys more AEAD work than the bytes it carries. Partials are
keyed by source address and split geometry as well, so a forged piece from
elsewhere or with another count/length cannot block the genuine record; a
duplicate piece is a counted drop (``replay``).

Each side sends an empty keepalive record when it has sent nothing for
``policy.keepalive`` seconds; the initiator re-handshakes when it has heard
nothing for ``2 * keepalive + rekey_timeout``. The responder learns (and
follows, on every authenticated record) the initiator's address.

Once the channel has keys and the peer's address is known, the link hands
the socket and the TAP to the native fast path (:mod:`.fastpath`) when it is
built: it seals, splits, reassembles and opens exactly as here, handshakes
come back as events, and Python still sends handshakes itself (a datagram is
atomic) while keepalives go through the fast path (it owns the counters).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import struct
import time
from collections import deque
from typing import Any

import structlog

from .errors import HandshakeError, LinkDown, RecordError, TransportError
from .fastpath import FastPath
from .link import Backoff, FrameSink, LogLimiter, set_buffers
from .mtu import max_datagram
from .session import Channel, RekeyPolicy, SecureChannel
from .stats import DropReason, TunnelState
from .wire import MAX_RECORD, PIECE_HEADER, RECORD_HEADER, MsgType

log = structlog.get_logger("vna_agent.dataplane.datagram")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU = 14
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU = 24
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65000
MAX_PIECES = 255
MAX_PARTIALS = 16
#: No piece is longer than the largest UDP payload over IPv4 minus its header.
MAX_PIECE_LEN = 65507 - PIECE_HEADER.size
PARTIAL_TTL = 1.0
RX_BATCH = 64
SOCKET_BUFFER = 8 << 20
_PIECE = int(MsgType.PIECE)
_DATA = int(MsgType.DATA)
_PLAIN = int(MsgType.PLAIN)
_INIT = int(MsgType.INITIATION)
_RESP = int(MsgType.RESPONSE)
_PH = PIECE_HEADER.size
_ANC = socket.CMSG_SPACE(4)
_EMPTY = memoryview(b"")
_UP = TunnelState.UP
_MSG_TRUNC = int(socket.MSG_TRUNC)  # the IntFlag's __and__ costs microseconds per datagram

Address = tuple[Any, ...]


@functools.cache
def _packer(count: int) -> struct.Struct:
    """One struct for all piece headers of a record: one C call instead of one per piece."""
    return struct.Struct("!" + PIECE_HEADER.format.lstrip("!") * count)


def _header_matches(rec: memoryview, key: PartialKey) -> bool:
    """The reassembled record's own header names the receiver and counter its pieces did."""
    if len(rec) < RECORD_HEADER.size:
        return False
    _, _, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
    return bool(receiver == key[1] and counter & 0xFFFFFFFF == key[2])


def _fmt(addr: Address | None) -> str | None:
    return f"{addr[0]}:{addr[1]}" if addr else None


#: A partial record: (source address, receiver index, counter low 32 bits, piece count, piece length).
PartialKey = tuple[Any, int, int, int, int]


def piece_length(idx: int, count: int, off: int, n: int) -> int:
    """The record's piece length implied by one piece, or 0 if the piece cannot be part of a sane split.

    Every piece but the last is ``L`` bytes at offset ``idx * L``; the last is
    1..L bytes at ``(count - 1) * L``; the record fits ``MAX_RECORD``. So a
    record's bytes are exactly the bytes its pieces carry (no sparse offsets,
    no uncovered buffer bytes).
    """
    if count < 2 or idx >= count or not 0 < n <= MAX_PIECE_LEN:
        return 0
    if idx < count - 1:
        plen = n
        if off != idx * plen:
            return 0
    else:
        plen, rest = divmod(off, idx)
        if rest or n > plen or plen > MAX_PIECE_LEN:
            return 0
    if (count - 1) * plen >= MAX_RECORD or (idx == count - 1 and off + n > MAX_RECORD):
        return 0
    return plen


class _Partial:
    __slots__ = ("buf", "count", "covered", "created", "got", "mask", "mv", "size")

    def __init__(self, buf: bytearray, count: int) -> None:
        self.buf = buf
        self.mv = memoryview(buf)
        self.count = count
        self.got = 0
        self.mask = 0
        self.size = -1
        self.covered = 0
        self.created = time.monotonic()


class DatagramLink:
    """UDP endpoint for one peer (see module docstring).

    Args:
        channel: record codec (secure or plain).
        sink: the tunnel.
        bind: local (host, port) to bind; port 0 for any.
        remote: the server's (host, port) for the initiating side; ``None`` on the server.
        path_mtu: underlay path MTU; ``None`` asks the kernel (connected socket) or assumes 1500.
        gso / gro: use UDP_SEGMENT / UDP_GRO when the kernel has them.
    """

    def __init__(
        self,
        channel: Channel,
        sink: FrameSink,
        *,
        bind: tuple[str, int] = ("0.0.0.0", 0),
        remote: tuple[str, int] | None = None,
        policy: RekeyPolicy | None = None,
        path_mtu: int | None = None,
        gso: bool = True,
        gro: bool = True,
    ) -> None:
        self.channel = channel
        self.sink = sink
        self.bind = bind
        self.remote = remote
        self.policy = policy or RekeyPolicy()
        self.initiator = remote is not None
        self._cfg_mtu = path_mtu
        self.gso = gso
        self.gro = gro
        self.sock: socket.socket | None = None
        self.peer: Address | None = None
        self._ipv6 = False
        self.path_mtu = path_mtu or 1500
        self._max_dgram = 0
        self._chunk = 0
        self._rec = bytearray(MAX_RECORD)
        self._rec_mv = memoryview(self._rec)
        self._ph = bytearray(_PH * MAX_PIECES)
        self._ph_mv = memoryview(self._ph)
        self._rx = bytearray(1 << 17)
        self._rx_mv = memoryview(self._rx)
        self._partials: dict[PartialKey, _Partial] = {}
        self._src_slices: dict[int, list[memoryview]] = {}
        self._iov_template: list[memoryview] = []
        self._hdr_args: list[int] = []
        self._pool: list[bytearray] = []
        self._queue: deque[tuple[bytes, int, Address | None]] = deque()
        self._writer = False
        self._last_tx = 0.0
        self._last_rx = 0.0
        self._hs_backoff = Backoff(initial=0.25, maximum=self.policy.rekey_timeout, jitter=0.2)
        self._next_hs = 0.0
        self._refusals = LogLimiter()  # refused handshakes: counted always, logged once a second
        self.fast: FastPath | None = None
        self._set_mtu(self.path_mtu)

    # -- setup -------------------------------------------------------------------

    def _set_mtu(self, mtu: int) -> None:
        self.path_mtu = mtu
        self._max_dgram = max_datagram(mtu, ipv6=self._ipv6)
        chunk = self._chunk = self._max_dgram - _PH
        if chunk <= 0:
            return
        # Per-piece work is the datagram path's cost: precompute the sendmsg
        # vector (header slot, record slice, ...) and the header fields.
        phv, rec = self._ph_mv, self._rec_mv
        npieces = min(MAX_PIECES, -(-MAX_RECORD // chunk))
        self._iov_template = [
            v for i in range(npieces) for v in (phv[i * _PH : (i + 1) * _PH], rec[i * chunk : (i + 1) * chunk])
        ]
        self._hdr_args = [v for i in range(npieces) for v in (_PIECE, i, 0, 0, 0, 0, i * chunk)]
        if self.fast is not None and chunk > 0:
            self.fast.set_chunk(chunk)

    @property
    def bound_port(self) -> int:
        if self.sock is None:
            raise TransportError("not bound")
        return int(self.sock.getsockname()[1])

    async def open(self) -> None:
        """Create, tune and bind the socket; start reading."""
        host = self.remote[0] if self.remote else self.bind[0]
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        family = infos[0][0]
        self._ipv6 = family == socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            set_buffers(sock, SOCKET_BUFFER)
            if self._ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            if self.gro:
                try:
                    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                except OSError:
                    self.gro = False
            bind_host = self.bind[0] if not (self._ipv6 and self.bind[0] == "0.0.0.0") else "::"
            sock.bind((bind_host, self.bind[1]))
            if self.remote is not None:
                sock.connect(self.remote)
                self.peer = sock.getpeername()
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot set up UDP socket: {exc}") from exc
        self.sock = sock
        if self.remote is not None and self._cfg_mtu is None:
            self._refresh_mtu()
        else:
            self._set_mtu(self.path_mtu)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
        st = self.sink.stats
        st.state = TunnelState.HANDSHAKING if self.initiator else TunnelState.LISTENING
        if self.initiator:  # do not wait for the first tick
            if self.channel.encrypted:
                self._send_handshake(self.channel.begin_handshake())
                self._next_hs = time.monotonic() + self._hs_backoff.next()
            else:
                self._send_keepalive()
                self._next_hs = time.monotonic() + self._hs_backoff.next()
        log.info(
            "datagram_open",
            local=_fmt(sock.getsockname()),
            remote=_fmt(self.remote),
            path_mtu=self.path_mtu,
            gso=self.gso,
            gro=self.gro,
        )

    def _refresh_mtu(self) -> None:
        if self.sock is None:
            return
        try:
            if self._ipv6:
                mtu = self.sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            else:
                mtu = self.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
        except OSError:
            return
        if self._cfg_mtu is not None:
            mtu = min(mtu, self._cfg_mtu)
        if mtu != self.path_mtu or not self._chunk:
            log.info("datagram_path_mtu", mtu=mtu)
        self._set_mtu(mtu)

    async def run(self) -> None:
        if self.sock is None:
            await self.open()
        try:
            await asyncio.Event().wait()
        finally:
            self.close()

    # -- native fast path --------------------------------------------------------

    def engage(self) -> None:
        """Hand the socket and the TAP to the fast path once keyed and the peer is known."""
        ch, sock, peer = self.channel, self.sock, self.peer
        if self.fast is not None or sock is None or peer is None or self._queue or self._chunk <= 0:
            return
        if not isinstance(ch, SecureChannel) or not ch.session_table():
            return
        fast = self.sink.fast_path(
            sock.fileno(),
            stream=False,
            on_message=self._fast_message,
            on_closed=lambda err: None,
            on_peer=self._fast_peer,
            on_msgsize=self._fast_msgsize,
            chunk=self._chunk,
            gso=self.gso,
        )
        if fast is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        fast.set_peer(peer)
        self.fast = fast
        fast.start()
        log.info("datagram_fastpath_engaged", peer=_fmt(peer))

    def disengage(self) -> None:
        """Stop the fast path (idempotent); the Python data path takes over."""
        fast = self.fast
        if fast is None:
            return
        self.fast = None
        fast.stop()
        self.sink.fast_path_ended()
        if self.sock is not None:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    def _fast_message(self, msg: bytes, addr: Address) -> None:
        self._last_rx = time.monotonic()  # as on the Python path: any datagram shows the peer is alive
        self._on_datagram(memoryview(msg), addr)

    def _fast_msgsize(self) -> None:
        if self.initiator:
            self._refresh_mtu()
        elif self.peer is not None:  # an unconnected responder socket cannot tell its path MTU
            self._probe_mtu(self.peer)

    def _fast_peer(self, addr: Address) -> None:
        if not self.initiator:
            self._learn_peer(addr)

    def close(self) -> None:
        self.disengage()
        if self.sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.sock.fileno())
            if self._writer:
                loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def abort(self) -> None:
        """Forget the sessions (the next tick re-handshakes)."""
        self.channel.reset()
        if self.fast is not None:
            self.fast.sync()

    def info(self) -> dict[str, object]:
        return {
            "peer": _fmt(self.peer),
            "path_mtu": self.path_mtu,
            "gso": self.gso,
            "gro": self.gro,
            "partials": len(self._partials),
        }

    # -- sending -----------------------------------------------------------------

    def send_frame(self, frame: memoryview, flags: int) -> None:
        if self.peer is None:
            raise LinkDown("peer address not known yet")
        n = self.channel.seal_into(frame, flags, self._rec_mv)
        if n <= self._max_dgram:
            self._send([self._rec_mv[:n]], 0)
        else:
            self._send_split(n)

    def flush(self) -> None:
        return None

    def _send(self, bufs: list[memoryview], seg: int) -> None:
        sock = self.sock
        if sock is None:
            raise LinkDown("socket closed")
        if self._queue:
            self._enqueue(bufs, seg)
            return
        anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))] if seg else []
        try:
            if self.initiator:
                sock.sendmsg(bufs, anc)
            else:
                sock.sendmsg(bufs, anc, 0, self.peer)
        except BlockingIOError:
            self._enqueue(bufs, seg)
            return
        except OSError as exc:
            if seg and exc.errno == errno.EINVAL:  # GSO refused for this path: send pieces one by one
                log.warning("datagram_gso_disabled", error=str(exc))
                self.gso = False
            self._send_error(exc)
            return
        self._last_tx = time.monotonic()

    def _send_error(self, exc: OSError) -> None:
        st = self.sink.stats
        if exc.errno == errno.EMSGSIZE:
            st.drop(DropReason.TOO_BIG)
            self._refresh_mtu()
        elif exc.errno == errno.ENOBUFS:
            st.drop(DropReason.QUEUE_FULL)
        elif exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            st.drop(DropReason.LINK_DOWN)
        else:
            st.drop(DropReason.DECODE)
            log.warning("datagram_send_failed", error=str(exc))

    def _enqueue(self, bufs: list[memoryview], seg: int) -> None:
        if len(self._queue) >= 256:
            self.sink.stats.drop(DropReason.QUEUE_FULL)
            return
        self._queue.append((b"".join(bufs), seg, self.peer))
        if not self._writer and self.sock is not None:
            self._writer = True
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._on_writable)
            self.sink.pause_device()

    def _on_writable(self) -> None:
        sock = self.sock
        q = self._queue
        while q and sock is not None:
            data, seg, peer = q[0]
            anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))] if seg else []
            try:
                if self.initiator:
                    sock.sendmsg([data], anc)
                else:
                    sock.sendmsg([data], anc, 0, peer)
            except BlockingIOError:
                return
            except OSError as exc:
                self._send_error(exc)
            q.popleft()
        if sock is not None:
            asyncio.get_running_loop().remove_writer(sock.fileno())
        self._writer = False
        self.sink.resume_device()

    def _send_split(self, n: int) -> None:
        rec = self._rec_mv
        chunk = self._chunk
        count = -(-n // chunk)
        if count > MAX_PIECES or chunk <= 0:
            self.sink.stats.drop(DropReason.TOO_BIG)
            return
        _, _, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
        args = self._hdr_args[: 7 * count]
        args[2::7] = [count] * count
        args[4::7] = [receiver] * count
        args[5::7] = [counter & 0xFFFFFFFF] * count
        packer = _packer(count)
        packer.pack_into(self._ph, 0, *args)
        iov = self._iov_template[: 2 * count]
        iov[-1] = rec[(count - 1) * chunk : n]
        seg = _PH + chunk
        if self.gso:
            per = max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // seg))
            for b in range(0, count, per):
                e = min(count, b + per)
                self._send(iov[2 * b : 2 * e], seg if e - b > 1 else 0)
        else:
            for i in range(count):
                self._send(iov[2 * i : 2 * i + 2], 0)

    def _send_handshake(self, msg: bytes) -> None:
        self._send([memoryview(msg)], 0)

    def _send_keepalive(self) -> None:
        if self.fast is not None:
            self.fast.send_keepalive()
            self._last_tx = time.monotonic()
            return
        try:
            self.send_frame(_EMPTY, 0)
        except RecordError as exc:
            self.sink.stats.drop(exc.reason)
            return
        self.sink.stats.keepalives_out += 1

    # -- receiving ---------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        rx, rxv = self._rx, self._rx_mv
        for _ in range(RX_BATCH):
            try:
                nbytes, anc, mflags, addr = sock.recvmsg_into([rx], _ANC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable on a connected socket
                if exc.errno == errno.EMSGSIZE:
                    self._refresh_mtu()
                continue
            if mflags & _MSG_TRUNC:
                self.sink.stats.drop(DropReason.TOO_BIG)
                continue
            self._last_rx = time.monotonic()
            seg = nbytes
            for level, typ, data in anc:
                if level == SOL_UDP and typ == UDP_GRO:
                    seg = struct.unpack("=i", data[:4])[0] or nbytes
            if seg >= nbytes:
                self._on_datagram(rxv[:nbytes], addr)
            elif not self._on_run(nbytes, seg, addr):
                for off in range(0, nbytes, seg):
                    self._on_datagram(rxv[off : min(off + seg, nbytes)], addr)

    def _on_run(self, nbytes: int, seg: int, addr: Address) -> bool:
        """Fast path for a GRO batch of consecutive pieces of one record; False: take the slow path.

        Only the first and last piece headers are checked; the pieces in
        between came from the same GSO send. Should that ever be wrong the
        reassembled record fails its AEAD tag and is dropped.
        """
        rx, rxv = self._rx, self._rx_mv
        typ, idx0, count, _, receiver, seq, off0 = PIECE_HEADER.unpack_from(rx, 0)
        n = -(-nbytes // seg)
        last = (n - 1) * seg
        chunk = seg - _PH
        if typ != _PIECE or nbytes - last <= _PH:
            return False
        t2, idx2, count2, _, receiver2, seq2, off2 = PIECE_HEADER.unpack_from(rx, last)
        if (
            t2 != _PIECE
            or idx2 != idx0 + n - 1
            or count2 != count
            or receiver2 != receiver
            or seq2 != seq
            or off2 != off0 + (n - 1) * chunk
            or idx2 >= count
        ):
            return False
        last_n = nbytes - last - _PH
        if off0 != idx0 * chunk or (last_n != chunk if idx2 < count - 1 else last_n > chunk):
            return False  # not a run of one sane split: each piece is judged on its own
        end = off0 + (n - 1) * chunk + last_n
        if end > MAX_RECORD or (count - 1) * chunk >= MAX_RECORD:
            return False
        key = (addr, receiver, seq, count, chunk)
        p = self._partials.get(key)
        run_mask = ((1 << n) - 1) << idx0
        if p is None:
            try:
                self.channel.check_piece(receiver, seq)
            except RecordError:
                return False  # the slow path counts each refused piece
            p = self._new_partial(key, count)
        elif p.mask & run_mask:
            return False
        buf = p.buf
        o = off0
        src = self._src_slices.get(seg)
        if src is None:
            if len(self._src_slices) >= 4:  # a peer's path has one or two sizes; junk must not fill memory with views
                self._src_slices.clear()
            src = self._src_slices[seg] = [rxv[k + _PH : k + seg] for k in range(0, len(rx) - seg + 1, seg)]
        for i in range(n - 1):
            buf[o : o + chunk] = src[i]
            o += chunk
        buf[o:end] = rxv[last + _PH : nbytes]
        p.mask |= run_mask
        p.got += n
        p.covered += end - off0
        if idx2 == count - 1:
            p.size = end
        self._maybe_complete(key, p, addr)
        return True

    def _on_datagram(self, dg: memoryview, addr: Address) -> None:
        if not len(dg):  # an empty UDP payload is junk like any other: counted
            self.sink.stats.drop(DropReason.DECODE)
            return
        typ = dg[0]
        if typ == _PIECE:
            self._on_piece(dg, addr)
        elif typ in (_DATA, _PLAIN):
            self._on_record(dg, addr)
        elif typ in (_INIT, _RESP):
            self._on_handshake(bytes(dg), addr)
        else:
            self.sink.stats.drop(DropReason.DECODE)

    def _on_record(self, record: memoryview, addr: Address) -> None:
        try:
            payload, flags = self.channel.open(record)
        except RecordError as exc:
            self.sink.stats.drop(exc.reason)
            return
        if not self.initiator and addr != self.peer:
            self._learn_peer(addr)
        st = self.sink.stats
        if st.state is not _UP:
            st.state = TunnelState.UP
        self.sink.deliver(payload, flags)

    def _on_piece(self, dg: memoryview, addr: Address) -> None:
        st = self.sink.stats
        n = len(dg) - _PH
        if n <= 0:
            st.drop(DropReason.DECODE)
            return
        _, idx, count, _, receiver, seq, off = PIECE_HEADER.unpack_from(dg)
        plen = piece_length(idx, count, off, n)
        if not plen:
            st.drop(DropReason.DECODE)
            return
        # The geometry and the source are part of the key: a forged piece with another
        # count or length, or from another address, cannot block the genuine record.
        key = (addr, receiver, seq, count, plen)
        p = self._partials.get(key)
        if p is None:
            if not self._admit(receiver, seq):
                return
            p = self._new_partial(key, count)
        bit = 1 << idx
        if p.mask & bit:
            st.drop(DropReason.REPLAY)  # duplicate piece
            return
        p.mask |= bit
        p.got += 1
        p.covered += n
        p.buf[off : off + n] = dg[_PH:]
        if idx == count - 1:
            p.size = off + n
        self._maybe_complete(key, p, addr)

    def _admit(self, receiver: int, seq: int) -> bool:
        """Whether a piece may open reassembly state: known receiver index, counter still in window."""
        try:
            self.channel.check_piece(receiver, seq)
        except RecordError as exc:
            self.sink.stats.drop(exc.reason)
            return False
        return True

    def _new_partial(self, key: PartialKey, count: int) -> _Partial:
        """A partial record for ``key``; the oldest one is dropped (incomplete) when too many are open."""
        parts = self._partials
        if len(parts) >= MAX_PARTIALS:
            self._pool.append(parts.pop(next(iter(parts))).buf)
            self.sink.stats.drop(DropReason.INCOMPLETE)
        p = parts[key] = _Partial(self._pool.pop() if self._pool else bytearray(MAX_RECORD), count)
        return p

    def _maybe_complete(self, key: PartialKey, p: _Partial, addr: Address) -> None:
        """Open the record once every piece is in; its buffer goes back to the pool."""
        if p.got != p.count:
            return
        del self._partials[key]
        try:
            rec = p.mv[: p.size]
            if p.covered != p.size or not _header_matches(rec, key):
                self.sink.stats.drop(DropReason.DECODE)
                return
            self._on_record(rec, addr)
        finally:
            self._pool.append(p.buf)

    def _on_handshake(self, msg: bytes, addr: Address) -> None:
        st = self.sink.stats
        ch = self.channel
        try:
            reply = ch.handle_handshake(msg)
        except HandshakeError as exc:
            if self.initiator:
                st.handshakes_failed += 1
            else:
                st.handshakes_refused += 1
            suppressed = self._refusals.allow(time.monotonic())
            if suppressed is not None:
                log.warning(
                    "datagram_handshake_refused",
                    peer=_fmt(addr),
                    reason=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            return
        st.handshakes += 1
        st.last_handshake = time.time()
        if self.fast is not None:
            self.fast.sync()  # the native side must know a new session before the peer uses it
        if reply is not None:
            self._learn_peer(addr)
            self._send_handshake(reply)
            if self.fast is None:
                asyncio.get_running_loop().call_soon(self.engage)
            return
        self._hs_backoff.reset()
        st.state = TunnelState.UP
        log.info("datagram_up", peer=_fmt(addr))
        self._send_keepalive()  # confirms the session to the responder
        if self.fast is None:
            asyncio.get_running_loop().call_soon(self.engage)

    def _learn_peer(self, addr: Address) -> None:
        if addr != self.peer:
            log.info("datagram_peer", peer=_fmt(addr), previous=_fmt(self.peer))
            self.peer = addr
            self.sink.stats.connects += 1
            if self.fast is not None:
                self.fast.set_peer(addr)
            self._probe_mtu(addr)
            if not self.channel.encrypted:
                self._send_keepalive()  # tells a plain client it has been heard

    def _probe_mtu(self, addr: Address) -> None:
        if self._cfg_mtu is not None:
            return
        fam = socket.AF_INET6 if self._ipv6 else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(addr)
                opt = (socket.IPPROTO_IPV6, IPV6_MTU) if self._ipv6 else (socket.IPPROTO_IP, IP_MTU)
                self._set_mtu(probe.getsockopt(*opt))
            except OSError:
                pass

    # -- timers -----------------------------------------------------------------

    def tick(self) -> None:
        ch = self.channel
        fast = self.fast
        if fast is not None:
            fast.tick()
            native = fast.native_stats()
            self._last_rx = max(self._last_rx, native["last_rx"])
            self._last_tx = max(self._last_tx, native["last_tx"])
        ch.expire()
        if fast is not None:
            fast.sync()
        else:
            self.engage()
        now = time.monotonic()
        p = self.policy
        st = self.sink.stats
        if fast is not None and ch.ready and self._last_rx and st.state is not _UP:
            st.state = TunnelState.UP  # records are opened natively
        if self._partials:
            for key in [k for k, v in self._partials.items() if now - v.created > PARTIAL_TTL]:
                self._pool.append(self._partials.pop(key).buf)
                st.drop(DropReason.INCOMPLETE)
        if self.initiator and ch.encrypted:
            silent = ch.ready and now - self._last_rx > 2 * p.keepalive + p.rekey_timeout
            if not ch.ready or silent or ch.wants_handshake():
                if now >= self._next_hs:
                    if silent:
                        log.warning("datagram_peer_silent", seconds=round(now - self._last_rx, 1))
                    self._send_handshake(ch.begin_handshake())
                    self._next_hs = now + self._hs_backoff.next()
            elif self._next_hs:
                self._next_hs = 0.0
                self._hs_backoff.reset()
        if ch.ready and self.peer is not None:
            if self.initiator and not ch.encrypted and not self._last_rx:
                if now >= self._next_hs:  # plain: announce ourselves until the server answers
                    self._send_keepalive()
                    self._next_hs = now + self._hs_backoff.next()
            elif now - self._last_tx >= p.keepalive:
                self._send_keepalive()
