"""Typed bus services on top of NATS micro (``$SRV.PING/INFO/STATS`` discovery).

A :class:`BusService` registers one micro endpoint per command. Each
endpoint decodes the envelope and payload, authenticates the actor, validates
the payload against its pydantic model, runs the handler and replies with a
typed result or a typed error. Unknown verbs under the service's prefix get
an ``unknown_command`` error instead of silence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig
from pydantic import BaseModel, ValidationError

from bus import codec, subjects
from bus.connection import Bus
from bus.envelope import SCHEMA_PREFIX, Envelope
from bus.errors import (
    ErrorCode,
    ErrorReply,
    InternalError,
    SkyferryError,
    UnknownCommand,
    ValidationFailed,
)
from bus.idempotency import RequestKey, request_digest
from bus.subjects import ContentType, Header

IDEMPOTENCY_FIELD = "idempotency_key"

log = structlog.get_logger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp", bound=BaseModel)


def schema_name(model: type[BaseModel]) -> str:
    """Versioned wire type name of a model (``skyferry.v1.<ModelName>``)."""
    explicit = getattr(model, "__schema_name__", None)
    return str(explicit) if explicit else f"{SCHEMA_PREFIX}{model.__name__}"


@dataclass
class CommandContext:
    """What a handler knows about the request besides its payload."""

    subject: str
    envelope: Envelope
    principal: Any
    bus: Bus
    log: Any
    idempotency: RequestKey | None = None
    """The command's idempotency key (saga steps); the handler keeps it with its effect."""


class Authenticator(Protocol):
    """Proves who sent a command; returns the principal or raises ``Unauthenticated``."""

    async def authenticate(self, subject: str, envelope: Envelope, body: bytes) -> Any: ...


Handler = Callable[[CommandContext, Any], Awaitable[BaseModel]]


@dataclass
class CommandSpec(Generic[Req, Resp]):
    """One command a service answers."""

    verb: str
    request: type[BaseModel]
    response: type[BaseModel]
    handler: Handler
    description: str = ""
    public: bool = False
    """Public commands skip authentication (health, schema)."""

    def metadata(self) -> dict[str, str]:
        return {
            "request_schema": schema_name(self.request),
            "response_schema": schema_name(self.response),
            "description": self.description,
            "auth": "none" if self.public else "signed",
        }


