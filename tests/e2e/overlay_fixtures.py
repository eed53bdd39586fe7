"""Shared set-up for overlay end-to-end tests: a lab, a bus, in-process VNA agents."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from bus import subjects
from bus.client import call
from bus.connection import Bus
from bus.messages import Empty
from bus.server import EmbeddedNatsServer
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


def _die_with_the_test() -> None:
    """In the child: SIGKILL when the test process dies, so a killed test leaves no agent behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class AgentProcess:
    """A VNA agent run as its own process, as its systemd unit runs it (``python -m vna_agent``)."""

    def __init__(self, vna: str, url: str, state_dir: Path, netns: str, log: Path) -> None:
        self.vna = vna
        self.argv = [
            *(sys.executable, "-m", "vna_agent", "--vna-id", vna, "--server", url),
            *("--state-dir", str(state_dir), "--netns", netns, "--flow-interval", "3600"),
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_the_test,
            )

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would; returns once it is gone."""
        assert self.proc is not None and self.proc.poll() is None, f"the agent of {self.vna} is not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. Its exit status (None: killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


@dataclass
class Vnas:
    lab: Lab
    bus: Bus
    agents: dict[str, VnaAgentService]
    procs: dict[str, AgentProcess] = field(default_factory=dict)
    """Agents run as separate processes (``vnas_for(..., external=...)``)."""

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
async def vnas_for(bus: Bus, nats_server: EmbeddedNatsServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: build a lab from a sample file and run an agent for each VNA in it.

    The VNAs named in ``external`` get their agent as a separate process (``Vnas.procs``, state
    dir ``tmp_path/<vna>``, log ``tmp_path/<vna>.log``), started but not yet waited for.
    """
    made: list[tuple[Lab, list[VnaAgentService], list[AgentProcess]]] = []

    async def make(sample: str, *, external: Collection[str] = ()) -> Vnas:
        lab = Lab(REPO / "deploy" / "samples" / sample, state_dir=tmp_path / "lab")
        await asyncio.to_thread(lab.up)
        services: dict[str, VnaAgentService] = {}
        procs: dict[str, AgentProcess] = {}
        made.append((lab, [], []))
        for vna in lab.hosts(Role.VNA):
            if vna in external:
                proc = AgentProcess(vna, nats_server.url, tmp_path / vna, lab.ns(vna), tmp_path / f"{vna}.log")
                made[-1][2].append(proc)
                proc.start()
                procs[vna] = proc
                continue
            agent = VnaAgent(vna, tmp_path / vna, netns=lab.ns(vna))
            agent.start()
            svc = VnaAgentService(bus, agent, flow_interval_s=3600)
            await svc.start()
            services[vna] = svc
            made[-1][1].append(svc)
        return Vnas(lab, bus, services, procs)

    try:
        yield make
    finally:
        for lab, services, procs in made:
            for proc in procs:
                await asyncio.to_thread(proc.stop)
            for svc in services:
                await svc.stop()
                await svc.agent.close()
            await asyncio.to_thread(lab.down)


class Pinger:
    """One long-lived ICMP echo process in a lab host, probing ``dst`` every ``interval`` seconds.

    It stamps each reply with the kernel's receive time (``SO_TIMESTAMPNS``, CLOCK_REALTIME) and
    prints it, so what it reports is when the reply reached the host, whatever the test process
    (or the pinger itself) was doing then. A thread drains its output as it comes (a full pipe
    would stall the probes). Start it before the event to time; stop it after.
    """

    def __init__(self, lab: Lab, host: str, dst: str, *, interval: float = 0.005, duration: float = 30.0) -> None:
        self.proc = lab.spawn(
            host,
            [sys.executable, "-c", _PINGER, dst, str(interval), str(duration)],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.replies: list[int] = []  # kernel receive times, ns
        self.ended = False
        self._ready = threading.Event()
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="pinger-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self._ready.set()
                continue
            with self._new:
                self.replies.append(int(json.loads(line)["rx_ns"]))
                self._new.notify_all()
        with self._new:
            self.ended = True
            self._new.notify_all()
        self._ready.set()

    async def ready(self, timeout: float = 10.0) -> None:
        """Until its socket is open and its first probe is out."""
        assert await asyncio.to_thread(self._ready.wait, timeout) and not self.ended, "the pinger did not start"

    def _wait_after(self, t_ns: int, timeout: float) -> int | None:
        with self._new:
            found = self._new.wait_for(lambda: self.ended or any(rx > t_ns for rx in self.replies), timeout)
            return next((rx for rx in self.replies if rx > t_ns), None) if found else None

    async def first_reply_after(self, t_ns: int, timeout: float) -> int | None:
        """Kernel receive time (ns) of the first echo reply that arrived after ``t_ns``; None if none in time."""
        return await asyncio.to_thread(self._wait_after, t_ns, timeout)

    def stop(self) -> None:
        """Kill it; its reader thread ends with its output."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)


def garp(lab: Lab, host: str, nic: str, ip: str) -> int:
    """Send one gratuitous ARP for ``ip`` from ``host``'s NIC; the CLOCK_REALTIME ns just before it left."""
    out = lab.exec(host, [sys.executable, "-c", _GARP, lab.link(host, nic), ip], timeout=10, check=True)
    return int(out.stdout.strip())


_PINGER = """
import json, os, select, socket, struct, sys, time
dst, interval, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
def csum(b):
    if len(b) % 2: b += b"\\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
ident = os.getpid() & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
end = time.monotonic() + duration
seq, due, first = 0, time.monotonic(), True
while time.monotonic() < end:
    if time.monotonic() >= due:
        seq = seq % 0xFFFF + 1
        body = b"skyferry-lab-pinger"
        req = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + body
        try:
            s.sendto(struct.pack("!BBHHH", 8, 0, csum(req), ident, seq) + body, (dst, 0))
        except OSError:
            pass
        due += interval
        if due < time.monotonic(): due = time.monotonic() + interval
        if first: print("ready", flush=True); first = False
    ready, _, _ = select.select([s], [], [], max(0.0, due - time.monotonic()))
    if not ready: continue
    data, anc, _, addr = s.recvmsg(2048, 256)
    ihl = (data[0] & 0x0F) * 4
    kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if kind != 0 or rid != ident or addr[0] != dst: continue
    rx = time.time_ns()
    for level, typ, val in anc:
        if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
            sec, nsec = struct.unpack("qq", val[:16]); rx = sec * 1_000_000_000 + nsec
    print(json.dumps({"seq": rseq, "rx_ns": rx}), flush=True)
"""

_GARP = """
import socket, struct, sys, time
iface, ip = sys.argv[1], socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)); s.bind((iface, 0x0806))
mac = s.getsockname()[4]
frame = b"\\xff" * 6 + mac + struct.pack("!HHHBBH", 0x0806, 1, 0x0800, 6, 4, 1) + mac + ip + b"\\0" * 6 + ip
t = time.time_ns(); s.send(frame)
print(t, flush=True)
"""


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
