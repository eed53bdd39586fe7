"""What the benchmark reads from ``/proc`` and from the tools themselves."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), ``None`` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # after "pid (comm)": state=0 ... utime=11 stime=12 (fields 14 and 15 of proc(5))
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak resident set), ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def proc_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass(frozen=True)
class MachineCpu:
    """Machine-wide CPU time from ``/proc/stat`` (seconds, summed over all CPUs)."""

    busy: float
    total: float
    steal: float

    @classmethod
    def read(cls) -> MachineCpu:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        vals = [int(x) for x in first[1:]]
        user, nice, system, idle, iowait, irq, softirq = vals[:7]
        steal = vals[7] if len(vals) > 7 else 0
        busy = user + nice + system + irq + softirq + steal
        return cls(busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK, steal / CLK_TCK)

    def since(self, before: MachineCpu) -> dict[str, float]:
        """Busy, total and steal CPU seconds between ``before`` and this sample."""
        return {
            "busy_s": round(self.busy - before.busy, 3),
            "total_s": round(self.total - before.total, 3),
            "steal_s": round(self.steal - before.steal, 3),
        }


def loadavg() -> float:
    """1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _version(argv: list[str], pattern: str) -> str | None:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, proc.stdout + proc.stderr)
    return m.group(1) if m else None


def tool(name: str) -> str | None:
    """Path of a program, looking in the sbin directories too (``tincd``, ``openvpn``)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, kernel, tool versions: the context every figure needs."""
    openvpn = tool("openvpn")
    tincd = tool("tincd")
    iperf3 = tool("iperf3")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openvpn": _version([openvpn, "--version"], r"OpenVPN (\S+)") if openvpn else None,
        "openssl": _version([openvpn, "--version"], r"OpenSSL (\S+)") if openvpn else None,
        "tinc": _version([tincd, "--version"], r"tinc version (\S+)") if tincd else None,
        "iperf3": _version([iperf3, "--version"], r"iperf (\S+)") if iperf3 else None,
        "mem_total_mib": _mem_total_mib(),
    }


def _mem_total_mib() -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) // 1024 if m else None
