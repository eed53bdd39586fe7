"""TAP devices: the tunnel's port on the overlay bridge.

With offloads (the default) the TAP is opened ``IFF_TAP|IFF_NO_PI|IFF_VNET_HDR``
with a 10-byte virtio_net_hdr and ``TUNSETOFFLOAD`` CSUM|TSO4|TSO6|TSO_ECN:
the bridge then hands the TAP whole TCP superpackets (GSO, up to 64 KiB,
checksum not yet filled in) and one read returns ``virtio_net_hdr + frame``.
The far side writes that back unchanged into a TAP opened the same way and
the kernel segments (or passes the superpacket on to a GSO-capable veth).
Without offloads every read is one wire-sized frame.

Devices are non-persistent: the kernel removes the interface when the fd
closes, so a crashed endpoint leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from typing import Protocol

from .errors import DeviceError
from .wire import VNET_HDR

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
VNET_HDR_LEN = VNET_HDR.size
IFNAMSIZ = 16


class FrameDevice(Protocol):
    """A non-blocking fd that reads and writes one L2 frame per call."""

    name: str
    fd: int
    vnet_hdr: bool

    def close(self) -> None: ...


class TapDevice:
    """An open TAP interface (see module docstring).

    Use :meth:`open`; attach it to a bridge with
    :meth:`vna_agent.dataplane.switch.Switch.add_port`.
    """

    def __init__(self, name: str, fd: int, vnet_hdr: bool) -> None:
        self.name = name
        self.fd = fd
        self.vnet_hdr = vnet_hdr

    @classmethod
    def open(cls, name: str, *, offload: bool = True) -> TapDevice:
        """Create TAP ``name`` in the caller's network namespace.

        Raises:
            DeviceError: no /dev/net/tun, no permission, bad name, ioctl refused.
        """
        if not name or len(name) >= IFNAMSIZ:
            raise DeviceError(f"bad interface name {name!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"cannot open /dev/net/tun: {exc}") from exc
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            ifr = struct.pack("16sH22x", name.encode(), flags)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            if offload:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
            os.set_blocking(fd, False)
        except OSError as exc:
            os.close(fd)
            raise DeviceError(f"cannot set up TAP {name}: {exc}") from exc
        return cls(name, fd, offload)

    def set_carrier(self, up: bool) -> None:
        """Tell the bridge whether the port's far end is reachable (best effort)."""
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(up)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"TapDevice({self.name!r}, vnet_hdr={self.vnet_hdr})"


class PipeDevice:
    """In-memory twin of a TAP: one end of a SOCK_SEQPACKET pair.

    The tunnel uses ``fd``; tests read and write frames on :attr:`peer`.
    Message boundaries are kept, like a TAP's one-frame-per-read.
    """

    def __init__(self, name: str = "pipe", *, vnet_hdr: bool = False, bufsize: int = 4 << 20) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        a.setblocking(False)
        self._sock = a
        self.peer = b
        self.name = name
        self.fd = a.fileno()
        self.vnet_hdr = vnet_hdr

    def close(self) -> None:
        self._sock.close()
        self.peer.close()
        self.fd = -1
