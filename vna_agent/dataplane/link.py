"""What a transport link and the tunnel see of each other, plus shared helpers.

A *link* (stream client/server, datagram endpoint) carries records to one
peer: it seals frames handed to :meth:`Link.send_frame`, and hands opened
payloads to its :class:`FrameSink` (the tunnel), which writes them to the
device. Backpressure goes the other way: a link whose socket is full calls
:meth:`FrameSink.pause_device` and later :meth:`FrameSink.resume_device`.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .stats import TunnelStats

if TYPE_CHECKING:
    from .fastpath import FastPath


class FrameSink(Protocol):
    """The tunnel side of a link."""

    @property
    def stats(self) -> TunnelStats:
        """The tunnel's counters."""

    def deliver(self, payload: memoryview, flags: int) -> None:
        """Write one opened payload to the device (empty payload = keepalive)."""

    def pause_device(self) -> None:
        """Stop reading frames from the device (the link is congested)."""

    def resume_device(self) -> None:
        """Read frames again."""

    def fast_path(
        self,
        sock_fd: int,
        *,
        stream: bool,
        on_message: Callable[[bytes, Any], None],
        on_closed: Callable[[int], None],
        on_peer: Callable[[Any], None] | None = None,
        on_msgsize: Callable[[], None] | None = None,
        chunk: int = 0,
        gso: bool = True,
    ) -> FastPath | None:
        """A native forwarding thread for the device and ``sock_fd`` (``None``: not available)."""

    def fast_path_ended(self) -> None:
        """The link stopped the fast path; the device is read in Python again."""


class Link(Protocol):
    """The transport side of a tunnel."""

    def send_frame(self, frame: memoryview, flags: int) -> None:
        """Seal and queue/send one frame; raises :class:`RecordError` subclasses when refused."""

    def flush(self) -> None:
        """Push queued records to the socket (end of a read batch)."""

    async def open(self) -> None:
        """Bind/prepare sockets (a server is listening when this returns)."""

    async def run(self) -> None:
        """Serve until cancelled (connect/accept, handshakes, reconnects)."""

    def tick(self) -> None:
        """Timers: rekey, expiry, keepalives (called a few times a second)."""

    def abort(self) -> None:
        """Drop the current peer connection (tests; recovery paths)."""

    def info(self) -> dict[str, object]:
        """Addresses and link-specific status."""


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter for reconnects.

    Delay n is ``min(maximum, initial * factor**n)`` scaled by a random
    factor in ``[1 - jitter, 1]`` so that many clients do not retry in step.
    """

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.3
    attempt: int = 0

    def next(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return base * (1.0 - self.jitter * random.random())

    def reset(self) -> None:
        self.attempt = 0


@dataclass(slots=True)
class LogLimiter:
    """At most one log line per ``interval`` seconds for an event any junk sender can trigger at line rate."""

    interval: float = 1.0
    suppressed: int = 0
    _next: float = 0.0

    def allow(self, now: float) -> int | None:
        """Whether to log now: the number of lines suppressed since the last one, or None (count it)."""
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        n, self.suppressed = self.suppressed, 0
        return n


def tune_tcp(sock: socket.socket, *, user_timeout_ms: int = 30_000) -> None:
    """Low latency and dead-peer detection on a tunnel's TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (
        (socket.TCP_KEEPIDLE, 10),
        (socket.TCP_KEEPINTVL, 5),
        (socket.TCP_KEEPCNT, 3),
        (socket.TCP_USER_TIMEOUT, user_timeout_ms),
    ):
        with contextlib.suppress(OSError):  # exotic kernels lack some
            sock.setsockopt(socket.IPPROTO_TCP, opt, val)


def set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for big socket buffers (forced past rmem_max/wmem_max when privileged)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
