"""One measurement block of one provider: RTT probes interleaved with iperf3 TCP x1, TCP x4 and UDP,
daemon CPU (``/proc/<pid>/stat``) sampled around every iperf3 run, peak RSS at the end."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Any

import structlog

from bench.overlay import sysinfo
from bench.overlay.providers import BenchContext, Provider, wait_until
from deploy.lab import LabCommandTimeout

log = structlog.get_logger("bench.overlay")

IPERF_PORT = 5201
MAX_DURATION = 60.0
MAX_PINGS = 100


@dataclass(frozen=True)
class Settings:
    """What one block measures (bounded: durations <= 60 s, pings <= 100 per burst)."""

    duration: float = 5.0
    parallel: int = 4
    udp_rate: str = "2G"
    udp_len: int = 1400
    pings: int = 50
    ping_interval: float = 0.05
    settle: float = 0.5  # idle seconds before each ping burst

    def __post_init__(self) -> None:
        if not 0.5 <= self.duration <= MAX_DURATION:
            raise ValueError(f"duration must be within 0.5..{MAX_DURATION} s")
        if not 1 <= self.pings <= MAX_PINGS:
            raise ValueError(f"pings must be within 1..{MAX_PINGS}")
        if not 2 <= self.parallel <= 16:
            raise ValueError("parallel must be within 2..16")


class IperfServer:
    """``iperf3 -s`` in host b's namespace for one block; restarted if a client run went wrong."""

    def __init__(self, ctx: BenchContext, host: str, port: int = IPERF_PORT) -> None:
        self.ctx, self.host, self.port = ctx, host, port
        self.log_path = ctx.work / f"iperf3-server-{host}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self.stop()
        self._out = self.log_path.open("wb")
        iperf3 = sysinfo.tool("iperf3") or "iperf3"
        self.proc = self.ctx.lab.spawn(
            self.host,
            [iperf3, "-s", "-p", str(self.port), "--forceflush"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: "Server listening" in self.log_path.read_text(errors="replace"), 10, "iperf3 server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> IperfServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SNMP_KEYS = ("InErrors", "RcvbufErrors", "SndbufErrors")


def _udp_errors(ctx: BenchContext) -> dict[str, dict[str, int]]:
    """UDP error counters (``/proc/net/snmp``) of both VNAs: where a tunnel's datagrams were dropped."""
    out: dict[str, dict[str, int]] = {}
    for side in (ctx.path.a, ctx.path.b):
        lines = [x.split() for x in ctx.lab.exec(side.vna, ["cat", "/proc/net/snmp"]).stdout.splitlines()]
        udp = [x for x in lines if x and x[0] == "Udp:"]
        if len(udp) >= 2:
            row = dict(zip(udp[0][1:], udp[1][1:], strict=False))
            out[side.vna] = {k: int(row[k]) for k in SNMP_KEYS if k in row}
    return out


def _cpu(provider: Provider) -> dict[str, float | None]:
    return {f"{d.name}@{d.host}": d.cpu_seconds() for d in provider.daemons}


def iperf(
    ctx: BenchContext,
    provider: Provider,
    server: IperfServer,
    settings: Settings,
    *,
    parallel: int = 1,
    udp: bool = False,
) -> dict[str, Any]:
    """One iperf3 client run from host a to the provider's destination; figures + CPU used meanwhile."""
    iperf3 = sysinfo.tool("iperf3") or "iperf3"
    dur = settings.duration
    argv = [iperf3, "-c", provider.destination(ctx), "-p", str(server.port), "-J", "--connect-timeout", "3000"]
    argv += ["-t", f"{dur:g}", "-P", str(parallel)]
    if udp:
        argv += ["-u", "-b", settings.udp_rate, "-l", str(settings.udp_len)]
    kind = "udp" if udp else ("tcp1" if parallel == 1 else "tcpN")
    udp0 = _udp_errors(ctx)
    cpu0, mach0, t0 = _cpu(provider), sysinfo.MachineCpu.read(), time.monotonic()
    load0 = sysinfo.loadavg()
    try:
        proc = ctx.lab.exec(provider.source(ctx), argv, timeout=dur + 25)
    except LabCommandTimeout:
        server.start()  # a wedged server would refuse the next test
        return {"kind": kind, "error": f"iperf3 timed out after {dur + 25:.0f}s"}
    wall = time.monotonic() - t0
    cpu1, mach1 = _cpu(provider), sysinfo.MachineCpu.read()
    udp1 = _udp_errors(ctx)
    out: dict[str, Any] = {
        "kind": kind,
        "parallel": parallel,
        "argv": argv[1:],
        "wall_s": round(wall, 3),
        "loadavg": load0,
        "vna_udp_errors": {
            h: {k: v - udp0[h].get(k, 0) for k, v in c.items() if v != udp0[h].get(k, 0)}
            for h, c in udp1.items()
            if h in udp0
        },
    }
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        server.start()
        return {**out, "error": f"iperf3 printed no JSON (rc {proc.returncode}): {proc.stderr.strip()[:300]}"}
    if data.get("error"):
        server.start()
        return {**out, "error": f"iperf3: {data['error']}"}
    end = data.get("end", {})
    out["iperf_end"] = {k: end[k] for k in ("sum_sent", "sum_received", "sum", "cpu_utilization_percent") if k in end}
    if udp:
        sent = end.get("sum_sent") or end.get("sum") or {}
        recv = end.get("sum_received") or end.get("sum") or {}
        packets = int(recv.get("packets", 0) or sent.get("packets", 0))
        lost = int(recv.get("lost_packets", 0))
        secs = float(sent.get("seconds") or dur)
        if "sum_received" in end:  # the server's own count (iperf3 >= 3.11 reports it to the client)
            recv_bytes, recv_bps = int(recv.get("bytes", 0)), float(recv.get("bits_per_second", 0.0))
        else:  # older iperf3: bytes sent minus lost datagrams of --length bytes
            recv_bytes = max(0, int(sent.get("bytes", 0)) - lost * settings.udp_len) if packets else 0
            recv_bps = recv_bytes * 8 / secs if secs else 0.0
        out |= {
            "seconds": secs,
            "sent_bps": float(sent.get("bits_per_second", 0.0)),
            "bytes": recv_bytes,
            "bps": recv_bps,
            "packets": packets,
            "lost_packets": lost,
            "lost_percent": float(recv.get("lost_percent", 0.0)),
            "jitter_ms": float(recv.get("jitter_ms", 0.0)),
        }
    else:
        recv = end.get("sum_received", {})
        sent = end.get("sum_sent", {})
        out |= {
            "seconds": float(recv.get("seconds") or dur),
            "bytes": int(recv.get("bytes", 0)),
            "bps": float(recv.get("bits_per_second", 0.0)),
            "retransmits": sent.get("retransmits"),
        }
    cpu_used: dict[str, float] = {}
    for k, before in cpu0.items():
        after = cpu1.get(k)
        if before is not None and after is not None:
            cpu_used[k] = round(after - before, 3)
    out["daemon_cpu_s"] = cpu_used
    out["machine_cpu"] = mach1.since(mach0)
    gbit = out["bytes"] * 8 / 1e9
    if gbit > 0:
        out["gbit"] = round(gbit, 4)
        if provider.daemons and len(cpu_used) == len(provider.daemons):
            out["daemon_cpu_s_per_gbit"] = round(sum(cpu_used.values()) / gbit, 4)
        out["machine_cpu_s_per_gbit"] = round(out["machine_cpu"]["busy_s"] / gbit, 4)
    return out


def ping_burst(ctx: BenchContext, provider: Provider, settings: Settings) -> dict[str, Any]:
    """``settings.pings`` echoes at ``settings.ping_interval`` after ``settings.settle`` idle seconds."""
    time.sleep(settings.settle)
    res = ctx.lab.ping(
        provider.source(ctx),
        provider.destination(ctx),
        count=settings.pings,
        timeout=1.0,
        interval=settings.ping_interval,
    )
    return {"sent": res.sent, "received": res.received, "rtt_ms": list(res.rtt_ms)}


def measure(ctx: BenchContext, provider: Provider, settings: Settings) -> dict[str, Any]:
    """Pings, TCP x1, pings, TCP xN, pings, UDP, pings; daemon peak RSS; everything in one dict.

    Idle RTT differences between overlays are tens of microseconds on a noisy machine: four
    bursts of 50 echoes per repeat keep the median steady.
    """
    block: dict[str, Any] = {"pings": [], "tests": {}}
    with IperfServer(ctx, ctx.path.b.host) as server:
        for parallel, udp in ((1, False), (settings.parallel, False), (1, True)):
            block["pings"].append(ping_burst(ctx, provider, settings))
            provider.check_daemons()
            res = iperf(ctx, provider, server, settings, parallel=parallel, udp=udp)
            block["tests"][res["kind"]] = res
            log.info(
                "bench.iperf",
                provider=provider.key,
                kind=res["kind"],
                gbps=round(res.get("bps", 0.0) / 1e9, 3),
                loss=res.get("lost_percent"),
                error=res.get("error"),
            )
    block["pings"].append(ping_burst(ctx, provider, settings))
    provider.check_daemons()
    block["max_rss_kib"] = {f"{d.name}@{d.host}": d.max_rss_kib() for d in provider.daemons}
    block["pids"] = {f"{d.name}@{d.host}": d.pid for d in provider.daemons}
    rtts = [r for p in block["pings"] for r in p["rtt_ms"]]
    block["rtt_median_ms"] = round(statistics.median(rtts), 4) if rtts else None
    block["ping_loss"] = sum(p["sent"] - p["received"] for p in block["pings"])
    return block


def run_block(ctx: BenchContext, provider: Provider, settings: Settings) -> dict[str, Any]:
    """Set the provider up, measure, tear it down (always); failures become an ``error`` entry."""
    rec: dict[str, Any] = {"provider": provider.key, "ok": False}
    provider.info = {}
    t0 = time.monotonic()
    try:
        provider.setup(ctx)
        rec["setup_s"] = round(time.monotonic() - t0, 3)
        rec |= measure(ctx, provider, settings)
        rec["ok"] = all("error" not in t for t in rec["tests"].values())
        if not rec["ok"]:
            rec["error"] = "; ".join(t["error"] for t in rec["tests"].values() if "error" in t)
    except Exception as exc:  # provider, lab or tool failure: record it, go on with the next block
        rec["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("bench.provider_failed", provider=provider.key, error=rec["error"])
    finally:
        provider.teardown(ctx)
        rec["info"] = dict(provider.info)
        rec["daemons_left"] = [d.pid for d in provider.daemons if sysinfo.proc_alive(d.pid)]
        if not rec["ok"]:
            rec["log_tail"] = {f"{d.name}@{d.host}": d.log_text().strip().splitlines()[-8:] for d in provider.daemons}
        provider.daemons.clear()
    return rec
