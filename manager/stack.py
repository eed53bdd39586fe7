"""The embedded stack: nats-server with per-role nkey users, the manager, and their keys on disk.

Layout of a state directory::

    stack.json            url and where the keys are (read by the CLI)
    up.lock               held (flock) by the one process running the stack on this directory
    nats/nats-server.pid  the embedded server's pid, so a crashed owner's server can be found
    keys/<role>.nk        NATS connection seeds per role (manager, component, agent, cli, observer, saga)
    keys/admin.nk         the first administrator's signing seed (+ admin.pub)
    keys/saga-coordinator.nk  the saga coordinator's signing seed (+ .pub); keys made by deploy.keys
    nats/js/              JetStream store
    read-models.sqlite    SQL projections
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bus import signing
from bus.connection import BusConfig
from bus.errors import InvalidState
from bus.permissions import Role
from bus.server import DEFAULT_SYNC_INTERVAL, EmbeddedNatsServer, NkeyUser, ServerConfig, free_port
from deploy import keys as install_keys
from manager.app import ManagerApp, ManagerConfig

log = structlog.get_logger(__name__)

ADMIN_ID = install_keys.ADMIN
SAGA_ACCOUNT = install_keys.SAGA_SIGNER


def default_state_dir() -> Path:
    return Path(os.environ.get("SKYFERRY_HOME", Path.home() / ".local" / "share" / "skyferry"))


@dataclass
class StackInfo:
    """What ``stack.json`` records: how clients reach and authenticate to the stack."""

    url: str
    monitor_port: int
    keys_dir: str
    admin_id: str = ADMIN_ID

    def key_file(self, name: str) -> Path:
        return Path(self.keys_dir) / f"{name}.nk"

    @classmethod
    def load(cls, state_dir: Path) -> StackInfo | None:
        p = state_dir / "stack.json"
        if not p.exists():
            return None
        return cls(**json.loads(p.read_text()))

    def save(self, state_dir: Path) -> None:
        (state_dir / "stack.json").write_text(json.dumps(self.__dict__, indent=2))


class Stack:
    """Everything ``skyferry up`` runs, in one process."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        sync_interval: str = DEFAULT_SYNC_INTERVAL,
    ) -> None:
        self.state_dir = state_dir
        self.sync_interval = sync_interval
        self.host = host
        self.port = port
        self.server: EmbeddedNatsServer | None = None
        self.manager: ManagerApp | None = None
        self.info: StackInfo | None = None
        self.extras: list[Any] = []
        self._lock_fd: int | None = None

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    def ensure_keys(self) -> dict[str, str]:
        """Create missing seeds (the same code as ``deploy/install.sh``: :mod:`deploy.keys`); name -> seed."""
        return install_keys.ensure_keys(self.keys_dir).seeds

    def bus_config(self, role: Role, name: str) -> BusConfig:
        """How a participant of ``role`` connects to this stack."""
        assert self.info is not None
        return BusConfig(servers=[self.info.url], name=name, nkey_seed_file=self.info.key_file(role.value))

    def _lock(self) -> None:
        """Hold ``up.lock`` for the life of this process; the kernel releases it however the process dies.

        Raises:
            InvalidState: another live process runs the stack on this directory.
        """
        path = self.state_dir / "up.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise InvalidState(
                f"another process (pid {holder or '?'}) runs the stack on {self.state_dir}",
                details={"pid": holder, "home": str(self.state_dir)},
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _instance_id(self) -> str:
        """One instance id per home, kept across restarts: a restarted stack takes its saga leases
        back at once instead of waiting for them to expire (only one ``up`` runs per home)."""
        path = self.state_dir / "instance"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(uuid.uuid4().hex[:8] + "\n")
            tmp.replace(path)
        return path.read_text().strip()

    def _port(self, previous: StackInfo | None) -> int:
        """The operator's port, else the one clients already know (if it is free), else a new one."""
        if self.port:
            return self.port
        if previous is not None:
            port = int(previous.url.rsplit(":", 1)[1])
            if _bindable(self.host, port):
                return port
            log.warning("stack_port_taken", port=port, home=str(self.state_dir))
        return free_port(self.host)

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        seeds = self.ensure_keys()
        previous = StackInfo.load(self.state_dir)
        # A crashed owner's server may still hold the store and the port: stop it before choosing a port.
        await EmbeddedNatsServer(ServerConfig(store_dir=self.state_dir / "nats" / "js")).stop_orphan()
        port = self._port(previous)
        users = [NkeyUser(pub, r) for r, pub in install_keys.KeySet(seeds).role_public_keys().items()]
        self.server = EmbeddedNatsServer(
            ServerConfig(
                host=self.host,
                port=port,
                store_dir=self.state_dir / "nats" / "js",
                users=users,
                sync_interval=self.sync_interval,
            ),
            log_file=self.state_dir / "nats-server.log",
        )
        await self.server.start()
        self.info = StackInfo(
            url=self.server.url, monitor_port=self.server.config.monitor_port, keys_dir=str(self.keys_dir)
        )
        self.info.save(self.state_dir)
        self.manager = ManagerApp(
            ManagerConfig(
                bus=self.bus_config(Role.MANAGER, "manager"),
                admin_public_key=signing.public_key_of(seeds[ADMIN_ID]),
                projection_url=f"sqlite+aiosqlite:///{self.state_dir / 'read-models.sqlite'}",
                saga_seed=seeds[SAGA_ACCOUNT],
                saga_account=SAGA_ACCOUNT,
                instance=self._instance_id(),
            )
        )
        await self.manager.start()
        log.info("stack_up", url=self.info.url, state_dir=str(self.state_dir))

    async def stop(self) -> None:
        """Stop what runs (safe to call twice, and after a failed start)."""
        extras, self.extras = self.extras, []
        for extra in reversed(extras):
            await extra.stop()
        manager, self.manager = self.manager, None
        if manager:
            await manager.stop()
        server, self.server = self.server, None
        if server:
            await server.stop()
        self._unlock()
        log.info("stack_down", state_dir=str(self.state_dir))

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
