"""The native fast path of an established tunnel link (``_fastpath.c``).

Why: every frame that crosses a VNA costs an event-loop wake-up and a few
hundred bytecodes in Python; on a small machine that adds about 0.1 ms per
VNA traversal, more idle latency than OpenVPN adds. Once a link has keys,
a :class:`FastPath` hands its TAP and socket to a native thread that seals,
sends, receives, checks and opens records without the GIL, in the same wire
format as :mod:`.record`, :mod:`.stream` and :mod:`.datagram`.

What stays in Python: connecting and accepting, handshakes (they arrive as
events and are answered through :meth:`FastPath.send_message`; the native side
passes up only initiations and responses of the exact size whose mac1 is keyed
by this node's public key, a few per drain and, from addresses other than the
peer's, a few per second), rekey
decisions (fed by :meth:`FastPath.tick` with the native session counters),
keepalive timing, status and per-flow statistics (sampled frame heads).

The extension is optional (built by ``setup.py`` when a C compiler and
OpenSSL headers exist); :func:`available` says whether it is there, and
``SKYFERRY_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import structlog

from .session import SecureChannel
from .stats import STATS_LOCK, Direction, FlowSampler, TunnelStats

log = structlog.get_logger("vna_agent.dataplane.fastpath")

try:
    from . import _fastpath  # type: ignore[attr-defined]
except ImportError:  # no compiler/OpenSSL headers at install time: pure-Python data path
    _fastpath = None

_COUNTERS = ("records_out", "bytes_out", "frames_out", "records_in", "bytes_in", "frames_in")
_COUNTERS_KA = ("keepalives_in", "keepalives_out")
_DIRECTIONS = {1: Direction.OUT, 2: Direction.IN}

Address = Any


def available() -> bool:
    """Whether the native fast path is built and not disabled (``SKYFERRY_FASTPATH=0``)."""
    return _fastpath is not None and os.environ.get("SKYFERRY_FASTPATH", "1") not in ("0", "false", "no", "off")


class FastPath:
    """One native forwarding thread for a link whose channel has keys.

    Args:
        tap_fd: the tunnel's TAP (non-blocking).
        sock_fd: the connected TCP socket (``stream``) or the UDP socket.
        stream: TCP framing (u32 length) or datagrams (pieces for big records).
        vnet: the TAP carries a virtio_net_hdr.
        channel: the session state; the native side gets its keys and windows.
        stats: the tunnel's counters, into which native counters are merged.
        on_message: a non-record message (handshake) arrived: ``(bytes, addr)``.
        on_closed: the stream ended or failed (errno, 0 for EOF).
        on_peer: datagram: an authenticated record came from a new address.
        on_msgsize: datagram: the kernel refused a datagram as too big (or a GSO send).
        sampler: per-flow statistics sink (frame heads, sampled natively).
        bundle_limit: payload bytes per bundle record.
        chunk: datagram: record bytes per piece (0: never split).
        gso: datagram: send runs of pieces with ``UDP_SEGMENT`` (falls back by itself if refused).
    """

    def __init__(
        self,
        *,
        tap_fd: int,
        sock_fd: int,
        stream: bool,
        vnet: bool,
        channel: SecureChannel,
        stats: TunnelStats,
        on_message: Callable[[bytes, Address], None],
        on_closed: Callable[[int], None],
        on_peer: Callable[[Address], None] | None = None,
        on_msgsize: Callable[[], None] | None = None,
        sampler: FlowSampler | None = None,
        bundle_limit: int = 32 * 1024,
        chunk: int = 0,
        gso: bool = True,
    ) -> None:
        if _fastpath is None:
            raise RuntimeError("the native fast path is not built")
        self.channel = channel
        self.stats = stats
        self._pump: Any = _fastpath.Pump(tap_fd, sock_fd, stream, vnet, bundle_limit, chunk, sampler is not None, gso)
        # Handshakes reach Python only with a mac1 keyed by this node's key (both message types are).
        self._pump.set_static(channel.local.public.raw)
        self._on_message = on_message
        self._on_closed = on_closed
        self._on_peer = on_peer
        self._on_msgsize = on_msgsize
        self._sampler = sampler
        self._seen: dict[str, int] = {}
        self._session_seen: dict[int, tuple[int, int, int, int, int]] = {}
        self._merge_lock = threading.Lock()  # status may be read from another thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = False

    # -- life cycle --------------------------------------------------------------

    def start(self, already_read: bytes = b"") -> None:
        """Install the sessions and start forwarding (``already_read``: stream bytes not yet parsed)."""
        if already_read:
            self._pump.feed(already_read)
        self.sync()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._pump.event_fd, self._drain)
        self._pump.start()
        self.running = True
        log.debug("fastpath_started")

    def stop(self) -> None:
        """Stop the thread, deliver what it queued, merge its counters (idempotent)."""
        if not self.running:
            return
        self.running = False
        if self._loop is not None:
            self._loop.remove_reader(self._pump.event_fd)
        self._pump.stop()
        self._drain()
        self.tick()

    # -- control -----------------------------------------------------------------

    def sync(self) -> None:
        """Push the channel's sessions (after a handshake or an expiry)."""
        self._pump.set_sessions(self.channel.session_table())

    def send_message(self, msg: bytes) -> bool:
        """A handshake message on the link, ordered after the records already sealed."""
        return bool(self._pump.send_message(msg))

    def send_keepalive(self) -> bool:
        """An empty record under the current session."""
        return bool(self._pump.send_keepalive())

    def set_peer(self, addr: Address) -> None:
        """Datagram: where records go (a socket address tuple, IPv6 scope included)."""
        self._pump.set_peer(str(addr[0]), int(addr[1]), *(int(v) for v in addr[2:4]))

    def set_chunk(self, chunk: int) -> None:
        """Datagram: record bytes per piece after a path MTU change."""
        self._pump.set_chunk(chunk)

    def native_stats(self) -> dict[str, Any]:
        """The native counters as they are (``last_rx``/``last_tx`` are monotonic seconds)."""
        return dict(self._pump.stats())

    def tick(self) -> None:
        """Merge counters into the channel (rekey decisions) and the tunnel stats; feed flow samples."""
        now: dict[int, tuple[int, int, int, int, int]] = self._pump.session_counters()
        deltas: dict[int, tuple[int, int, int, int, int]] = {}
        for idx, (counter, rs, bs, rr, br) in now.items():
            _, rs0, bs0, rr0, br0 = self._session_seen.get(idx, (0, 0, 0, 0, 0))
            deltas[idx] = (counter, rs - rs0, bs - bs0, rr - rr0, br - br0)
        self._session_seen = now
        self.channel.absorb_counters(deltas)
        self.merge_stats()
        self.flush_flows()

    def merge_stats(self) -> None:
        """Add what the native counters gained since the last merge to the tunnel stats."""
        with self._merge_lock:
            st = self._pump.stats()
            with STATS_LOCK:
                self._merge(st)

    def _merge(self, st: dict[str, Any]) -> None:
        """(STATS_LOCK held.)"""
        stats = self.stats
        drops = stats.drops
        for name in (*_COUNTERS, *_COUNTERS_KA):
            value = int(st[name])
            delta = value - self._seen.get(name, 0)
            if delta:
                setattr(stats, name, getattr(stats, name) + delta)
                self._seen[name] = value
        for reason, value in st["drops"].items():
            key = f"drop:{reason}"
            delta = int(value) - self._seen.get(key, 0)
            if delta:
                drops[reason] = drops.get(reason, 0) + delta
                self._seen[key] = int(value)

    def flush_flows(self) -> None:
        """Feed the frames sampled since the last call to the flow sampler (any thread)."""
        sampler = self._sampler
        if sampler is not None:
            for direction, vnet, length, segments, head in self._pump.flows():
                sampler(head, length, segments, bool(vnet), _DIRECTIONS[direction])

    # -- events --------------------------------------------------------------------

    def _drain(self) -> None:
        for event in self._pump.take():
            try:
                self._dispatch(*event)
            except Exception:  # one bad handler must not lose the events behind it
                log.exception("fastpath_event_failed", kind=event[0])

    def _dispatch(self, kind: int, value: int, data: bytes, addr: Address) -> None:
        if kind == _fastpath.EV_MESSAGE:
            self._on_message(data, addr)
        elif kind == _fastpath.EV_ROTATED:
            self.channel.promote(value)
            self.sync()
        elif kind == _fastpath.EV_CLOSED:
            self._on_closed(int(value))
        elif kind == _fastpath.EV_PEER and self._on_peer is not None:
            self._on_peer(addr)
        elif kind == _fastpath.EV_MSGSIZE and self._on_msgsize is not None:
            self._on_msgsize()
        elif kind == _fastpath.EV_DEVICE:
            log.error("device_read_failed", error=os.strerror(int(value)), path="native")
