"""Repeats to medians (min/max), ratios to OpenVPN paired per repeat, and the markdown section."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

START = "<!-- bench_overlay:start -->"
END = "<!-- bench_overlay:end -->"
HEADER = "# Skyferry benchmarks\n\nFigures written by the benchmarks in `bench/` (see `bench/README.md`).\n"
BASELINE = "openvpn"
PLAIN = "plain"

Metric = Callable[[dict[str, Any]], float | None]


def _test(rec: dict[str, Any], kind: str) -> dict[str, Any] | None:
    t = rec.get("tests", {}).get(kind)
    return t if isinstance(t, dict) and "error" not in t else None


def _gbps(kind: str) -> Metric:
    def get(rec: dict[str, Any]) -> float | None:
        t = _test(rec, kind)
        return t["bps"] / 1e9 if t is not None and t.get("bps") else None

    return get


def _field(kind: str, name: str) -> Metric:
    def get(rec: dict[str, Any]) -> float | None:
        t = _test(rec, kind)
        v = t.get(name) if t is not None else None
        return float(v) if v is not None else None

    return get


def _rtt(rec: dict[str, Any]) -> float | None:
    v = rec.get("rtt_median_ms")
    return float(v) if v is not None else None


def _rss_mib(rec: dict[str, Any]) -> float | None:
    vals = [v for v in (rec.get("max_rss_kib") or {}).values() if v is not None]
    return max(vals) / 1024 if vals else None


METRICS: dict[str, Metric] = {
    "tcp1_gbps": _gbps("tcp1"),
    "tcpN_gbps": _gbps("tcpN"),
    "udp_gbps": _gbps("udp"),
    "udp_sent_gbps": lambda r: v / 1e9 if (v := _field("udp", "sent_bps")(r)) else None,
    "udp_loss_pct": _field("udp", "lost_percent"),
    "tcp1_retransmits": _field("tcp1", "retransmits"),
    "rtt_ms": _rtt,
    "daemon_cpu_s_per_gbit": _field("tcp1", "daemon_cpu_s_per_gbit"),
    "machine_cpu_s_per_gbit": _field("tcp1", "machine_cpu_s_per_gbit"),
    "max_rss_mib": _rss_mib,
}
RATIO_METRICS = ("tcp1_gbps", "tcpN_gbps", "udp_gbps")


def stat(values: Sequence[float]) -> dict[str, float | int] | None:
    """Median, min, max and count (``None`` without values)."""
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def summarise(records: list[dict[str, Any]], providers: Sequence[str]) -> dict[str, Any]:
    """Per provider: each metric's median/min/max over repeats; added RTT over the plain path and
    ratios to OpenVPN computed per repeat (the same round) before taking medians."""
    by_round: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in providers}
    for rec in records:
        by_round.setdefault(rec["provider"], {})[rec["round"]] = rec
    out: dict[str, Any] = {}
    for p in providers:
        rounds = by_round.get(p, {})
        entry: dict[str, Any] = {
            "runs": len(rounds),
            "ok": sum(1 for r in rounds.values() if r.get("ok")),
            "errors": sorted({r["error"] for r in rounds.values() if r.get("error")}),
        }
        for name, metric in METRICS.items():
            entry[name] = stat([v for r in rounds.values() if (v := metric(r)) is not None])
        added = []
        for rnd, rec in rounds.items():
            base = by_round.get(PLAIN, {}).get(rnd)
            mine, ref = _rtt(rec), _rtt(base) if base else None
            if mine is not None and ref is not None:
                added.append(mine - ref)
        entry["added_rtt_ms"] = stat(added)
        ratios: dict[str, Any] = {}
        for name in RATIO_METRICS:
            vals = []
            for rnd, rec in rounds.items():
                base = by_round.get(BASELINE, {}).get(rnd)
                mine, ref = METRICS[name](rec), METRICS[name](base) if base else None
                if mine is not None and ref:
                    vals.append(mine / ref)
            ratios[name] = stat(vals)
        added_vs = []  # the idle RTT this path adds over the plain path, relative to what OpenVPN adds
        for rnd, rec in rounds.items():
            plain, ovpn = by_round.get(PLAIN, {}).get(rnd), by_round.get(BASELINE, {}).get(rnd)
            mine, base, ref = _rtt(rec), _rtt(plain) if plain else None, _rtt(ovpn) if ovpn else None
            if mine is not None and base is not None and ref is not None and ref > base:
                added_vs.append((mine - base) / (ref - base))
        ratios["added_rtt"] = stat(added_vs)
        entry["vs_openvpn"] = ratios
        out[p] = entry
    return out


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """The ratios the issue asks for, as plain numbers (medians)."""

    def med(p: str, *path: str) -> float | None:
        node: Any = summary.get(p)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return float(node["median"]) if isinstance(node, dict) and "median" in node else None

    out: dict[str, float | None] = {}
    for p in ("stream", "datagram"):
        out[f"{p}/openvpn tcp1"] = med(p, "vs_openvpn", "tcp1_gbps")
        out[f"{p}/openvpn udp"] = med(p, "vs_openvpn", "udp_gbps")
        out[f"{p}/openvpn added rtt"] = med(p, "vs_openvpn", "added_rtt")
    for p in summary:
        if p != PLAIN:
            out[f"added idle rtt ms {p}"] = med(p, "added_rtt_ms")
    return out


# -- markdown ------------------------------------------------------------------------------------------------


def _fmt(s: dict[str, Any] | None, digits: int = 2, *, signed: bool = False) -> str:
    if not s:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    med = f.format(s["median"])
    if s["n"] == 1 or f.format(s["min"]) == f.format(s["max"]):
        return med
    return f"{med} ({f.format(s['min'])}…{f.format(s['max'])})"


def markdown(result: dict[str, Any]) -> str:
    """The ``bench_overlay`` section (markers included)."""
    cfg, m, summary = result["config"], result["machine"], result["summary"]
    labels: dict[str, str] = result["labels"]
    lines = [
        START,
        "## Overlay data plane (issue 4)",
        "",
        f"Run {result['started']} with `{result['command']}`: {cfg['repeat']} repeat(s), "
        f"{cfg['duration']:g} s per iperf3 test, providers one at a time in rotating order; "
        f"{cfg['pings']} pings every {cfg['ping_interval']:g} s before each iperf3 test and after the last. "
        f"Raw results: `{result['raw']}`.",
        "",
        f"Machine: {m['nproc']} x {m['cpu_model']}, {m.get('mem_total_mib')} MiB, Linux {m['kernel']}; "
        f"OpenVPN {m.get('openvpn')} (OpenSSL {m.get('openssl')}), tinc {m.get('tinc')}, "
        f"iperf {m.get('iperf3')}, Python {m['python']}. "
        f"Lab `{cfg['lab']}`: {result['path']['host_a']} → {result['path']['host_b']}, "
        f"LAN MTU {result['path']['lan_mtu']}, underlay MTU {result['path']['underlay_mtu']}.",
        "",
        "| path | TCP 1 stream Gbit/s | TCP x{p} Gbit/s | UDP received Gbit/s | UDP loss % | idle RTT ms | "
        "added RTT ms | daemon CPU s/Gbit | machine CPU s/Gbit | daemon peak RSS MiB |".format(p=cfg["parallel"]),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        label = labels.get(key, key)
        if not s["ok"]:
            why = result.get("skipped", {}).get(key) or "; ".join(s["errors"]) or "no result"
            lines.append(f"| {label} | {why} | | | | | | | | |")
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    label + ("" if s["ok"] == s["runs"] else f" ({s['runs'] - s['ok']} failed)"),
                    _fmt(s["tcp1_gbps"]),
                    _fmt(s["tcpN_gbps"]),
                    _fmt(s["udp_gbps"]),
                    _fmt(s["udp_loss_pct"], 1),
                    _fmt(s["rtt_ms"], 3),
                    "-" if key == PLAIN else _fmt(s["added_rtt_ms"], 3, signed=True),
                    _fmt(s["daemon_cpu_s_per_gbit"]) if s["daemon_cpu_s_per_gbit"] else "- (kernel)",
                    _fmt(s["machine_cpu_s_per_gbit"]),
                    _fmt(s["max_rss_mib"], 1) if s["max_rss_mib"] else "-",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Median (min…max) over the repeats. Ratios to OpenVPN, computed per repeat (same round) then the median:",
        "",
        f"| path | TCP 1 stream | TCP x{cfg['parallel']} | UDP received "
        "| added idle RTT (below 1: less than OpenVPN adds) |",
        "|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        if key in (BASELINE, PLAIN) or not s["ok"]:
            continue
        r = s["vs_openvpn"]
        lines.append(
            f"| {labels.get(key, key)} | {_fmt(r['tcp1_gbps'])} | {_fmt(r['tcpN_gbps'])} | {_fmt(r['udp_gbps'])} "
            f"| {_fmt(r.get('added_rtt'))} |"
        )
    lines += [
        "",
        "How it is measured: iperf3 client in host a, server in host b (a fresh `iperf3 -s` per block). "
        f"UDP is `-u -b {cfg['udp_rate']} -l {cfg['udp_len']}`: received rate and loss as counted by "
        "the iperf3 server. Idle RTT: median of all echo replies of the repeat (ICMP from Python "
        "via `Lab.ping`, idle link, 0.5 s after the previous test); added RTT = overlay minus plain path, "
        "same repeat. Daemon CPU: user+sys seconds of the tunnel daemons on both VNAs "
        "(`/proc/<pid>/stat`) during the single-stream TCP test, per Gbit received; machine CPU: busy "
        "seconds of the whole machine (`/proc/stat`, includes iperf3, the kernel's forwarding and anything "
        "else running). Peak RSS: the largest `VmHWM` of the path's daemons.",
        "",
        "Configurations:",
        "",
    ]
    lines += [f"- {labels.get(k, k)}: {note}" for k, note in result["notes"].items()]
    lines += ["", "Caveats:", ""]
    lines += [f"- {c}" for c in result["caveats"]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the markers (inclusive) in ``path``; append it when the markers are
    missing; create the file with a short header when it does not exist. Other sections stay."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = HEADER
    start, end = text.find(START), text.find(END)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    if not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
