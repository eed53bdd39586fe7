"""A minimal two-site netns topology for data-plane tests and sanity benchmarks.

::

    [<p>sa] 10.77.0.1                                   10.77.0.2 [<p>sb]
       | <p>e (02:77:00:00:00:01)          (02:77:00:00:00:02) <p>e |
       |                                                            |
    <p>h --- <p>br  [<p>a]  <p>u 10.78.0.1 ==== 10.78.0.2 <p>u  [<p>b]  <p>br --- <p>h
                            <p>j 10.79.0.1 ==== 10.79.0.2 <p>j (MTU 9000, for VXLAN)

Every name starts with a random ``sfd<4 hex>`` prefix; :meth:`NsLab.destroy`
kills the processes it started (by pid) and deletes its namespaces, which
removes every veth, bridge and TAP inside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
NETTOOLS = str(Path(__file__).with_name("nettools.py"))
PY = sys.executable


def run(*cmd: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class NsLab:
    """Build/destroy the topology above; start processes inside its namespaces."""

    def __init__(self, prefix: str | None = None, *, underlay_mtu: int = 1500) -> None:
        self.p = prefix or f"sfd{secrets.token_hex(2)}"
        assert len(self.p) <= 8
        self.a, self.b = f"{self.p}a", f"{self.p}b"
        self.sa, self.sb = f"{self.p}sa", f"{self.p}sb"
        self.br = f"{self.p}br"
        self.underlay_mtu = underlay_mtu
        self.procs: list[subprocess.Popen[str]] = []
        self.namespaces = [self.a, self.b, self.sa, self.sb]
        self.tmp = Path(f"/tmp/{self.p}")

    def ns(self, ns: str, *cmd: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def build(self) -> None:
        p = self.p
        self.tmp.mkdir(exist_ok=True)
        created: list[str] = []
        try:
            for ns in self.namespaces:
                run("ip", "netns", "add", ns)
                created.append(ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
                self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
                self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
            for site, srv, ip, mac in (
                (self.a, self.sa, "10.77.0.1", "02:77:00:00:00:01"),
                (self.b, self.sb, "10.77.0.2", "02:77:00:00:00:02"),
            ):
                run("ip", "-n", site, "link", "add", self.br, "type", "bridge", "ageing_time", "30000")
                run("ip", "-n", site, "link", "set", self.br, "up")
                run("ip", "-n", site, "link", "add", f"{p}h", "type", "veth", "peer", "name", f"{p}e", "netns", srv)
                run("ip", "-n", site, "link", "set", f"{p}h", "master", self.br, "up")
                run("ip", "-n", srv, "link", "set", f"{p}e", "address", mac, "up")
                run("ip", "-n", srv, "addr", "add", f"{ip}/24", "dev", f"{p}e")
            for name, mtu, (ipa, ipb) in (
                (f"{p}u", self.underlay_mtu, ("10.78.0.1", "10.78.0.2")),
                (f"{p}j", 9000, ("10.79.0.1", "10.79.0.2")),
            ):
                run("ip", "-n", self.a, "link", "add", name, "mtu", str(mtu), "type", "veth",
                    "peer", "name", name, "mtu", str(mtu), "netns", self.b)  # fmt: skip
                for ns, addr in ((self.a, ipa), (self.b, ipb)):
                    run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", name)
                    run("ip", "-n", ns, "link", "set", name, "up")
        except BaseException:
            for ns in created:
                run("ip", "netns", "del", ns, check=False)
            raise

    # -- processes -------------------------------------------------------------

    def spawn(self, ns: str, *cmd: str, log: str | None = None) -> subprocess.Popen[str]:
        """Start ``cmd`` inside ``ns``; it is killed by :meth:`destroy` at the latest."""
        out = open(self.tmp / log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def endpoint(self, ns: str, name: str, cfg: dict[str, Any]) -> tuple[subprocess.Popen[str], Path]:
        """Run ``python -m vna_agent.dataplane run`` in ``ns``; return it and its status file."""
        status = self.tmp / f"{name}.status.json"
        status.unlink(missing_ok=True)
        conf = self.tmp / f"{name}.json"
        conf.write_text(json.dumps({"name": name, "status_file": str(status), "status_interval": 0.1, **cfg}))
        cmd = (PY, "-m", "vna_agent.dataplane", "--log-level", "INFO", "run", str(conf))
        proc = self.spawn(ns, *cmd, log=f"{name}.log")
        return proc, status

    def tool(self, ns: str, *args: str, timeout: float = 20.0, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.ns(ns, PY, NETTOOLS, *args, timeout=timeout, check=check)

    def tool_bg(self, ns: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, NETTOOLS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        for f in self.tmp.glob("*"):
            f.unlink(missing_ok=True)
        if self.tmp.exists():
            self.tmp.rmdir()


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def wait_for(pred: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def wait_status(path: Path, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll a status file until ``pred(status)``; return the last status (assert on it)."""
    last: dict[str, Any] = {}

    def ok() -> bool:
        nonlocal last
        st = read_status(path)
        if st is not None:
            last = st
        return st is not None and bool(pred(st))

    wait_for(ok, timeout)
    return last


def has_root() -> bool:
    return os.geteuid() == 0 and Path("/dev/net/tun").exists()
