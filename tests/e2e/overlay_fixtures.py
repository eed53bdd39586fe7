"""Shared set-up for overlay end-to-end tests: a lab, a bus, in-process VNA agents."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from bus import subjects
from bus.client import call
from bus.connection import Bus
from bus.messages import Empty
from bus.vna import Ack, IdentityView, PeerKey, SegmentJoin, SwitchCreate, SwitchStatus, TunnelAdd, TunnelStatus
from deploy.lab import Lab
from deploy.lab.topology import Role
from vna_agent.agent import VnaAgent
from vna_agent.service import VnaAgentService

REPO = Path(__file__).resolve().parents[2]
R = TypeVar("R", bound=BaseModel)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (network namespaces)"
)


@dataclass
class Vnas:
    lab: Lab
    bus: Bus
    agents: dict[str, VnaAgentService]

    async def cmd(self, vna: str, verb: str, payload: BaseModel | dict[str, Any], resp: type[R]) -> R:
        return await call(self.bus, subjects.agent(vna, verb), payload, resp, timeout=10)

    async def key(self, vna: str) -> str:
        return (await self.cmd(vna, "identity", Empty(), IdentityView)).public_key

    async def join(self, vna: str, overlay: str, lan: str) -> None:
        await self.cmd(vna, "switch_create", SwitchCreate(overlay_id=overlay), SwitchStatus)
        await self.cmd(vna, "segment_join", SegmentJoin(overlay_id=overlay, interface=self.lab.link(vna, lan)), Ack)

    async def connect(
        self,
        overlay: str,
        server: str,
        client: str,
        *,
        mode: str = "stream",
        port: int = 7000,
        tunnel: str | None = None,
    ) -> None:
        """A tunnel server on ``server``'s wan address and a client on ``client`` dialling it."""
        tid = tunnel or f"{overlay}-{server}-{client}"
        addr = f"{self.lab.addr(server, 'wan').ip}:{port}"
        await self.cmd(
            server,
            "tunnel_add",
            TunnelAdd(
                overlay_id=overlay,
                tunnel_id=tid,
                role="server",
                mode=mode,
                listen=addr,
                peer=PeerKey(name=client, public_key=await self.key(client)),
            ),
            TunnelStatus,
        )
        await self.cmd(
            client,
            "tunnel_add",
            TunnelAdd(
                overlay_id=overlay,
                tunnel_id=tid,
                role="client",
                mode=mode,
                connect=addr,
                peer=PeerKey(name=server, public_key=await self.key(server)),
            ),
            TunnelStatus,
        )


def tunnel_id(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:12]


@pytest.fixture
async def vnas_for(bus: Bus, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: build a lab from a sample file and run an agent for each VNA in it."""
    made: list[tuple[Lab, list[VnaAgentService]]] = []

    async def make(sample: str) -> Vnas:
        lab = Lab(REPO / "deploy" / "samples" / sample, state_dir=tmp_path / "lab")
        await asyncio.to_thread(lab.up)
        services: dict[str, VnaAgentService] = {}
        made.append((lab, []))
        for vna in lab.hosts(Role.VNA):
            agent = VnaAgent(vna, tmp_path / vna, netns=lab.ns(vna))
            agent.start()
            svc = VnaAgentService(bus, agent, flow_interval_s=3600)
            await svc.start()
            services[vna] = svc
            made[-1][1].append(svc)
        return Vnas(lab, bus, services)

    try:
        yield make
    finally:
        for lab, services in made:
            for svc in services:
                await svc.stop()
                await svc.agent.close()
            await asyncio.to_thread(lab.down)


def tcp_transfer(lab: Lab, src: str, dst: str, dst_ip: str, size: int = 2_000_000, port: int = 5601) -> tuple[str, str]:
    """Send ``size`` random bytes over TCP from ``src`` to ``dst``; return (sent sha256, received sha256)."""
    server = lab.spawn(dst, [sys.executable, "-c", _SINK, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        out = lab.exec(src, [sys.executable, "-c", _SOURCE, dst_ip, str(port), str(size)], timeout=30, check=True)
        received, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    return out.stdout.strip(), received.strip()


_SINK = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); h = hashlib.sha256()
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b)
print(h.hexdigest())
"""

_SOURCE = """
import hashlib, os, socket, sys, time
data = os.urandom(int(sys.argv[3]))
for _ in range(50):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        time.sleep(0.1)
s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(hashlib.sha256(data).hexdigest())
"""
