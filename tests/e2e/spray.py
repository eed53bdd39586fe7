"""The tunnel spray scenario (issue 9), shared by ``tests/e2e/test_tunnel_spray.py`` and ``bench/bench_spray.py``.

Lab ``lab-star.yaml``: the hub's VNA serves a datagram tunnel (overlay
``ova``) and a stream tunnel (overlay ``ovb``) to spoke 1's VNA; a TCP
transfer runs over each (huba1 -> s1a, hubb1 -> s1b) while spoke 2's VNA
host, which can reach the hub's WAN address like any host on the path,
sprays both tunnel ports (:mod:`tests.e2e.spray_tool`). Every VNA agent is
its own process, so its RSS and liveness are the daemon's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bus.messages import Empty
from bus.vna import TunnelStatus, VnaStatus
from tests.e2e.overlay_fixtures import REPO, Vnas
from tests.e2e.waiting import until

SAMPLE = "lab-star.yaml"
SERVER, CLIENT, SPRAYER = "vnahub", "vnas1", "vnas2"
VNAS = (SERVER, CLIENT, SPRAYER)
PORTS = {"datagram": 7000, "stream": 7001}
#: mode -> (overlay, source host, sink host); both sinks are 10.9.0.21, each in its own overlay.
PATHS = {"datagram": ("ova", "huba1", "s1a"), "stream": ("ovb", "hubb1", "s1b")}
SINK_IP = "10.9.0.21"
SINK_PORT = 5700
TOOL = [sys.executable, "-m", "tests.e2e.spray_tool"]


def tunnel_of(mode: str) -> str:
    return f"spray-{mode}"


async def wait_agents(vn: Vnas) -> None:
    """Until every agent process answers on the bus."""
    for vna in VNAS:
        await until(lambda v=vna: vn.key(v), f"the agent of {vna} answers", timeout=60)  # type: ignore[misc]


async def ping_ok(vn: Vnas, src: str) -> bool | None:
    """One ping from ``src`` to the sink address (None: no answer)."""
    return True if (await asyncio.to_thread(vn.lab.ping, src, SINK_IP, count=1, timeout=0.5)).ok else None


async def build(vn: Vnas) -> None:
    """Join both overlays at hub and spoke 1, connect the two tunnels, wait until each carries pings."""
    await wait_agents(vn)
    for mode, (overlay, _, _) in PATHS.items():
        for vna in (SERVER, CLIENT):
            await vn.join(vna, overlay, overlay)
        await vn.connect(overlay, server=SERVER, client=CLIENT, mode=mode, port=PORTS[mode], tunnel=tunnel_of(mode))
    for mode, (_, src, _) in PATHS.items():
        await until(lambda s=src: ping_ok(vn, s), f"{src} reaches {SINK_IP} over the {mode} tunnel", timeout=60)  # type: ignore[misc]


async def tunnels(vn: Vnas, vna: str) -> dict[str, TunnelStatus]:
    """The VNA's tunnels by mode."""
    status = await vn.cmd(vna, "status", Empty(), VnaStatus)
    return {str(t.mode): t for t in status.tunnels if t.tunnel_id.startswith("spray-")}


def outcomes(t: TunnelStatus) -> dict[str, int]:
    """Every outcome of a message the tunnel refused, by name: drops and refused/failed handshakes."""
    return {**t.drops, "handshakes_refused": t.handshakes_refused, "handshakes_failed": t.handshakes_failed}


def counted(t: TunnelStatus) -> int:
    """How many messages the tunnel refused (the sum of :func:`outcomes`)."""
    return sum(outcomes(t).values())


