"""VNA data plane: authenticated, encrypted layer-2 tunnels between overlay bridges.

Public surface::

    Tunnel, TunnelConfig, TunnelMode, Role        one tunnel endpoint (TAP + link + codec + counters)
    StaticKeyPair, PublicKey, Peer, PeerAllowList identities and the allow-list
    RekeyPolicy                                   session lifetimes and limits
    Switch, FdbEntry                              the overlay's Linux bridge
    KernelVxlan, VxlanSpec                        kernel VXLAN for trusted links
    MtuReport, mtu_report                         overlay MTU per tunnel kind
    TunnelStats, TunnelState, FlowHook            counters and the per-flow hook
    DataplaneError (and subclasses in .errors)    the error tree

Sans-IO cores (:mod:`.handshake`, :mod:`.record`, :mod:`.session`,
:mod:`.plain`) are importable on their own; see README.md for the wire
formats and the WireGuard comparison.
"""

from __future__ import annotations

from .errors import DataplaneError
from .keys import Peer, PeerAllowList, PublicKey, StaticKeyPair
from .link import Backoff
from .mtu import MtuReport
from .mtu import report as mtu_report
from .session import RekeyPolicy
from .stats import FlowHook, TunnelState, TunnelStats
from .switch import FdbEntry, Switch
from .tunnel import Role, Tunnel, TunnelConfig, TunnelMode
from .vxlan import KernelVxlan, VxlanSpec

__all__ = [
    "Backoff",
    "DataplaneError",
    "FdbEntry",
    "FlowHook",
    "KernelVxlan",
    "MtuReport",
    "Peer",
    "PeerAllowList",
    "PublicKey",
    "RekeyPolicy",
    "Role",
    "StaticKeyPair",
    "Switch",
    "Tunnel",
    "TunnelConfig",
    "TunnelMode",
    "TunnelState",
    "TunnelStats",
    "VxlanSpec",
    "mtu_report",
]
