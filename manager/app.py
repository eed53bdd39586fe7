"""The manager process: repository, stream follower, command service, heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus import signing
from bus.client import Identity
from bus.connection import Bus, BusConfig, ensure_streams
from bus.envelope import new_id
from bus.heartbeat import run_heartbeat
from bus.kinds import KINDS, Aggregate
from bus.messages import all_event_models, event_type
from bus.models import UserAccount
from bus.models.users import Authorisation
from bus.schema_doc import build_document
from manager.auth import AuthorisingAuthenticator
from manager.follower import StreamFollower
from manager.projections import ProjectionRunner, Projector
from manager.saga import SagaCoordinator, SagaService
from manager.service import SERVICE, ManagerService
from manager.store.recorder import JetStreamRecorder
from manager.store.repository import Loaded, Repository

log = structlog.get_logger(__name__)


@dataclass
class ManagerConfig:
    """What the manager needs to run."""

    bus: BusConfig
    admin_id: str = "admin"
    admin_public_key: str | None = None
    """Public nkey of the first administrator; created when the store has no users."""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    require_signatures: bool = True
    heartbeat_s: float = 5.0
    projection_url: str | None = None
    """SQLAlchemy URL of the read models (sqlite:///... or postgresql://...); None: no projections."""
    saga_seed: str | None = None
    """Seed of the saga coordinator's service account; None: no coordinator in this process."""
    saga_public_key: str | None = None
    """Public key of a coordinator run as its own process (``python -m manager.saga.worker``): the
    service account is created from it so that its signed steps are accepted. Implied by ``saga_seed``."""
    saga_account: str = "saga-coordinator"


class ManagerApp:
    """Runs the manager until stopped; use ``async with``."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.bus: Bus | None = None
        self.repo: Repository | None = None
        self.service: ManagerService | None = None
        self._follower: StreamFollower | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.projector: Projector | None = None
        self.projection_runner: ProjectionRunner | None = None
        self._projection_task: asyncio.Task[None] | None = None
        self.sagas: SagaCoordinator | None = None
        self.saga_service: SagaService | None = None
        self._saga_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.bus = await Bus.connect(self.config.bus)
        await ensure_streams(self.bus)
        self.repo = Repository(JetStreamRecorder(self.bus))
        n = await self.repo.warm()
        self._follower = StreamFollower(self.bus, self.repo)
        await self._follower.start()
        await self._bootstrap_admin()
        # Before the service answers: a coordinator's first signed step must find its account.
        seed = self.config.saga_seed
        saga_key = signing.public_key_of(seed) if seed else self.config.saga_public_key
        if saga_key:
            await self._bootstrap_saga_account(saga_key)
        self.service = ManagerService(self.bus, self.repo, require_signatures=self.config.require_signatures)
        svc = self.service
        svc.schema_provider = lambda: build_document([s for s in [svc.service] if s], all_event_models())
        await self.service.start()
        self._heartbeat = asyncio.create_task(
            run_heartbeat(
                self.bus, SERVICE, self.config.instance, interval_s=self.config.heartbeat_s, details=self._details
            )
        )
        if self.config.saga_seed:
            await self._start_sagas(self.config.saga_seed)
        if self.config.projection_url:
            self.projector = Projector(self.config.projection_url)
            await self.projector.create_schema()
            self.projection_runner = ProjectionRunner(self.bus, self.projector)
            self._projection_task = asyncio.create_task(self.projection_runner.run())
        log.info("manager_started", instance=self.config.instance, events_folded=n)

    async def _bootstrap_saga_account(self, public_key: str) -> None:
        """Create the coordinator's service account (steps are signed with it) unless it exists."""
        account = UserAccount(
            id=self.config.saga_account,
            display_name="Saga coordinator (service account)",
            public_key=public_key,
            authorisations={Authorisation.ADMIN},
        )
        await self._bootstrap_user(account, only_if_no_users=False)
        existing = self.repo.current(Aggregate.USER, account.id) if self.repo else None
        if isinstance(existing, UserAccount) and existing.public_key != public_key:
            log.warning(
                "saga_account_key_differs",
                account=account.id,
                hint="the account keeps its recorded key; update it with `skyferry user update` to rotate",
            )

    async def _start_sagas(self, seed: str) -> None:
        assert self.bus is not None and self.repo is not None and self.service is not None
        self.sagas = SagaCoordinator(
            self.bus,
            JetStreamRecorder(self.bus),
            Identity(self.config.saga_account, seed),
            instance_id=f"mgr-{self.config.instance}",
        )
        self.saga_service = SagaService(
            self.bus,
            self.sagas,
            authenticator=AuthorisingAuthenticator(self.service.authenticator, Authorisation.SAGA_OPERATE),
        )
        await self.saga_service.start()
        self._saga_task = asyncio.create_task(self.sagas.serve())

    def _details(self) -> dict[str, Any]:
        assert self.repo is not None
        return {"position": self.repo.position}

    async def _bootstrap_admin(self) -> None:
        if self.config.admin_public_key is None:
            return
        admin = UserAccount(
            id=self.config.admin_id,
            display_name="Administrator",
            public_key=self.config.admin_public_key,
            authorisations={Authorisation.ADMIN},
        )
        await self._bootstrap_user(admin, only_if_no_users=True)

    async def _bootstrap_user(self, admin: UserAccount, *, only_if_no_users: bool) -> None:
        assert self.repo is not None
        if only_if_no_users and self.repo.cached(Aggregate.USER):
            return
        if self.repo.current(Aggregate.USER, admin.id) is not None:
            return

        def decide(cur: Loaded) -> tuple[str, dict[str, Any]]:
            return event_type(KINDS["user"].name, "created"), {"record": admin.model_dump(mode="json")}

        with contextlib.suppress(Exception):  # another instance may have bootstrapped first
            await self.repo.write(
                Aggregate.USER,
                admin.id,
                decide,
                expected_version=0,
                actor="system",
                msg_id=f"bootstrap-{admin.id}-{new_id()}",
            )
            log.info("admin_bootstrapped", user=admin.id)

    async def stop(self) -> None:
        if self.saga_service:
            await self.saga_service.stop()
        if self._saga_task:
            self._saga_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._saga_task
        if self.projection_runner and self._projection_task:
            self.projection_runner.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._projection_task, 5.0)
        if self.projector:
            await self.projector.close()
        if self._heartbeat:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self.service:
            await self.service.stop()
        if self._follower:
            await self._follower.stop()
        if self.bus:
            await self.bus.close()
        log.info("manager_stopped", instance=self.config.instance)

    async def __aenter__(self) -> ManagerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
