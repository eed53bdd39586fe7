"""Tunnels under a junk spray (issue 9): transfer throughput with and without it, junk injected and counted.

The scenario of ``tests/e2e/test_tunnel_spray.py`` (:mod:`tests.e2e.spray`):
in ``lab-star.yaml`` the hub's VNA serves a datagram tunnel (overlay ova) and
a stream tunnel (overlay ovb) to spoke 1's VNA, every agent its own process.
Each repeat runs one round without spray and one with it, both with one
unpaced TCP transfer per tunnel for ``--seconds``; the spray (from spoke 2's
VNA host) sends ``--udp-rate`` junk datagrams/s to the datagram port and
``--tcp-rate`` junk connections/s to the stream port. Reported: medians over
the repeats of each transfer's throughput, datagrams and connections injected,
refusals the server counted, agents' RSS growth. Run as root, nothing else
heavy at the same time (``flock /tmp/skyferry-bench.lock``)::

    python -m bench.bench_spray --repeat 3 --seconds 10 --json bench/results/spray.json
    python -m bench.bench_spray --repeat 3 --seconds 10 --python-path   # agents without the native fast path
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bus.connection import Bus, BusConfig, ensure_streams
from bus.server import EmbeddedNatsServer
from deploy.lab import Lab
from tests.e2e import spray
from tests.e2e.overlay_fixtures import REPO, AgentProcess, Vnas


@asynccontextmanager
async def lab_vnas(tmp: Path) -> AsyncIterator[Vnas]:
    """nats-server, bus, the lab and an agent process per VNA; all torn down at the end."""
    server = EmbeddedNatsServer()
    await server.start()
    bus = await Bus.connect(BusConfig(servers=[server.url], name="bench-spray"))
    await ensure_streams(bus)
    lab = Lab(REPO / "deploy" / "samples" / spray.SAMPLE, state_dir=tmp / "lab")
    procs: dict[str, AgentProcess] = {}
    try:
        await asyncio.to_thread(lab.up)
        for vna in spray.VNAS:
            procs[vna] = AgentProcess(vna, server.url, tmp / vna, lab.ns(vna), tmp / f"{vna}.log")
            procs[vna].start()
        yield Vnas(lab, bus, {}, procs)
    finally:
        for proc in procs.values():
            await asyncio.to_thread(proc.stop)
        await asyncio.to_thread(lab.down)
        await bus.close()
        await server.stop()


def _row(r: spray.Round, sprayed: bool) -> dict[str, Any]:
    growth = {vna: max(s) - s[0] for vna, s in r.rss_kib.items() if s}
    return {
        "sprayed": sprayed,
        "mbit_s": {m: round(t.mbit_s, 1) for m, t in r.transfers.items()},
        "intact": {m: t.intact for m, t in r.transfers.items()},
        "injected": {"datagram": r.sprayed.get("udp", 0), "stream": r.sprayed.get("tcp", 0)},
        "counted": {m: r.counted(m) for m in spray.PORTS},
        "counted_by_reason": {m: r.delta(m) for m in spray.PORTS},
        "kernel_udp_errors": r.kernel_udp_errors,
        "rss_growth_kib": growth,
        "alive": r.alive,
    }


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-spray-") as tmp:
        async with lab_vnas(Path(tmp)) as vn:
            await spray.build(vn)
            for i in range(args.repeat):
                for sprayed in (False, True):
                    r = await spray.run_round(
                        vn, seconds=args.seconds, spray=sprayed, udp_rate=args.udp_rate, tcp_rate=args.tcp_rate
                    )
                    rows.append({"repeat": i, **_row(r, sprayed)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats, per tunnel, without and with the spray."""
    out: dict[str, Any] = {}
    for mode in spray.PORTS:
        quiet = [r["mbit_s"][mode] for r in rows if not r["sprayed"]]
        loud = [r for r in rows if r["sprayed"]]
        out[mode] = {
            "mbit_s_without": statistics.median(quiet),
            "mbit_s_with": statistics.median(r["mbit_s"][mode] for r in loud),
            "injected": statistics.median(r["injected"][mode] for r in loud),
            "counted": statistics.median(r["counted"][mode] for r in loud),
            "all_intact": all(r["intact"][mode] for r in rows),
        }
    out["rss_growth_kib_max"] = max(max(r["rss_growth_kib"].values()) for r in rows)
    out["agents_alive"] = all(all(r["alive"].values()) for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_spray", description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--udp-rate", type=float, default=1000.0)
    ap.add_argument("--tcp-rate", type=float, default=20.0)
    ap.add_argument("--python-path", action="store_true", help="agents on the Python data path (SKYFERRY_FASTPATH=0)")
    ap.add_argument("--json", type=Path, help="write rows and summary here")
    args = ap.parse_args()
    os.environ["SKYFERRY_FASTPATH"] = "0" if args.python_path else "1"  # the agent processes inherit it
    rows = asyncio.run(measure(args))
    result = {"settings": vars(args) | {"json": str(args.json)}, "rows": rows, "summary": summary(rows)}
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
