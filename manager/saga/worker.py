"""The coordinator process: ``python -m manager.saga.worker [--etc /etc/skyferry] [--server nats://...]``.

What ``deploy/systemd/skyferry-saga.service`` runs. Keys default to the files ``deploy/install.sh`` makes
under the config directory (``--etc``, else ``$SKYFERRY_ETC``, else ``/etc/skyferry``), each used if
it exists:

* ``keys/saga.nk``: the NATS connection seed of the ``saga`` role (it may append only saga events);
* ``keys/saga-coordinator.nk``: the signing seed of the coordinator's service account. Every step
  request is signed with it (the manager refuses unsigned commands); the manager creates the account
  from ``keys/saga-coordinator.pub`` (``python -m manager --saga-account-key-file``).

On a secured bus (NATS credentials or a signing key given) the ``saga`` commands are authenticated like
the manager's: the caller's signature against its ``UserAccount`` (folded from the user events by
:class:`UserDirectory`), fresh (shared replay nonces), with the ``saga-operate`` authorisation.
Otherwise, as on an open test server where anyone may publish anything, they are not (``--auth`` /
``--no-auth`` override).

Waits for the manager to create the streams, starts the ``saga`` service and a heartbeat, resumes
unfinished sagas and serves until SIGTERM/SIGINT. On a signal it stops answering commands, cancels
the runs (a compensation in flight completes first; a step in flight is abandoned and re-run with
the same idempotency key by whoever resumes the saga), releases its leases so another coordinator
can take over at once, and drains the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from bus import signing, subjects
from bus.client import Identity
from bus.connection import Bus, BusConfig
from bus.errors import ErrorCode, SkyferryError
from bus.heartbeat import run_heartbeat
from bus.kinds import Aggregate
from bus.logs import configure_logging
from bus.models.users import Authorisation, UserAccount
from bus.permissions import Role
from bus.service import Authenticator
from bus.subjects import EVENTS_STREAM
from deploy import keys as install_keys
from manager.auth import AuthorisingAuthenticator, KvNonceStore, SignatureAuthenticator
from manager.saga.coordinator import SagaCoordinator, default_instance_id
from manager.saga.leases import DEFAULT_LEASE_TTL_S
from manager.saga.service import SERVICE_NAME, SagaService
from manager.store.recorder import JetStreamRecorder, stored_from_message
from manager.store.repository import Repository

log = structlog.get_logger(__name__)

STREAM_WAIT_MAX_S = 2.0


class WorkerSetupError(SkyferryError):
    """The coordinator cannot start: a key file is missing or unreadable."""

    code = ErrorCode.INVALID_STATE


class UserDirectory:
    """User accounts folded from the ``user`` events and kept current (a read-only follower).

    The manager owns the accounts; the coordinator only needs them to authenticate ``saga`` commands.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._repo = Repository(JetStreamRecorder(bus))
        self._sub: Subscription | None = None

    def lookup(self, user_id: str) -> UserAccount | None:
        state = self._repo.current(Aggregate.USER, user_id)
        return state if isinstance(state, UserAccount) else None

    async def start(self) -> None:
        """Fold the user events stored so far, then follow new ones."""
        async for ev in self._repo.recorder.read_all(0, aggregate_type=Aggregate.USER.value):
            self._repo.observe(ev)
        self._sub = await self.bus.js.subscribe(
            subjects.events_of(Aggregate.USER.value),
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._repo.position + 1
            ),
            cb=self._on_msg,
        )

    async def _on_msg(self, msg: Msg) -> None:
        try:
            seq = int(msg.metadata.sequence.stream)
            self._repo.observe(stored_from_message(msg.subject, seq, msg.headers, msg.data))
        except Exception as exc:  # one bad event must not stop the directory from following
            log.warning("user_directory_skip_event", subject=msg.subject, error=repr(exc))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


async def wait_for_streams(bus: Bus) -> None:
    """Wait until the manager has created ``SF_EVENTS`` (the saga role may not create streams)."""
    delay = 0.1
    while True:
        try:
            await bus.js.stream_info(EVENTS_STREAM)
            return
        except nats.js.errors.NotFoundError:
            log.info("saga_worker_waiting_for_streams", stream=EVENTS_STREAM)
        except Exception as exc:  # timeouts while the server starts, or a reconnect
            log.info("saga_worker_waiting_for_streams", stream=EVENTS_STREAM, error=repr(exc))
        await asyncio.sleep(delay)
        delay = min(delay * 2, STREAM_WAIT_MAX_S)


@dataclass
class WorkerConfig:
    """What the coordinator process needs."""

    bus: BusConfig
    instance: str
    identity: Identity
    authenticate: bool
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    heartbeat_s: float = 5.0


