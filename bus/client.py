"""Calling commands: sign, send, wait, and turn the reply into a model or a typed error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from bus import codec, signing, subjects
from bus.connection import Bus
from bus.envelope import Envelope
from bus.errors import (
    BusTimeout,
    BusUnavailable,
    CodecError,
    ErrorReply,
    NoResponders,
    error_from_reply,
)
from bus.service import schema_name
from bus.subjects import ContentType, Header

Resp = TypeVar("Resp", bound=BaseModel)

NO_RESPONDER_RETRIES = (0.05, 0.15)


@dataclass(frozen=True)
class Identity:
    """Who is acting: a user or component id and the nkey seed that proves it."""

    actor: str
    seed: str | None = None


async def request_raw(
    bus: Bus,
    subject: str,
    payload: BaseModel | dict[str, Any],
    *,
    identity: Identity | None = None,
    timeout: float = 5.0,
    content_type: ContentType = ContentType.MSGPACK,
    parent: Envelope | None = None,
) -> tuple[Envelope, Any]:
    """Send a signed request; return the reply envelope and decoded body.

    Raises:
        NoResponders, BusTimeout, BusUnavailable: transport failures (retryable).
        RemoteError subclass: the participant answered with a typed error.
    """
    body = codec.encode(payload, content_type)
    name = schema_name(type(payload)) if isinstance(payload, BaseModel) else "skyferry.v1.raw"
    env = parent.child(name) if parent else Envelope(schema_name=name)
    env = env.model_copy(update={"content_type": content_type, "actor": identity.actor if identity else env.actor})
    if identity and identity.seed:
        env = signing.sign(identity.seed, subject, env, body)
    try:
        msg = await _request(bus, subject, body, env.to_headers(), timeout)
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(f"no participant serves {subject}", details={"subject": subject}) from exc
    except nats.errors.TimeoutError as exc:
        raise BusTimeout(f"no reply from {subject} within {timeout}s", details={"subject": subject}) from exc
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
        raise BusUnavailable("bus connection closed") from exc
    reply_env = Envelope.from_headers(msg.headers, default_schema="")
    data = codec.decode(msg.data, reply_env.content_type)
    if (msg.headers or {}).get(Header.ERROR):
        try:
            raise error_from_reply(ErrorReply.model_validate(data))
        except ValidationError as exc:
            raise CodecError(f"unreadable error reply from {subject}") from exc
    return reply_env, data


async def _request(bus: Bus, subject: str, body: bytes, headers: dict[str, str], timeout: float) -> Msg:
    # nats-server can briefly answer "no responders" for a subscription made a moment ago
    # (seen right after JetStream is first enabled on an account), so look twice before giving up.
    for delay in NO_RESPONDER_RETRIES:
        try:
            return await bus.nc.request(subject, body, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            await asyncio.sleep(delay)
    return await bus.nc.request(subject, body, timeout=timeout, headers=headers)


async def call(
    bus: Bus,
    subject: str,
    payload: BaseModel | dict[str, Any],
    response: type[Resp],
    *,
    identity: Identity | None = None,
    timeout: float = 5.0,
    parent: Envelope | None = None,
) -> Resp:
    """Request/reply with a typed response model."""
    _, data = await request_raw(bus, subject, payload, identity=identity, timeout=timeout, parent=parent)
    try:
        return response.model_validate(data)
    except ValidationError as exc:
        raise CodecError(f"reply from {subject} is not a {response.__name__}: {exc}") from exc


async def command(
    bus: Bus,
    service: str,
    verb: str,
    payload: BaseModel | dict[str, Any],
    response: type[Resp],
    *,
    identity: Identity | None = None,
    timeout: float = 5.0,
) -> Resp:
    """Call ``sf.cmd.<service>.<verb>``."""
    return await call(bus, subjects.command(service, verb), payload, response, identity=identity, timeout=timeout)
