"""Bridge MAC-table changes as they happen: netlink ``RTM_NEWNEIGH``/``RTM_DELNEIGH`` for ``AF_BRIDGE``.

The kernel bridge notifies every learn, every move of a MAC to another port and
every removal, so a flapping MAC is seen at once instead of between polls. The
socket is a plain non-blocking netlink socket parsed with :mod:`struct` (the
notification rate in a broadcast storm is far above what pyroute2's message
objects can parse); it must be opened in the switch's network namespace.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from .dataplane.errors import SwitchError

log = structlog.get_logger(__name__)

NETLINK_ROUTE = 0
RTMGRP_NEIGH = 0x4
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
AF_BRIDGE = 7
NDA_LLADDR = 2
NDA_MASTER = 9
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
SO_RCVBUFFORCE = 33
_NLMSG = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class FdbEvent:
    """One change of a bridge's forwarding database."""

    mac: str
    ifindex: int  # the port (or the bridge itself for its own addresses)
    master: int  # the bridge
    static: bool  # local, permanent or user-added: not learned
    deleted: bool


def parse(data: bytes | memoryview) -> Iterator[FdbEvent]:
    """The bridge FDB events in one netlink datagram (other messages are skipped)."""
    view = memoryview(data)
    off, end = 0, len(view)
    while off + _NLMSG.size <= end:
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(view, off)
        if length < _NLMSG.size or off + length > end:
            return
        if kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and length >= _NLMSG.size + _NDMSG.size:
            body = off + _NLMSG.size
            family, _p1, _p2, ifindex, state, _f, _t = _NDMSG.unpack_from(view, body)
            if family == AF_BRIDGE:
                mac = None
                master = 0
                a = body + _NDMSG.size
                stop = off + length
                while a + _RTA.size <= stop:
                    alen, atype = _RTA.unpack_from(view, a)
                    if alen < _RTA.size:
                        break
                    atype &= 0x3FFF
                    if atype == NDA_LLADDR and alen >= _RTA.size + 6:
                        mac = bytes(view[a + 4 : a + 10]).hex(":")
                    elif atype == NDA_MASTER and alen >= _RTA.size + 4:
                        master = _U32.unpack_from(view, a + 4)[0]
                    a += (alen + 3) & ~3
                if mac is not None:
                    yield FdbEvent(
                        mac, ifindex, master, bool(state & (NUD_NOARP | NUD_PERMANENT)), kind == RTM_DELNEIGH
                    )
        off += (length + 3) & ~3


class FdbWatcher:
    """A netlink socket subscribed to neighbour (bridge FDB) notifications."""

    def __init__(self, *, rcvbuf: int = 2 << 20) -> None:
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None
        self.overruns = 0
        self._buf = bytearray(64 * 1024)

    def open(self) -> None:
        """Open and subscribe (in the namespace of the bridges to watch).

        Raises:
            SwitchError: netlink refused the socket.
        """
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, RTMGRP_NEIGH))
        except OSError as exc:
            raise SwitchError(f"cannot watch bridge MAC tables: {exc}") from exc
        self.sock = sock

    def fileno(self) -> int:
        assert self.sock is not None, "open() first"
        return self.sock.fileno()

    def read(self, budget: int = 256) -> list[FdbEvent]:
        """Up to ``budget`` datagrams' worth of events (never blocks; overruns are counted)."""
        assert self.sock is not None, "open() first"
        out: list[FdbEvent] = []
        view = memoryview(self._buf)
        for _ in range(budget):
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped notifications: a storm
                    self.overruns += 1
                    continue
                raise
            out.extend(parse(view[:n]))
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
