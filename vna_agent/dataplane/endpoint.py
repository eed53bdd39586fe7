"""Run one tunnel endpoint by hand from a small YAML/JSON config.

Example (client side of an encrypted stream tunnel)::

    name: dc1-to-cloud
    mode: stream              # stream | datagram | plain | vxlan
    connect: 203.0.113.7:7000 # or listen: 0.0.0.0:7000 on the server
    bridge: br-ov1
    create_bridge: true
    private_key_file: /etc/skyferry/vna.key
    peer_public_key: 3q0N...=
    status_file: /run/skyferry/dc1-to-cloud.json

For benchmarks and manual tests; the VNA daemon builds :class:`Tunnel`
objects directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .handshake import TimestampGuard
from .keys import Peer, PublicKey, StaticKeyPair, load_psk
from .link import Backoff
from .session import RekeyPolicy
from .switch import Switch
from .tunnel import Role, Tunnel, TunnelConfig, TunnelMode
from .vxlan import VXLAN_PORT, VxlanSpec

log = structlog.get_logger("vna_agent.dataplane.endpoint")


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class EndpointConfig(BaseModel):
    """A tunnel endpoint's configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="tunnel", description="Label for logs and status.")
    mode: TunnelMode = Field(description="stream | datagram | plain | vxlan.")
    listen: str | None = Field(default=None, description="host:port to listen on (server).")
    connect: str | None = Field(default=None, description="host:port to connect to (client).")
    bind: str = Field(default="0.0.0.0:0", description="Local host:port of a datagram client.")
    bridge: str | None = Field(default=None, description="Overlay bridge to attach the TAP/VXLAN link to.")
    create_bridge: bool = Field(default=False, description="Create the bridge if missing.")
    tap: str | None = Field(default=None, description="TAP interface name.")
    offload: bool = Field(default=True, description="TAP with VNET_HDR + TSO (superpackets).")
    mtu: int = Field(default=1500, ge=68, le=65535, description="Overlay MTU on the TAP.")
    plain_transport: Literal["stream", "datagram"] = Field(default="stream", description="Transport of plain mode.")
    path_mtu: int | None = Field(default=None, ge=576, le=65535, description="Underlay path MTU (datagram).")
    private_key_file: Path | None = Field(default=None, description="Base64 X25519 private key file (0600).")
    private_key: str | None = Field(default=None, description="Inline base64 private key (tests only).")
    peer_public_key: str | None = Field(default=None, description="Peer's base64 static public key.")
    psk_file: Path | None = Field(default=None, description="Optional base64 pre-shared key file (0600).")
    rekey_after_time: float = Field(default=120.0, gt=0, description="Seconds before the initiator rekeys.")
    reject_after_time: float = Field(default=180.0, gt=0, description="Hard session lifetime in seconds.")
    rekey_after_bytes: int = Field(default=1 << 36, gt=0, description="Bytes before rekey.")
    keepalive: float = Field(default=10.0, gt=0, description="Datagram keepalive interval in seconds.")
    rekey_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for a handshake response.")
    backoff_initial: float = Field(default=0.1, gt=0, description="First reconnect delay (stream client).")
    backoff_max: float = Field(default=5.0, gt=0, description="Longest reconnect delay (stream client).")
    vxlan_vni: int | None = Field(default=None, ge=0, lt=1 << 24, description="VXLAN network identifier.")
    vxlan_local: str | None = Field(default=None, description="Local underlay address of the VXLAN link.")
    vxlan_remote: str | None = Field(default=None, description="Remote underlay address of the VXLAN link.")
    vxlan_port: int = Field(default=VXLAN_PORT, description="VXLAN UDP port.")
    vxlan_name: str | None = Field(default=None, description="VXLAN interface name.")
    underlay_mtu: int = Field(default=1500, description="Underlay MTU (VXLAN link MTU = this - 50).")
    status_file: Path | None = Field(default=None, description="Write status JSON here periodically.")
    status_interval: float = Field(default=1.0, gt=0, description="Seconds between status file writes.")

    @model_validator(mode="after")
    def _check(self) -> EndpointConfig:
        if self.mode == TunnelMode.VXLAN:
            if self.vxlan_vni is None or not self.vxlan_local or not self.vxlan_remote or not self.bridge:
                raise ValueError("vxlan mode needs vxlan_vni, vxlan_local, vxlan_remote and bridge")
            return self
        if (self.listen is None) == (self.connect is None):
            raise ValueError("give exactly one of listen / connect")
        has_keys = bool(self.private_key_file or self.private_key) and bool(self.peer_public_key)
        if self.mode in (TunnelMode.STREAM, TunnelMode.DATAGRAM) and not has_keys:
            raise ValueError("encrypted modes need a private key and peer_public_key")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EndpointConfig:
        """Read a YAML or JSON file."""
        data = yaml.safe_load(Path(path).read_text())
        return cls.model_validate(data)

    def tunnel_config(self) -> TunnelConfig:
        role = Role.SERVER if self.listen else Role.CLIENT
        address = parse_hostport(self.listen or self.connect or "0.0.0.0:0")
        vx = None
        if self.mode == TunnelMode.VXLAN:
            assert self.vxlan_vni is not None and self.vxlan_local and self.vxlan_remote
            vx = VxlanSpec(
                name=self.vxlan_name or f"sfx{self.vxlan_vni}"[:15],
                vni=self.vxlan_vni,
                remote=self.vxlan_remote,
                local=self.vxlan_local,
                port=self.vxlan_port,
                underlay_mtu=self.underlay_mtu,
            )
        return TunnelConfig(
            name=self.name,
            mode=self.mode,
            role=role,
            address=address,
            bridge=self.bridge,
            tap=self.tap,
            offload=self.offload,
            mtu=self.mtu,
            plain_transport=self.plain_transport,
            path_mtu=self.path_mtu,
            bind=parse_hostport(self.bind),
            policy=RekeyPolicy(
                rekey_after_time=self.rekey_after_time,
                reject_after_time=self.reject_after_time,
                rekey_after_bytes=self.rekey_after_bytes,
                keepalive=self.keepalive,
                rekey_timeout=self.rekey_timeout,
            ),
            backoff=Backoff(initial=self.backoff_initial, maximum=self.backoff_max),
            vxlan=vx,
        )

    def keys(self) -> tuple[StaticKeyPair | None, Peer | None]:
        ident = None
        if self.private_key_file:
            ident = StaticKeyPair.load(self.private_key_file)
        elif self.private_key:
            ident = StaticKeyPair.from_b64(self.private_key)
        peer = None
        if self.peer_public_key:
            psk = load_psk(self.psk_file) if self.psk_file else None
            peer = Peer("peer", PublicKey.from_b64(self.peer_public_key), psk)
        return ident, peer


def _write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, default=str))
    tmp.replace(path)


async def run_endpoint(cfg: EndpointConfig, *, stop: asyncio.Event | None = None) -> None:
    """Start the endpoint, keep its status file fresh, stop on SIGINT/SIGTERM or ``stop``."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if cfg.bridge and cfg.create_bridge:
        await Switch(cfg.bridge).create()
    ident, peer = cfg.keys()
    tunnel = Tunnel(cfg.tunnel_config(), identity=ident, peer=peer, guard=TimestampGuard())
    await tunnel.start()
    try:
        while not stop.is_set() and tunnel.running:
            status = tunnel.status()
            if cfg.mode == TunnelMode.VXLAN:
                status["kernel"] = await tunnel.vxlan_counters()
            if cfg.status_file:
                _write_status(cfg.status_file, status)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.status_interval):
                    await stop.wait()
    finally:
        await tunnel.stop()
        if cfg.status_file:
            _write_status(cfg.status_file, tunnel.status())
