"""Quick throughput sanity check of one tunnel mode in throw-away namespaces (root, iperf3).

    .venv/bin/python -m tests.vna_agent.dataplane.sanity_bench --mode stream --seconds 5
    .venv/bin/python -m tests.vna_agent.dataplane.sanity_bench --mode datagram --no-offload

Not a pytest module; the full benchmark (against OpenVPN and tinc) lives elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vna_agent.dataplane.keys import StaticKeyPair

from .nslab import NsLab, wait_status


def endpoint_configs(lab: NsLab, mode: str, *, offload: bool, transport: str = "stream") -> tuple[dict[str, Any], ...]:
    """Server config for site B and client config for site A."""
    ka, kb = StaticKeyPair.generate(), StaticKeyPair.generate()
    common: dict[str, Any] = {"mode": mode, "bridge": lab.br, "offload": offload, "plain_transport": transport}
    if mode == "vxlan":
        vx = {"vxlan_vni": 77, "vxlan_port": 4789, "underlay_mtu": 9000, "vxlan_name": f"{lab.p}x"}
        a = {**common, **vx, "vxlan_local": "10.79.0.1", "vxlan_remote": "10.79.0.2"}
        b = {**common, **vx, "vxlan_local": "10.79.0.2", "vxlan_remote": "10.79.0.1"}
        return a, b
    srv = {**common, "tap": f"{lab.p}t", "listen": "10.78.0.2:7000"}
    cli = {**common, "tap": f"{lab.p}t", "connect": "10.78.0.2:7000"}
    if mode in ("stream", "datagram"):
        srv |= {"private_key": kb.private_b64(), "peer_public_key": ka.public.b64()}
        cli |= {"private_key": ka.private_b64(), "peer_public_key": kb.public.b64()}
    return cli, srv


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="stream", choices=["stream", "datagram", "plain", "vxlan"])
    ap.add_argument("--transport", default="stream", choices=["stream", "datagram"])
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--underlay-mtu", type=int, default=1500)
    args = ap.parse_args(argv)
    if not shutil.which("iperf3"):
        print("iperf3 not installed", file=sys.stderr)
        return 2
    lab = NsLab(underlay_mtu=args.underlay_mtu)
    lab.build()
    try:
        cli, srv = endpoint_configs(lab, args.mode, offload=not args.no_offload, transport=args.transport)
        pb, st_b = lab.endpoint(lab.b, "b", srv)
        time.sleep(0.2)
        pa, st_a = lab.endpoint(lab.a, "a", cli)
        wait_status(st_a, lambda s: s["state"] == "up", 15)
        wait_status(st_b, lambda s: s["state"] == "up", 15)
        if lab.tool(lab.sa, "ping", "10.77.0.2", "3", "1").returncode:
            print("ping failed", file=sys.stderr)
            return 1
        lab.spawn(lab.sb, "iperf3", "-s", "-1", "-B", "10.77.0.2")
        time.sleep(0.3)
        cmd = ["iperf3", "-c", "10.77.0.2", "-t", str(args.seconds), "-J", "-P", str(args.parallel)]
        if args.reverse:
            cmd.append("-R")
        cpu0 = (_cpu(pa.pid), _cpu(pb.pid), time.monotonic())
        res = lab.ns(lab.sa, *cmd, timeout=args.seconds + 30)
        cpu1 = (_cpu(pa.pid), _cpu(pb.pid), time.monotonic())
        data = json.loads(res.stdout)
        end = data["end"]
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        retr = end["sum_sent"].get("retransmits")
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "transport": args.transport if args.mode == "plain" else args.mode,
                    "offload": not args.no_offload,
                    "gbit_s": round(gbps, 3),
                    "retransmits": retr,
                    "endpoint_cpu": [round((cpu1[i] - cpu0[i]) / (cpu1[2] - cpu0[2]), 2) for i in (0, 1)],
                    "cpu_s_per_gbit": round(sum(cpu1[i] - cpu0[i] for i in (0, 1)) / (gbps * (cpu1[2] - cpu0[2])), 3),
                }
            )
        )
        time.sleep(0.3)
        for name, path in (("a", st_a), ("b", st_b)):
            st = json.loads(path.read_text())
            keys = ("records_out", "records_in", "frames_out", "frames_in", "drops")
            print(name, {k: st.get(k) for k in keys})
    finally:
        lab.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
