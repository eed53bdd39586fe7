"""Bridge port flags and MAC-table flushes over a raw, synchronous netlink socket.

For loop protection, which must take a port out of forwarding *now*, in the middle
of a broadcast storm, from the data-plane thread: one ``RTM_NEWLINK`` with the port
attributes, answered by the kernel's ack in well under a millisecond, with no event
loop round trips (pyroute2's asyncio requests need several, and the loop is busy
during a storm). Call in the bridge's network namespace.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Mapping

from .errors import SwitchError

NETLINK_ROUTE = 0
RTM_NEWLINK = 16
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_F_NESTED = 0x8000
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
IFLA_BR_FDB_FLUSH = 21
IFLA_BRPORT_FLUSH = 24
#: The ``u8`` bridge port attributes (uapi ``if_link.h``).
BRPORT_U8 = {
    "learning": 8,
    "unicast_flood": 9,
    "multicast_router": 25,
    "mcast_flood": 27,
    "bcast_flood": 30,
    "locked": 39,
}
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_seq = itertools.count(1)


def _attr(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _request(ifindex: int, linkinfo: bytes, what: str) -> None:
    seq = next(_seq)
    body = _IFINFO.pack(0, 0, ifindex, 0, 0) + _attr(IFLA_LINKINFO | NLA_F_NESTED, linkinfo)
    msg = _NLMSG.pack(_NLMSG.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
            sock.settimeout(2.0)
            sock.bind((0, 0))
            sock.send(msg)
            while True:
                data = sock.recv(65536)
                off = 0
                while off + _NLMSG.size <= len(data):
                    length, kind, _flags, rseq, _pid = _NLMSG.unpack_from(data, off)
                    if length < _NLMSG.size:
                        break
                    if kind == NLMSG_ERROR and rseq == seq:
                        err = -_ERR.unpack_from(data, off + _NLMSG.size)[0]
                        if err:
                            raise SwitchError(f"cannot {what}: {os.strerror(err)}", details={"errno": err})
                        return
                    off += (length + 3) & ~3
    except OSError as exc:
        raise SwitchError(f"cannot {what}: {exc}") from exc


def set_port_flags(port: str, flags: Mapping[str, int], *, flush: bool = False) -> None:
    """Set ``u8`` bridge port attributes (:data:`BRPORT_U8`) of ``port`` in one message.

    ``flush`` also forgets the MACs learned on the port (after the flags are set, so with
    learning turned off none is learned again in between).

    Raises:
        SwitchError: unknown attribute, no such port, or the kernel refused.
    """
    unknown = set(flags) - set(BRPORT_U8)
    if unknown:
        raise SwitchError(f"unknown bridge port attributes {sorted(unknown)}")
    try:
        ifindex = socket.if_nametoindex(port)
    except OSError as exc:
        raise SwitchError(f"no interface {port}") from exc
    data = b"".join(_attr(BRPORT_U8[k], struct.pack("B", int(v))) for k, v in flags.items())
    if flush:
        data += _attr(IFLA_BRPORT_FLUSH, b"")
    info = _attr(IFLA_INFO_SLAVE_KIND, b"bridge\0") + _attr(IFLA_INFO_SLAVE_DATA | NLA_F_NESTED, data)
    _request(ifindex, info, f"set {sorted(flags)} on bridge port {port}")


def flush_bridge(bridge: str) -> None:
    """Forget every learned MAC of ``bridge`` (static and local entries stay).

    Raises:
        SwitchError: no such bridge, or the kernel refused.
    """
    try:
        ifindex = socket.if_nametoindex(bridge)
    except OSError as exc:
        raise SwitchError(f"no interface {bridge}") from exc
    info = _attr(IFLA_INFO_KIND, b"bridge\0") + _attr(IFLA_INFO_DATA | NLA_F_NESTED, _attr(IFLA_BR_FDB_FLUSH, b""))
    _request(ifindex, info, f"flush the MAC table of {bridge}")
