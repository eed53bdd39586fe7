"""The tunnel client for workloads on untrusted infrastructure.

Runs on the migrated server itself: creates the server's overlay interface (a
TAP) with the server's *original* address and MAC and connects it to a VNA's
tunnel server, so the server stays on its old LAN wherever it now runs::

    python -m vna_agent.client --config /etc/skyferry/tunnel-client.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import socket
import struct
from pathlib import Path
from typing import Annotated

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pyroute2 import AsyncIPRoute

from bus.logs import configure_logging
from bus.models.common import MacAddress
from vna_agent.dataplane import Peer, PublicKey, StaticKeyPair, Tunnel, TunnelConfig
from vna_agent.dataplane import Role as DpRole
from vna_agent.dataplane import TunnelMode as DpMode

log = structlog.get_logger(__name__)


class ClientConfig(BaseModel):
    """The tunnel client's config file (YAML or JSON)."""

    model_config = ConfigDict(extra="forbid")
    interface: Annotated[str, Field(min_length=1, max_length=15)] = "sfov0"
    mac: MacAddress = Field(description="the server's original MAC")
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface = Field(description="original address/prefix")
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    mtu: int = Field(default=1500, ge=576, le=65_000)
    mode: DpMode = DpMode.STREAM
    server: Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$", description="the VNA tunnel server host:port")]
    server_public_key: str
    identity_key_file: Path = Path("/etc/skyferry/tunnel-client.key")

    @classmethod
    def load(cls, path: Path) -> ClientConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()))


async def configure_interface(cfg: ClientConfig) -> None:
    """Give the TAP the server's original MAC and address, bring it up, add the default route."""
    async with AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname=cfg.interface))[0]
        await ipr.link("set", index=idx, state="down")
        await ipr.link("set", index=idx, address=str(cfg.mac), mtu=cfg.mtu)
        await ipr.addr("replace", index=idx, address=str(cfg.address.ip), prefixlen=cfg.address.network.prefixlen)
        await ipr.link("set", index=idx, state="up")
        if cfg.gateway is not None:
            await ipr.route("replace", dst="default", gateway=str(cfg.gateway), oif=idx)


def gratuitous_arp_frame(mac: str, ip: str) -> bytes:
    """A gratuitous ARP request announcing ``ip`` at ``mac`` (broadcast)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = ipaddress.IPv4Address(ip).packed
    return b"\xff" * 6 + hw + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\0" * 6 + addr


async def announce(cfg: ClientConfig, *, repeats: int = 3, interval_s: float = 0.2) -> None:
    """Tell the overlay where the server is now, so switches re-learn its MAC at once."""
    if cfg.address.version != 4:
        return  # IPv6 would use unsolicited neighbour advertisements
    frame = gratuitous_arp_frame(str(cfg.mac), str(cfg.address.ip))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((cfg.interface, 0))
        for i in range(repeats):
            sock.send(frame)
            if i + 1 < repeats:
                await asyncio.sleep(interval_s)


async def run_client(cfg: ClientConfig, stop: asyncio.Event) -> Tunnel:
    """Start the tunnel, configure the interface, run until ``stop`` is set."""
    if cfg.identity_key_file.exists():
        identity = StaticKeyPair.load(cfg.identity_key_file)
    else:
        identity = StaticKeyPair.generate()
        identity.save(cfg.identity_key_file)
    host, _, port = cfg.server.rpartition(":")
    tunnel = Tunnel(
        TunnelConfig(
            name="client",
            mode=cfg.mode,
            role=DpRole.CLIENT,
            address=(host, int(port)),
            bridge=None,
            tap=cfg.interface,
            mtu=cfg.mtu,
        ),
        identity=identity,
        peer=Peer("vna", PublicKey.from_b64(cfg.server_public_key)),
    )
    await tunnel.start()
    try:
        await configure_interface(cfg)
        await announce(cfg)
        log.info(
            "tunnel_client_up",
            interface=cfg.interface,
            address=str(cfg.address),
            server=cfg.server,
            public_key=identity.public.b64(),
        )
        await stop.wait()
    finally:
        await tunnel.stop()
    return tunnel


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vna_agent.client", description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--show-public-key", action="store_true", help="print the client's public key and exit")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    configure_logging(args.log_level)
    cfg = ClientConfig.load(args.config)
    if args.show_public_key:
        if not cfg.identity_key_file.exists():
            StaticKeyPair.generate().save(cfg.identity_key_file)
        print(StaticKeyPair.load(cfg.identity_key_file).public.b64())
        return

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_client(cfg, stop)

    asyncio.run(_main())


if __name__ == "__main__":
    main()
