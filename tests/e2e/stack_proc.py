"""``skyferry up`` as a separate process, as an operator runs it: start, wait until ready, kill, restart."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.manager.cli.conftest import clean_env, skyferry_command


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """A live, non-zombie process."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _die_with_test() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class UpProcess:
    """One ``skyferry -o json up --home HOME`` process; stdout/stderr go to files under HOME/../logs."""

    def __init__(self, home: Path, *, ready_timeout: float = 60.0) -> None:
        self.home = home
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs = home.parent / f"{home.name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.starts = 0
        self.info: dict[str, Any] = {}

    @property
    def nats_pid_file(self) -> Path:
        return self.home / "nats" / "nats-server.pid"

    def nats_pid(self) -> int | None:
        try:
            return int(self.nats_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        self.starts += 1
        out = open(self.logs / f"up-{self.starts}.out", "wb")  # noqa: SIM115 - the child owns it
        err = open(self.logs / f"up-{self.starts}.err", "wb")  # noqa: SIM115
        with out, err:
            self.proc = subprocess.Popen(
                [*skyferry_command(), "-o", "json", "up", "--home", str(self.home)],
                stdout=out,
                stderr=err,
                env=clean_env(),
                start_new_session=True,
                preexec_fn=_die_with_test,  # a killed test run leaves no stack behind
            )
        return self.proc

    def _ready_line(self) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"skyferry up exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
        text = (self.logs / f"up-{self.starts}.out").read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("{"):
                info: dict[str, Any] = json.loads(line)
                return info
        return None

    def start(self) -> dict[str, Any]:
        """Start and wait until the stack says it is up (it prints one JSON line when ready)."""
        self.spawn()
        self.info = wait_for(self._ready_line, self.ready_timeout, "skyferry up to be ready")
        return self.info

    def stderr(self) -> str:
        return (self.logs / f"up-{self.starts}.err").read_text(errors="replace")

    def sigkill(self) -> None:
        """SIGKILL the ``up`` process only (what an OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def sigkill_all(self) -> None:
        """SIGKILL every process of the stack at the same instant: ``up`` and its nats-server."""
        pids = [p for p in (self.proc.pid if self.proc else None, self.nats_pid()) if p]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        for pid in pids:
            wait_for(lambda p=pid: not pid_alive(p), 10, f"pid {pid} to die")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``skyferry ARGS`` against this home, as an operator would."""
        return subprocess.run(
            [*skyferry_command(), *args],
            env={**clean_env(), "SKYFERRY_HOME": str(self.home)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
