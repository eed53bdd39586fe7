"""Test kit for sagas, shipped with the code: a scripted participant, an in-memory transport, a fake clock.

:class:`TestParticipant` is a bus service (``testpart``) answering ``sf.cmd.testpart.do``
and ``sf.cmd.testpart.undo``. What it does per request is scripted
(:class:`Behaviour`: sleep, fail N times retryably, fail for good, result). It
dedupes by idempotency key: a known key gets the cached result, a key in flight
waits for the first execution. Every *effect* (first successful execution of a
key) is recorded in a sqlite file, so a test can check each effect happened
exactly once across coordinator crashes (:func:`read_effects`).

Run it as a process::

    python -m manager.saga.testing --server nats://127.0.0.1:4222 --log effects.sqlite \\
        --script '{"default": {"sleep_s": 0.2}, "do": {"s4": {"fail_always": "validation"}}}'
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from bus import codec, subjects
from bus.connection import Bus, BusConfig
from bus.errors import BusTimeout, ErrorCode, ErrorReply, NoResponders, RemoteError, ValidationFailed, error_from_reply
from bus.service import Authenticator, BusService, CommandContext, CommandSpec
from manager.saga.plan import ActionRef, RetryPolicy, SagaPlan, StepSpec

SERVICE = "testpart"


class Behaviour(BaseModel):
    """What the participant does for one request."""

    model_config = ConfigDict(extra="forbid")
    sleep_s: float = Field(default=0.0, ge=0, description="Sleep before acting (each execution).")
    fail_times: int = Field(default=0, ge=0, description="Fail the first N executions of a key.")
    fail_code: ErrorCode = Field(default=ErrorCode.UNAVAILABLE, description="Code of those N failures.")
    fail_always: ErrorCode | None = Field(default=None, description="Fail every execution with this code.")
    result: dict[str, Any] = Field(default_factory=dict, description="Merged into the reply.")


class Script(BaseModel):
    """Behaviours by verb and ``name`` (the payload's ``name`` field); ``default`` for the rest."""

    model_config = ConfigDict(extra="forbid")
    do: dict[str, Behaviour] = Field(default_factory=dict)
    undo: dict[str, Behaviour] = Field(default_factory=dict)
    default: Behaviour = Field(default_factory=Behaviour)

    def behaviour(self, verb: str, name: str) -> Behaviour:
        """The behaviour for a request of ``verb`` about ``name``."""
        by_name = self.do if verb == "do" else self.undo
        return by_name.get(name, self.default)


class Effect(BaseModel):
    """One recorded effect."""

    seq: int
    key: str
    verb: str
    name: str
    payload: dict[str, Any]
    result: dict[str, Any]
    at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    verb TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    result TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    verb TEXT NOT NULL,
    name TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class EffectLog:
    """Effects and calls in sqlite (a file, or memory when ``path`` is None); also the dedupe cache."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def result_of(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT result FROM effects WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def record_call(self, key: str, verb: str, name: str) -> None:
        self._db.execute("INSERT INTO calls (key, verb, name, at) VALUES (?, ?, ?, ?)", (key, verb, name, _now()))

    def record_effect(
        self, key: str, verb: str, name: str, payload: dict[str, Any], extra: dict[str, Any]
    ) -> dict[str, Any]:
        """Record the effect of ``key`` once and return its result (which names the effect's seq)."""
        with self._db:
            cur = self._db.execute(
                "INSERT INTO effects (key, verb, name, payload, result, at) VALUES (?, ?, ?, ?, '{}', ?)",
                (key, verb, name, json.dumps(payload, default=str), _now()),
            )
            seq = int(cur.lastrowid or 0)
            result = {"name": name, "verb": verb, "key": key, "effect": seq, **extra}
            self._db.execute("UPDATE effects SET result = ? WHERE seq = ?", (json.dumps(result), seq))
        return result

    def effects(self) -> list[Effect]:
        return _effects(self._db)

    def calls(self) -> list[tuple[str, str, str]]:
        """Every request received: (verb, name, key), in order."""
        return [(r[0], r[1], r[2]) for r in self._db.execute("SELECT verb, name, key FROM calls ORDER BY id")]


def read_effects(path: Path) -> list[Effect]:
    """The effects recorded in a participant's log file, in order."""
    db = sqlite3.connect(str(path))
    try:
        return _effects(db)
    finally:
        db.close()


def _effects(db: sqlite3.Connection) -> list[Effect]:
    rows = db.execute("SELECT seq, key, verb, name, payload, result, at FROM effects ORDER BY seq").fetchall()
    return [
        Effect(seq=r[0], key=r[1], verb=r[2], name=r[3], payload=json.loads(r[4]), result=json.loads(r[5]), at=r[6])
        for r in rows
    ]


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


class ScriptedParticipant:
    """The participant's logic, independent of transport (used by TestParticipant and MemoryTransport)."""

    def __init__(self, script: Script | None = None, log: EffectLog | None = None) -> None:
        self.script = script or Script()
        self.log = log or EffectLog()
        self._failures: Counter[str] = Counter()
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.active = 0
        """Executions running now."""
        self.max_active = 0
        """Most executions that ever ran at once."""

    @property
    def in_flight(self) -> set[str]:
        """Idempotency keys being executed right now."""
        return set(self._inflight)

    async def handle(self, verb: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Serve one request.

        Raises:
            RemoteError subclass: a scripted failure, or ValidationFailed without an idempotency key.
        """
        key = payload.get("idempotency_key")
        if not isinstance(key, str) or not key:
            raise ValidationFailed("idempotency_key is required")
        name = str(payload.get("name", ""))
        self.log.record_call(key, verb, name)
        cached = self.log.result_of(key)
        if cached is not None:
            return cached
        if key in self._inflight:
            return await asyncio.shield(self._inflight[key])
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._execute(verb, name, key, payload)
        except BaseException as exc:
            if isinstance(exc, Exception):
                fut.set_exception(exc)
                fut.exception()  # waiters (if any) get it too; mark it retrieved
            else:
                fut.cancel()
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._inflight[key]

    async def _execute(self, verb: str, name: str, key: str, payload: dict[str, Any]) -> dict[str, Any]:
        b = self.script.behaviour(verb, name)
        if "behaviour" in payload:
            b = Behaviour.model_validate(payload["behaviour"])
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if b.sleep_s:
                await asyncio.sleep(b.sleep_s)
            if b.fail_always is not None:
                raise _error(b.fail_always, f"{verb} {name}: scripted permanent failure")
            if self._failures[key] < b.fail_times:
                self._failures[key] += 1
                raise _error(b.fail_code, f"{verb} {name}: scripted failure {self._failures[key]}/{b.fail_times}")
            clean = {k: v for k, v in payload.items() if k != "behaviour"}
            return self.log.record_effect(key, verb, name, clean, b.result)
        finally:
            self.active -= 1


def _error(code: ErrorCode, message: str) -> RemoteError:
    return error_from_reply(ErrorReply(code=code, message=message))


class ParticipantRequest(BaseModel):
    """``do``/``undo`` request: the idempotency key, a name the script knows, anything else."""

    __schema_name__: ClassVar[str] = "skyferry.v1.testpart.request"
    model_config = ConfigDict(extra="allow")
    idempotency_key: str
    name: str = ""


class ParticipantReply(BaseModel):
    """``do``/``undo`` reply: which effect (seq in the log) the key produced."""

    __schema_name__: ClassVar[str] = "skyferry.v1.testpart.reply"
    model_config = ConfigDict(extra="allow")
    name: str
    verb: str
    key: str
    effect: int


class TestParticipant:
    """A scripted, deduping participant on the bus (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        bus: Bus,
        *,
        log_path: Path | None = None,
        script: Script | None = None,
        service: str = SERVICE,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.core = ScriptedParticipant(script, EffectLog(log_path))
        self.service = BusService(
            bus,
            name=service,
            version="0.1.0",
            description="Scripted saga test participant.",
            authenticator=authenticator,
        )
        for verb in ("do", "undo"):
            self.service.add(
                CommandSpec(verb, ParticipantRequest, ParticipantReply, self._handler(verb), f"{verb} (scripted)")
            )

    def _handler(self, verb: str) -> Callable[[CommandContext, Any], Awaitable[BaseModel]]:
        async def handle(ctx: CommandContext, request: ParticipantRequest) -> ParticipantReply:
            result = await self.core.handle(verb, request.model_dump())
            return ParticipantReply.model_validate(result)

        return handle

    @property
    def log(self) -> EffectLog:
        return self.core.log

    async def start(self) -> None:
        """Start answering ``do``/``undo``."""
        await self.service.start()

    async def stop(self) -> None:
        """Stop answering and close the log."""
        await self.service.stop()
        self.core.log.close()

    async def __aenter__(self) -> TestParticipant:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def participant_step(
    step_id: str,
    *,
    depends_on: list[str] | None = None,
    group: str | None = None,
    compensate: bool = True,
    retry: RetryPolicy | None = None,
    timeout_s: float = 5.0,
    service: str = SERVICE,
    behaviour: Behaviour | None = None,
) -> StepSpec:
    """A step calling ``<service>.do`` (and ``undo`` as compensation) with ``name = step_id``."""
    payload: dict[str, Any] = {"name": step_id}
    if behaviour is not None:
        payload["behaviour"] = behaviour.model_dump(mode="json")
    return StepSpec(
        step_id=step_id,
        action=ActionRef(subject=subjects.command(service, "do"), payload=payload),
        compensation=ActionRef(subject=subjects.command(service, "undo"), payload={"name": step_id})
        if compensate
        else None,
        depends_on=depends_on or [],
        group=group,
        retry=retry or RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5),
        timeout_s=timeout_s,
    )


def chain_plan(
    saga_id: str,
    n: int,
    *,
    name: str | None = None,
    behaviours: dict[str, Behaviour] | None = None,
    service: str = SERVICE,
    timeout_s: float = 5.0,
    retry: RetryPolicy | None = None,
) -> SagaPlan:
    """A plan of ``n`` participant steps ``s1..sn``, each depending on the one before."""
    behaviours = behaviours or {}
    steps = [
        participant_step(
            f"s{i}",
            depends_on=[f"s{i - 1}"] if i > 1 else [],
            service=service,
            timeout_s=timeout_s,
            retry=retry,
            behaviour=behaviours.get(f"s{i}"),
        )
        for i in range(1, n + 1)
    ]
    return SagaPlan(saga_id=saga_id, name=name or f"chain of {n}", steps=steps)


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class MemoryTransport:
    """In-memory :class:`~manager.saga.transport.StepTransport`: subjects routed to handlers.

    A subject without a handler raises NoResponders. Like a real participant, a handler
    keeps running when the caller gives up (BusTimeout); those executions belong to the
    transport, and :meth:`aclose` waits for them. Payloads and replies go through the codec.
    """

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.requests: list[tuple[str, str]] = []
        """Every request sent: (subject, idempotency key)."""
        self._executions: set[asyncio.Task[dict[str, Any]]] = set()

    def register(self, subject: str, handler: Handler) -> None:
        """Serve ``subject`` with ``handler``."""
        self.handlers[subject] = handler

    def unregister(self, subject: str) -> None:
        """Stop serving ``subject`` (requests get NoResponders)."""
        self.handlers.pop(subject, None)

    def serve(self, participant: ScriptedParticipant, service: str = SERVICE) -> None:
        """Route ``sf.cmd.<service>.do/undo`` to a scripted participant."""
        for verb in ("do", "undo"):
            self.register(subjects.command(service, verb), _bind(participant, verb))

    async def request(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str,
        timeout: float,
        correlation_id: str,
    ) -> dict[str, Any]:
        self.requests.append((subject, idempotency_key))
        handler = self.handlers.get(subject)
        if handler is None:
            raise NoResponders(f"no participant serves {subject}", details={"subject": subject})
        wire = codec.decode_mapping(codec.encode({**payload, "idempotency_key": idempotency_key}))
        execution = asyncio.ensure_future(handler(wire))
        self._executions.add(execution)
        execution.add_done_callback(self._executions.discard)
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(execution)
        except TimeoutError as exc:
            raise BusTimeout(f"no reply from {subject} within {timeout}s") from exc
        return codec.decode_mapping(codec.encode(reply))

    async def aclose(self) -> None:
        """Wait for executions still running (their callers gave up)."""
        while self._executions:
            await asyncio.gather(*self._executions, return_exceptions=True)


def _bind(participant: ScriptedParticipant, verb: str) -> Handler:
    async def handle(payload: dict[str, Any]) -> dict[str, Any]:
        return await participant.handle(verb, payload)

    return handle


class FakeClock:
    """A clock whose sleeps return at once and move ``now`` forward; ``sleeps`` lists them."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._now += dt.timedelta(seconds=seconds)
        await asyncio.sleep(0)


async def _serve(server: str, log_path: Path, script: Script, service: str) -> None:
    bus = await Bus.connect(BusConfig.from_url(server, name=f"{service}-participant"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with TestParticipant(bus, log_path=log_path, script=script, service=service):
            print("ready", flush=True)
            await stop.wait()
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m manager.saga.testing``: run a TestParticipant until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m manager.saga.testing", description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="NATS URL(s), comma-separated")
    parser.add_argument("--log", required=True, type=Path, help="sqlite file recording effects")
    parser.add_argument("--script", default="{}", help="Script as JSON, or @path to a JSON file")
    parser.add_argument("--service", default=SERVICE, help="service name (default: testpart)")
    args = parser.parse_args(argv)
    raw = Path(args.script[1:]).read_text() if args.script.startswith("@") else args.script
    script = Script.model_validate_json(raw)
    try:
        asyncio.run(_serve(args.server, args.log, script, subjects.token(args.service)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
