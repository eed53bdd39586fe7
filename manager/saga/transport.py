"""How a step's action reaches its participant, and how failures are classified.

:class:`StepTransport` is the small interface the coordinator needs;
:class:`BusTransport` sends a NATS request, :class:`manager.saga.testing.MemoryTransport`
is its in-memory twin for unit tests.

Every request carries the idempotency key twice: as ``idempotency_key`` in the
payload and as the envelope message id (``Sf-Msg-Id``), so a participant can
dedupe by either. All attempts of one step use the same key.
"""

from __future__ import annotations

from typing import Any, Protocol

import nats.errors
from pydantic import ValidationError

from bus import codec, signing
from bus.client import Identity
from bus.connection import Bus
from bus.envelope import Envelope
from bus.errors import (
    BusTimeout,
    BusUnavailable,
    CodecError,
    ErrorCode,
    ErrorReply,
    NoResponders,
    SkyferryError,
    error_from_reply,
)
from bus.subjects import Header
from manager.saga.events import StepError
from manager.saga.plan import RetryPolicy

STEP_REQUEST_SCHEMA = "skyferry.v1.saga.step_request"
IDEMPOTENCY_FIELD = "idempotency_key"


class StepTransport(Protocol):
    """Sends one attempt of an action or compensation and returns the participant's reply."""

    async def request(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str,
        timeout: float,
        correlation_id: str,
    ) -> dict[str, Any]:
        """Send and wait for the reply.

        Raises:
            NoResponders, BusTimeout, BusUnavailable: transport failures (retryable).
            RemoteError subclass: the participant answered with a typed error.
        """
        ...


class BusTransport:
    """:class:`StepTransport` over NATS request/reply, signed with the coordinator's identity."""

    def __init__(self, bus: Bus, identity: Identity) -> None:
        self.bus = bus
        self.identity = identity

    async def request(
        self,
        subject: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str,
        timeout: float,
        correlation_id: str,
    ) -> dict[str, Any]:
        body = codec.encode({**payload, IDEMPOTENCY_FIELD: idempotency_key})
        # bus.client.request_raw always mints a fresh message id; the step's must be its key.
        env = Envelope(
            msg_id=idempotency_key,
            correlation_id=correlation_id,
            actor=self.identity.actor,
            schema_name=STEP_REQUEST_SCHEMA,
        )
        if self.identity.seed:
            env = signing.sign(self.identity.seed, subject, env, body)
        try:
            msg = await self.bus.nc.request(subject, body, timeout=timeout, headers=env.to_headers())
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(f"no participant serves {subject}", details={"subject": subject}) from exc
        except nats.errors.TimeoutError as exc:
            raise BusTimeout(f"no reply from {subject} within {timeout}s", details={"subject": subject}) from exc
        except nats.errors.Error as exc:  # closed, draining, reconnecting, stale connection...
            raise BusUnavailable(f"bus unavailable: {exc!r}", details={"subject": subject}) from exc
        reply_env = Envelope.from_headers(msg.headers, default_schema="")
        data = codec.decode(msg.data, reply_env.content_type)
        if (msg.headers or {}).get(Header.ERROR):
            try:
                reply = ErrorReply.model_validate(data)
            except ValidationError as exc:
                raise CodecError(f"unreadable error reply from {subject}") from exc
            raise error_from_reply(reply)
        return data if isinstance(data, dict) else {"value": data}


def outcome_unknown(exc: SkyferryError) -> bool:
    """Whether the request may have reached the participant and taken effect."""
    return isinstance(exc, BusTimeout | BusUnavailable) or exc.code is ErrorCode.TIMEOUT


def classify(exc: BaseException, policy: RetryPolicy) -> StepError:
    """Turn an attempt's exception into the recorded error, deciding whether to retry.

    Retryable: the error says so (participant gone, timeout, unavailable, conflict) and its code is
    not in ``policy.non_retryable_codes``. Anything that is not a Skyferry error is a bug on our
    side or the participant's and is not retried.
    """
    if isinstance(exc, TimeoutError):
        exc = BusTimeout("attempt timed out")
    if not isinstance(exc, SkyferryError):
        return StepError(code=ErrorCode.INTERNAL.value, message=repr(exc), retryable=False)
    retryable = exc.retryable and exc.code not in policy.non_retryable_codes
    return StepError.from_exception(exc, retryable=retryable, outcome_unknown=outcome_unknown(exc))