async def serve(config: WorkerConfig) -> None:
    """Run one coordinator until SIGTERM/SIGINT."""
    instance = config.instance
    bus = await Bus.connect(config.bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    directory: UserDirectory | None = None
    try:
        await wait_for_streams(bus)
        authenticator: Authenticator | None = None
        if config.authenticate:
            directory = UserDirectory(bus)
            await directory.start()
            authenticator = AuthorisingAuthenticator(
                SignatureAuthenticator(directory.lookup, await KvNonceStore.open(bus)), Authorisation.SAGA_OPERATE
            )
        coordinator = SagaCoordinator(
            bus, JetStreamRecorder(bus), config.identity, instance_id=instance, lease_ttl_s=config.lease_ttl_s
        )
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(coordinator.serve(), name="saga-coordinator")
            beat = tg.create_task(
                run_heartbeat(
                    bus,
                    SERVICE_NAME,
                    coordinator.instance_id,
                    interval_s=config.heartbeat_s,
                    details=lambda: {"running": len(coordinator.running), "actor": config.identity.actor},
                ),
                name="saga-heartbeat",
            )
            async with SagaService(bus, coordinator, authenticator=authenticator):
                log.info(
                    "saga_worker_ready",
                    instance=instance,
                    servers=config.bus.servers,
                    actor=config.identity.actor,
                    signed=config.identity.seed is not None,
                    authenticated=config.authenticate,
                )
                await stop.wait()
                log.info("saga_worker_stopping", instance=instance, running=coordinator.running)
            # No more commands; now cancel the runs (leases are released as they unwind).
            beat.cancel()
            serving.cancel()
    finally:
        if directory is not None:
            await directory.stop()
        await bus.close()
        log.info("saga_worker_stopped", instance=instance)


def _key_file(explicit: Path | None, default: Path) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise WorkerSetupError(f"key file {explicit} does not exist", details={"path": str(explicit)})
        return explicit
    return default if default.is_file() else None


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The coordinator's configuration from the command line and the config directory.

    Raises:
        WorkerSetupError: a key file given explicitly is missing or not a seed.
    """
    keys = install_keys.etc_dir(args.etc) / "keys"
    nkey = None if args.creds else _key_file(args.nkey_file, install_keys.seed_path(keys, Role.SAGA.value))
    signing_file = _key_file(args.signing_key_file, install_keys.seed_path(keys, install_keys.SAGA_SIGNER))
    seed = None
    if signing_file is not None:
        seed = signing_file.read_text().strip()
        try:
            signing.public_key_of(seed)
        except Exception as exc:  # nkeys raises its own types for a malformed seed
            raise WorkerSetupError(f"{signing_file} is not an nkey seed", details={"path": str(signing_file)}) from exc
    secured = nkey is not None or args.creds is not None or seed is not None
    # A host name (systemd's %H) may hold dots; an instance id is one subject token.
    instance = re.sub(r"[^A-Za-z0-9_-]", "-", args.instance)[-64:] if args.instance else default_instance_id()
    return WorkerConfig(
        bus=BusConfig.from_url(args.server, name=f"saga-{instance}", nkey_seed_file=nkey, creds_file=args.creds),
        instance=instance,
        identity=Identity(actor=args.actor, seed=seed),
        authenticate=secured if args.auth is None else args.auth,
        lease_ttl_s=args.lease_ttl,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(prog="python -m manager.saga.worker", description="Skyferry saga coordinator.")
    install_keys.add_etc_and_server_args(parser)
    parser.add_argument(
        "--instance",
        default=None,
        help="coordinator instance id (unique among live coordinators; a restart with the same id "
        "takes its sagas back at once instead of waiting for the leases to expire)",
    )
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL_S, help="saga lease TTL in seconds")
    parser.add_argument("--actor", default=install_keys.SAGA_SIGNER, help="the service account the steps are signed as")
    parser.add_argument(
        "--nkey-file", type=Path, default=None, help="NATS connection seed (default <etc>/keys/saga.nk)"
    )
    parser.add_argument("--creds", type=Path, default=None, help="NATS .creds file")
    parser.add_argument(
        "--signing-key-file",
        type=Path,
        default=None,
        help="the service account's signing seed (default <etc>/keys/saga-coordinator.nk)",
    )
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="authenticate saga commands (default: on when NATS credentials or a signing key are used)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--json-logs", "--log-json", action="store_true", help="JSON log lines instead of key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = parse_args(argv)
    configure_logging(args.log_level, json=args.json_logs)
    try:
        config = config_from_args(args)
    except WorkerSetupError as exc:
        log.error("saga_worker_setup_failed", error=exc.message, **exc.details)
        sys.exit(2)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