def kernel_udp_errors(vn: Vnas, host: str) -> int:
    """UDP datagrams the kernel of ``host`` dropped before any socket read them (``Udp: InErrors``)."""
    lines = [ln.split() for ln in vn.lab.exec(host, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()]
    names, values = (ln for ln in lines if ln and ln[0] == "Udp:")
    return int(values[names.index("InErrors")])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _last_json(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, out[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass
class Transfer:
    """One timed TCP transfer's two ends."""

    mode: str
    sent: dict[str, Any] = field(default_factory=dict)
    received: dict[str, Any] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return bool(self.sent) and self.sent == {**self.received, "seconds": self.sent.get("seconds")}

    @property
    def mbit_s(self) -> float:
        return 8 * float(self.sent["bytes"]) / float(self.sent["seconds"]) / 1e6


@dataclass
class Round:
    """What one transfer (with or without spray) measured."""

    transfers: dict[str, Transfer]
    sprayed: dict[str, int]
    before: dict[str, dict[str, int]]
    after: dict[str, dict[str, int]]
    kernel_udp_errors: int
    rss_kib: dict[str, list[int]]
    alive: dict[str, bool]

    def counted(self, mode: str) -> int:
        """Refused messages the ``mode`` tunnel's server counted during the round."""
        return sum(self.after[mode].values()) - sum(self.before[mode].values())

    def delta(self, mode: str) -> dict[str, int]:
        """Per outcome, what the round added."""
        a, b = self.after[mode], self.before[mode]
        return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) != b.get(k, 0)}


async def _ends(
    vn: Vnas, seconds: float, rate: float
) -> list[tuple[str, subprocess.Popen[str], subprocess.Popen[str]]]:
    lab, ends = vn.lab, []
    for mode, (_, src, dst) in PATHS.items():
        sink = lab.spawn(dst, [*TOOL, "sink", "--port", str(SINK_PORT)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        assert (await asyncio.to_thread(sink.stdout.readline)).strip() == "ready"
        argv = [*TOOL, "source", "--to", f"{SINK_IP}:{SINK_PORT}", "--seconds", str(seconds), "--rate", str(rate)]
        ends.append((mode, lab.spawn(src, argv, cwd=REPO, stdout=subprocess.PIPE, text=True), sink))
    return ends


async def run_round(
    vn: Vnas,
    *,
    seconds: float,
    rate: float = 0.0,
    spray: bool = True,
    udp_rate: float = 1000.0,
    tcp_rate: float = 20.0,
    on_path: bool = True,
) -> Round:
    """Transfers over both tunnels for ``seconds`` (capped at ``rate`` bytes/s each), sprayed or not."""
    lab = vn.lab
    before = {m: outcomes(t) for m, t in (await tunnels(vn, SERVER)).items()}
    kernel_before = kernel_udp_errors(vn, SERVER)
    ends = await _ends(vn, seconds, rate)
    sprayer = None
    if spray:
        wan = lab.addr(SERVER, "wan")
        assert wan is not None
        argv = [*TOOL, "spray", "--udp", f"{wan.ip}:{PORTS['datagram']}", "--tcp", f"{wan.ip}:{PORTS['stream']}"]
        argv += ["--seconds", str(seconds), "--udp-rate", str(udp_rate), "--tcp-rate", str(tcp_rate)]
        if on_path:  # the receiver index is in the clear on the wire: an on-path host knows it
            index = await _server_index(vn)
            argv += ["--receiver-index", str(index)] if index is not None else []
        sprayer = lab.spawn(SPRAYER, argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    rss: dict[str, list[int]] = {vna: [] for vna in (SERVER, CLIENT)}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for vna in rss:
            proc = vn.procs[vna].proc
            assert proc is not None
            rss[vna].append(rss_kib(proc.pid))
        await asyncio.sleep(1.0)  # a sampling period, not a wait for a condition
    transfers = {}
    for mode, source, sink in ends:
        out, _ = await asyncio.to_thread(source.communicate, timeout=seconds + 120)
        back, _ = await asyncio.to_thread(sink.communicate, timeout=120)
        transfers[mode] = Transfer(mode, _last_json(out), _last_json(back))
    sprayed: dict[str, int] = {}
    if sprayer is not None:
        out, _ = await asyncio.to_thread(sprayer.communicate, timeout=seconds + 60)
        sprayed = _last_json(out)
    after = await _settled_counts(vn)
    alive = {vna: p.proc is not None and p.proc.poll() is None for vna, p in vn.procs.items()}
    return Round(transfers, sprayed, before, after, kernel_udp_errors(vn, SERVER) - kernel_before, rss, alive)


async def _server_index(vn: Vnas) -> int | None:
    """The datagram server's current receiver index as the wire shows it (from its status)."""
    status = await vn.cmd(SERVER, "status", Empty(), VnaStatus)
    for t in status.tunnels:
        if t.tunnel_id == tunnel_of("datagram"):
            return t.receiver_index
    return None


async def _settled_counts(vn: Vnas) -> dict[str, dict[str, int]]:
    """The server's counts once they stop moving (the native path merges its counters on a tick)."""
    last: dict[str, dict[str, int]] = {}

    async def settled() -> dict[str, dict[str, int]] | None:
        nonlocal last
        now = {m: outcomes(t) for m, t in (await tunnels(vn, SERVER)).items()}
        stable = now == last
        last = now
        return now if stable else None

    return await until(settled, "the server's drop counters settle", timeout=30, poll_s=1.5)
