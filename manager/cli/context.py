"""Who the CLI talks to and acts as: resolved from options, environment and the state directory.

Resolution order for each setting: command-line option, environment variable,
then what ``<home>/stack.json`` and ``<home>/keys/`` say, then a default.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import structlog
import typer
from pydantic import BaseModel, ValidationError

from bus import client, subjects
from bus.client import Identity
from bus.connection import Bus, BusConfig
from bus.errors import BusUnavailable, ErrorCode, SkyferryError
from bus.models import ModelError
from bus.permissions import Role
from manager.cli.errors import CliError, ExitCode, exit_code_of, local_error
from manager.cli.output import Output, OutputFormat
from manager.stack import StackInfo, default_state_dir

log = structlog.get_logger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_USER = "admin"
CONNECT_TIMEOUT_S = 2.0
MAX_RECONNECT_ATTEMPTS = 2

Resp = TypeVar("Resp", bound=BaseModel)


@dataclass
class Settings:
    """Global options of one invocation (see ``skyferry --help``)."""

    home: Path
    server: str | None = None
    nkey: Path | None = None
    creds: Path | None = None
    user: str | None = None
    user_key: Path | None = None
    output: OutputFormat = OutputFormat.TABLE
    timeout: float = 5.0
    verbose: bool = False
    home_explicit: bool = False
    """True when ``--home`` was given on the command line (not only via the environment)."""
    out: Output = field(init=False)

    def __post_init__(self) -> None:
        self.out = Output(self.output)

    @functools.cached_property
    def stack(self) -> StackInfo | None:
        """What ``<home>/stack.json`` says, if there is one."""
        try:
            return StackInfo.load(self.home)
        except (OSError, ValueError, TypeError) as exc:
            raise CliError(f"cannot read {self.home / 'stack.json'}: {exc}") from exc

    @property
    def keys_dir(self) -> Path:
        info = self.stack
        return Path(info.keys_dir) if info else self.home / "keys"

    def server_url(self) -> str:
        """``--server``, else the url in stack.json, else the local default."""
        if self.server:
            return self.server
        info = self.stack
        return info.url if info else DEFAULT_URL

    def nkey_file(self) -> Path | None:
        """The NATS connection seed: ``--nkey``, else ``<keys>/cli.nk`` if present (not with ``--creds``)."""
        if self.nkey is not None:
            if not self.nkey.is_file():
                raise CliError(f"nkey seed file {self.nkey} does not exist")
            return self.nkey
        if self.creds is not None:
            return None
        default = self.keys_dir / f"{Role.CLI.value}.nk"
        return default if default.is_file() else None

    def bus_config(self) -> BusConfig:
        """Connection settings; the CLI gives up quickly instead of retrying forever."""
        if self.creds is not None and not self.creds.is_file():
            raise CliError(f"credentials file {self.creds} does not exist")
        return BusConfig.from_url(
            self.server_url(),
            name="skyferry-cli",
            nkey_seed_file=self.nkey_file(),
            creds_file=self.creds,
            connect_timeout=CONNECT_TIMEOUT_S,
            max_reconnect_attempts=MAX_RECONNECT_ATTEMPTS,
            reconnect_time_wait=0.2,
            drain_timeout=2.0,
        )

    def actor(self) -> str | None:
        """``--user``, else ``admin`` when a stack.json exists."""
        if self.user:
            return self.user
        return DEFAULT_USER if self.stack else None

    def identity(self) -> Identity | None:
        """The acting user and their signing seed (``--user-key`` or ``<keys>/<user>.nk``)."""
        actor = self.actor()
        if actor is None:
            return None
        path = self.user_key
        if path is not None and not path.is_file():
            raise CliError(f"user key file {path} does not exist")
        if path is None:
            candidate = self.keys_dir / f"{actor}.nk"
            path = candidate if candidate.is_file() else None
        seed = path.read_text().strip() if path else None
        return Identity(actor, seed)

    def require_identity(self) -> Identity:
        """Like :meth:`identity`, but a signing seed is mandatory."""
        ident = self.identity()
        if ident is None or not ident.seed:
            who = ident.actor if ident else "(no user)"
            raise CliError(
                f"no signing key for {who}: pass --user and --user-key (or SKYFERRY_USER / SKYFERRY_USER_KEY)",
                code=ErrorCode.UNAUTHENTICATED,
            )
        return ident


class Session:
    """One bus connection of one invocation, acting as one identity."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.identity = settings.identity()

    @property
    def out(self) -> Output:
        return self.settings.out

    async def call(self, verb: str, payload: BaseModel | dict[str, Any], response: type[Resp]) -> Resp:
        """Call a manager command and validate its reply."""
        return await self.call_service("manager", verb, payload, response)

    async def call_service(
        self, service: str, verb: str, payload: BaseModel | dict[str, Any], response: type[Resp]
    ) -> Resp:
        """Call ``sf.cmd.<service>.<verb>`` and validate its reply."""
        return await client.command(
            self.bus, service, verb, payload, response, identity=self.identity, timeout=self.settings.timeout
        )

    async def raw(self, service: str, verb: str, payload: BaseModel | dict[str, Any]) -> Any:
        """Call ``sf.cmd.<service>.<verb>`` and return the decoded reply as plain data."""
        _, data = await client.request_raw(
            self.bus,
            subjects.command(service, verb),
            payload,
            identity=self.identity,
            timeout=self.settings.timeout,
        )
        return data


