"""Smoke test of the overlay benchmark harness (bench/bench_overlay.py): a 1-second run of the
plain underlay, kernel VXLAN and OpenVPN paths gets traffic through each and leaves nothing behind.
No timing assertions: the figures depend on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.bench_overlay import BenchConfig, run_bench
from bench.overlay import sysinfo

PROVIDERS = ("plain", "vxlan", "openvpn")


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2"
    for tool in ("iperf3", "openvpn", "openssl"):
        if sysinfo.tool(tool) is None:
            return f"needs {tool} (deploy/install-deps.sh)"
    return None


pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(_can_run() is not None, reason=_can_run() or ""),
]


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_one_second_run_of_plain_vxlan_openvpn(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    cfg = BenchConfig(
        providers=PROVIDERS,
        repeat=1,
        duration=1.0,
        pings=3,
        out=out,
        results_dir=tmp_path / "results",
    )
    result = run_bench(cfg, command="pytest smoke")

    # every path carried traffic in all three tests and answered pings
    assert not result["skipped"]
    assert [r["provider"] for r in result["records"]] == list(PROVIDERS)
    for rec in result["records"]:
        assert rec["ok"], (rec["provider"], rec.get("error"), rec.get("log_tail"))
        for kind in ("tcp1", "tcpN", "udp"):
            assert rec["tests"][kind]["bps"] > 0, (rec["provider"], kind)
            assert rec["tests"][kind]["bytes"] > 0, (rec["provider"], kind)
        assert rec["rtt_median_ms"] is not None
    openvpn = next(r for r in result["records"] if r["provider"] == "openvpn")
    assert openvpn["info"]["cipher"] == "AES-256-GCM"
    assert len(openvpn["pids"]) == 2 and all(v > 0 for v in openvpn["max_rss_kib"].values())
    assert "daemon_cpu_s_per_gbit" in openvpn["tests"]["tcp1"]
    ratios = result["summary"]["vxlan"]["vs_openvpn"]
    assert ratios["tcp1_gbps"] is not None and ratios["tcp1_gbps"]["median"] > 0

    # torn down: no lab namespace, no daemon, no process left in the lab
    assert result["teardown"] == {"namespaces_left": [], "daemon_pids_left": []}
    assert not [ns for ns in _netns() if ns.startswith(f"{result['prefix']}-")]
    for rec in result["records"]:
        for pid in rec.get("pids", {}).values():
            assert not sysinfo.proc_alive(pid)

    # outputs: raw JSON, and the markdown section next to the other one
    raws = list((tmp_path / "results").glob("overlay-*.json"))
    assert len(raws) == 1
    text = out.read_text()
    assert "keep me" in text and text.count("<!-- bench_overlay:start -->") == 1
    assert "OpenVPN TAP AES-256-GCM" in text