@dataclass
class BusService:
    """A component's command surface on the bus."""

    bus: Bus
    name: str
    version: str
    description: str = ""
    authenticator: Authenticator | None = None
    instance_metadata: dict[str, str] = field(default_factory=dict)
    subject_prefix: str | None = None
    """Subject prefix of the endpoints; default ``sf.cmd.<name>`` (agents use ``sf.agent.<id>``)."""
    _commands: dict[str, CommandSpec[Any, Any]] = field(default_factory=dict)
    _service: Service | None = None
    _catch_all: Subscription | None = None

    def command(
        self,
        verb: str,
        request: type[BaseModel],
        response: type[BaseModel],
        *,
        description: str = "",
        public: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler(ctx, request) -> response`` for ``verb``."""

        def register(handler: Handler) -> Handler:
            self.add(CommandSpec(verb, request, response, handler, description or (handler.__doc__ or ""), public))
            return handler

        return register

    def add_command_spec(
        self,
        verb: str,
        request: type[BaseModel],
        response: type[BaseModel],
        handler: Handler,
        description: str = "",
        *,
        public: bool = False,
    ) -> None:
        """Register ``handler(ctx, request) -> response`` for ``verb`` (non-decorator form)."""
        self.add(CommandSpec(verb, request, response, handler, description, public))

    def add(self, spec: CommandSpec[Any, Any]) -> None:
        subjects.token(spec.verb)
        if spec.verb in self._commands:
            raise ValueError(f"duplicate command {spec.verb!r}")
        self._commands[spec.verb] = spec

    @property
    def commands(self) -> dict[str, CommandSpec[Any, Any]]:
        return dict(self._commands)

    @property
    def prefix(self) -> str:
        return self.subject_prefix or subjects.command_group(self.name)

    async def start(self) -> None:
        """Register the micro service and its endpoints."""
        self._service = await add_service(
            self.bus.nc,
            ServiceConfig(
                name=self.name,
                version=self.version,
                description=self.description,
                metadata=self.instance_metadata,
                queue_group="q",
            ),
        )
        for spec in self._commands.values():
            await self._service.add_endpoint(
                name=spec.verb,
                subject=f"{self.prefix}.{spec.verb}",
                handler=self._make_handler(spec),
                metadata=spec.metadata(),
            )
        # A second queue group so exactly one instance answers verbs nobody serves.
        self._catch_all = await self.bus.nc.subscribe(f"{self.prefix}.>", queue="sf-unknown", cb=self._on_unknown)
        # Make sure the server has every subscription before anyone is told we are up.
        await self.bus.nc.flush()
        log.info("service_started", service=self.name, commands=sorted(self._commands))

    async def stop(self) -> None:
        if self._catch_all is not None:
            await self._catch_all.unsubscribe()
            self._catch_all = None
        if self._service is not None:
            await self._service.stop()
            self._service = None

    async def __aenter__(self) -> BusService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_unknown(self, msg: Msg) -> None:
        verb = msg.subject[len(self.prefix) + 1 :]
        if verb in self._commands or not msg.reply:
            return
        err = UnknownCommand(f"{self.name} has no command {verb!r}", details={"known": sorted(self._commands)})
        body, headers = _error_message(err, ContentType.MSGPACK, msg.headers)
        await self.bus.nc.publish(msg.reply, body, headers=headers)

    def _make_handler(self, spec: CommandSpec[Any, Any]) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            body, headers = await self._dispatch(spec, request.subject, request.data, request.headers)
            await request.respond(body, headers=headers)

        return handle

    async def _dispatch(
        self, spec: CommandSpec[Any, Any], subject: str, data: bytes, raw_headers: dict[str, str] | None
    ) -> tuple[bytes, dict[str, str]]:
        ctype = ContentType.MSGPACK
        try:
            envelope = Envelope.from_headers(raw_headers, default_schema=schema_name(spec.request))
            ctype = envelope.content_type
            payload = codec.decode_mapping(data, ctype)
            principal = None
            if self.authenticator is not None and not spec.public:
                principal = await self.authenticator.authenticate(subject, envelope, data)
            idem_key = _idempotency_key(raw_headers, payload, spec.request)
            request_key = RequestKey(idem_key, request_digest(subject, payload)) if idem_key else None
            try:
                request = spec.request.model_validate(payload)
            except ValidationError as exc:
                raise ValidationFailed(f"invalid {spec.verb} request", details={"errors": _errors(exc)}) from exc
            ctx = CommandContext(
                subject=subject,
                envelope=envelope,
                principal=principal,
                bus=self.bus,
                log=log.bind(
                    service=self.name,
                    verb=spec.verb,
                    msg_id=envelope.msg_id,
                    correlation_id=envelope.correlation_id or envelope.msg_id,
                    actor=envelope.actor,
                ),
                idempotency=request_key,
            )
            result = await spec.handler(ctx, request)
            headers = {
                Header.SCHEMA.value: schema_name(spec.response),
                Header.CONTENT_TYPE.value: ctype.value,
                Header.CORRELATION_ID.value: envelope.correlation_id or envelope.msg_id,
                Header.CAUSATION_ID.value: envelope.msg_id,
            }
            return codec.encode(result, ctype), headers
        except SkyferryError as err:
            log.info("command_refused", service=self.name, verb=spec.verb, code=str(err.code), error=err.message)
            return _error_message(err, ctype, raw_headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("command_crashed", service=self.name, verb=spec.verb)
            return _error_message(InternalError(f"internal error: {exc!r}"), ctype, raw_headers)


def _idempotency_key(headers: dict[str, str] | None, payload: dict[str, Any], model: type[BaseModel]) -> str | None:
    """The request's idempotency key; a payload field the model does not declare is removed."""
    key = (headers or {}).get(Header.IDEMPOTENCY_KEY)
    if IDEMPOTENCY_FIELD not in model.model_fields:
        field_value = payload.pop(IDEMPOTENCY_FIELD, None)
        key = key or (str(field_value) if field_value is not None else None)
    return key


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _error_message(
    err: SkyferryError, ctype: ContentType, request_headers: dict[str, str] | None
) -> tuple[bytes, dict[str, str]]:
    reply: ErrorReply = err.to_reply()
    headers = {
        Header.ERROR.value: reply.code.value,
        Header.SCHEMA.value: reply.type,
        Header.CONTENT_TYPE.value: ctype.value,
        # NATS micro's own error headers, so generic tooling sees the failure too.
        "Nats-Service-Error": reply.message[:200],
        "Nats-Service-Error-Code": _http_like(reply.code),
    }
    corr = (request_headers or {}).get(Header.CORRELATION_ID) or (request_headers or {}).get(Header.MSG_ID)
    if corr:
        headers[Header.CORRELATION_ID.value] = corr
    try:
        body = codec.encode(reply, ctype)
    except SkyferryError:
        body = json.dumps({"code": reply.code.value, "message": reply.message}).encode()
    return body, headers


def _http_like(code: ErrorCode) -> str:
    return {
        ErrorCode.BAD_REQUEST: "400",
        ErrorCode.MALFORMED: "400",
        ErrorCode.VALIDATION: "400",
        ErrorCode.UNKNOWN_COMMAND: "404",
        ErrorCode.NOT_FOUND: "404",
        ErrorCode.UNAUTHENTICATED: "401",
        ErrorCode.FORBIDDEN: "403",
        ErrorCode.ALREADY_EXISTS: "409",
        ErrorCode.CONFLICT: "409",
        ErrorCode.INVALID_STATE: "409",
        ErrorCode.UNAVAILABLE: "503",
        ErrorCode.TIMEOUT: "504",
    }.get(code, "500")
