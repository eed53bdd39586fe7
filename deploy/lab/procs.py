"""Running programs inside lab namespaces: bounded commands, probes, and stopping what is left.

Commands run as ``ip netns exec <ns> ...``; reachability probes run
:mod:`deploy.lab.probe` as a plain script with this interpreter, so no
``ping``/``arping`` binary is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.lab import netops
from deploy.lab.errors import LabCommandError, LabCommandTimeout

PROBE = Path(__file__).with_name("probe.py")


@dataclass(frozen=True)
class PingResult:
    """Outcome of a bounded ICMP probe."""

    sent: int
    received: int
    rtt_ms: tuple[float, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """At least one reply."""
        return self.received > 0


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``ip netns exec <ns> argv...``."""
    if not argv:
        raise LabCommandError("empty command", details={"ns": ns})
    return ["ip", "netns", "exec", ns, *argv]


def run_in(
    ns: str, argv: Sequence[str], *, timeout: float, check: bool = False, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace, text mode, output captured, killed after ``timeout``."""
    full = ns_argv(ns, argv)
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabCommandTimeout(
            f"{argv[0]} in {ns} timed out after {timeout}s", details={"ns": ns, "argv": list(argv)}
        ) from exc
    except OSError as exc:
        raise LabCommandError(f"cannot run {argv[0]} in {ns}: {exc}", details={"ns": ns}) from exc
    if check and proc.returncode != 0:
        raise LabCommandError(
            f"{argv[0]} in {ns} exited {proc.returncode}: {proc.stderr.strip()[:500]}",
            details={"ns": ns, "argv": list(argv), "rc": proc.returncode},
        )
    return proc


def _probe(ns: str, args: list[str], timeout: float) -> dict[str, Any]:
    proc = run_in(ns, [sys.executable, str(PROBE), *args], timeout=timeout)
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise LabCommandError(
            f"probe in {ns} failed: {proc.stderr.strip()[:500]}", details={"ns": ns, "rc": proc.returncode}
        ) from exc
    if not isinstance(data, dict):
        raise LabCommandError(f"probe in {ns} printed {data!r}", details={"ns": ns})
    return data


def ping(ns: str, dst: str, *, count: int, timeout: float, interval: float) -> PingResult:
    """ICMP echo from a namespace (see :mod:`deploy.lab.probe` for the bounds)."""
    args = ["ping", dst, "-c", str(count), "-W", str(timeout), "-i", str(interval)]
    data = _probe(ns, args, timeout=count * (timeout + interval) + 10)
    return PingResult(int(data["sent"]), int(data["received"]), tuple(float(x) for x in data["rtt_ms"]))


def arp(ns: str, ifname: str, dst: str, *, count: int, timeout: float) -> str | None:
    """The MAC answering an ARP request for ``dst`` on ``ifname``, or ``None``."""
    data = _probe(ns, ["arp", ifname, dst, "-c", str(count), "-W", str(timeout)], timeout=count * timeout + 10)
    mac = data["mac"]
    return str(mac) if mac is not None else None


def stop(proc: subprocess.Popen[Any]) -> None:
    """Terminate a process we started (kill after 2 s)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=2)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is as good as gone


def reap(namespaces: Sequence[str], grace: float = 2.0) -> list[int]:
    """Stop every process whose network namespace is one of ``namespaces``: SIGTERM, SIGKILL after ``grace``.

    Returns the pids that were signalled. Only processes inside those (lab) namespaces are touched.
    """
    found = [pid for pid in netops.pids_in(namespaces) if pid != os.getpid()]
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = list(found)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if _alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found