async def connect(config: BusConfig) -> Bus:
    """Connect without the daemon's reconnect chatter; failures become one clear error.

    Raises:
        CliError: the server refused the connection credentials (``unauthenticated``).
        BusUnavailable: no server reachable.
    """
    seen: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        seen.append(exc)
        log.debug("bus_error", error=repr(exc))

    async def quiet() -> None:
        log.debug("bus_connection_event")

    urls = ", ".join(config.servers)
    try:
        nc = await nats.connect(
            **config.connect_options(), error_cb=on_error, disconnected_cb=quiet, reconnected_cb=quiet
        )
    except Exception as exc:  # nats raises several unrelated types here
        causes = [*seen, exc]
        if any("authorization" in str(c).lower() or "authentication" in str(c).lower() for c in causes):
            raise CliError(
                f"the bus at {urls} refused the connection credentials (--nkey / --creds / keys/cli.nk)",
                code=ErrorCode.UNAUTHENTICATED,
                details={"servers": config.servers, "cause": repr(seen[-1] if seen else exc)},
            ) from exc
        reason = str(exc) or type(exc).__name__
        raise BusUnavailable(
            f"cannot reach the bus at {urls} ({reason}); is `skyferry up` running? (--server / SKYFERRY_NATS_URL)",
            details={"servers": config.servers, "cause": repr(exc)},
        ) from exc
    return Bus(nc, config)


@asynccontextmanager
async def session(settings: Settings) -> AsyncIterator[Session]:
    """A connected :class:`Session`, closed (drained) on exit."""
    bus = await connect(settings.bus_config())
    try:
        yield Session(settings, bus)
    finally:
        await bus.close()


def settings_of(ctx: typer.Context) -> Settings:
    """The global settings stored by the root callback."""
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        raise RuntimeError("global options were not parsed")
    return root.obj


def run(
    ctx: typer.Context,
    fn: Callable[[Settings], Coroutine[Any, Any, None]],
    *,
    interrupt_ok: bool = False,
) -> None:
    """Run one command's coroutine; map every expected failure to one line and an exit code."""
    settings = settings_of(ctx)
    failure: SkyferryError | None = None
    code = ExitCode.OK
    try:
        asyncio.run(fn(settings))
    except (ValidationError, ModelError) as exc:  # first: a ModelError is a SkyferryError too
        failure = local_error(exc, "input")
    except SkyferryError as err:
        failure = err
    except KeyboardInterrupt:
        code = ExitCode.OK if interrupt_ok else ExitCode.INTERRUPTED
    except OSError as exc:
        failure = CliError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except Exception as exc:
        if settings.verbose:
            traceback.print_exc()
        failure = CliError(f"unexpected {exc!r} (--verbose shows the traceback)", code=ErrorCode.INTERNAL)
    if failure is not None:
        settings.out.error(failure)
        code = exit_code_of(failure)
    if code is not ExitCode.OK:
        raise typer.Exit(int(code))


def run_session(
    ctx: typer.Context, fn: Callable[[Session], Coroutine[Any, Any, None]], *, interrupt_ok: bool = False
) -> None:
    """:func:`run` with a connected :class:`Session`."""

    async def body(settings: Settings) -> None:
        async with session(settings) as s:
            await fn(s)

    run(ctx, body, interrupt_ok=interrupt_ok)


def default_home() -> Path:
    """``SKYFERRY_HOME`` or the per-user state directory."""
    return default_state_dir().expanduser()
