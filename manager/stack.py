"""The embedded stack: nats-server with per-role nkey users, the manager, and their keys on disk.

Layout of a state directory::

    stack.json            url and where the keys are (read by the CLI)
    keys/<role>.nk        NATS connection seeds per role (manager, component, agent, cli, observer)
    keys/admin.nk         the first administrator's signing seed
    nats/js/              JetStream store
    read-models.sqlite    SQL projections
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bus import signing
from bus.connection import BusConfig
from bus.permissions import Role
from bus.server import DEFAULT_SYNC_INTERVAL, EmbeddedNatsServer, NkeyUser, ServerConfig, free_port
from manager.app import ManagerApp, ManagerConfig

log = structlog.get_logger(__name__)

ADMIN_ID = "admin"
SAGA_ACCOUNT = "saga-coordinator"


def default_state_dir() -> Path:
    return Path(os.environ.get("SKYFERRY_HOME", Path.home() / ".local" / "share" / "skyferry"))


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


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

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    def ensure_keys(self) -> dict[str, str]:
        """Create missing seeds; return name -> seed."""
        seeds: dict[str, str] = {}
        for name in [*(r.value for r in Role), ADMIN_ID, SAGA_ACCOUNT]:
            path = self.keys_dir / f"{name}.nk"
            if not path.exists():
                _write_secret(path, signing.generate_user_seed())
            seeds[name] = path.read_text().strip()
        return seeds

    def bus_config(self, role: Role, name: str) -> BusConfig:
        """How a participant of ``role`` connects to this stack."""
        assert self.info is not None
        return BusConfig(servers=[self.info.url], name=name, nkey_seed_file=self.info.key_file(role.value))

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        seeds = self.ensure_keys()
        previous = StackInfo.load(self.state_dir)
        port = self.port or (int(previous.url.rsplit(":", 1)[1]) if previous else free_port(self.host))
        users = [NkeyUser(signing.public_key_of(seeds[r.value]), r) for r in Role]
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
            )
        )
        await self.manager.start()
        log.info("stack_up", url=self.info.url, state_dir=str(self.state_dir))

    async def stop(self) -> None:
        for extra in reversed(self.extras):
            await extra.stop()
        if self.manager:
            await self.manager.stop()
        if self.server:
            await self.server.stop()
        log.info("stack_down", state_dir=str(self.state_dir))

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
