"""How a step's action reaches its participant, and how failures are classified.

:class:`StepTransport` is the small interface the coordinator needs;
:class:`BusTransport` sends a NATS request, :class:`manager.saga.testing.MemoryTransport`
is its in-memory twin for unit tests.

Every request carries the step's idempotency key (the same for every attempt and
for re-runs after a coordinator crash) in three places, so a participant can
dedupe by whichever it reads:

* the payload field ``idempotency_key``;
* the ``Sf-Idempotency-Key`` header;
* the envelope message id (``Sf-Msg-Id``): ``<key>~<nonce>``, the key plus a fresh
  suffix per send. A bare key would be the same on every attempt, and the signed
  command path (:func:`bus.signing.check_fresh`, used by ``manager.auth``) rejects a
  repeated message id as a replay: a retry would fail as ``unauthenticated``.
  ``BusTransport(exact_msg_id=True)`` sends the bare key for participants that
  dedupe by message id and do not check replays.
"""

from __future__ import annotations

from typing import Any, Protocol

import nats.errors
from pydantic import ValidationError

from bus import codec, signing
from bus.client import Identity
from bus.connection import Bus
from bus.envelope import Envelope, new_id
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
IDEMPOTENCY_HEADER = Header.IDEMPOTENCY_KEY.value
MSG_ID_SEPARATOR = "~"


def key_of_msg_id(msg_id: str) -> str:
    """The idempotency key inside a step request's message id."""
    return msg_id.split(MSG_ID_SEPARATOR, 1)[0]


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

    def __init__(self, bus: Bus, identity: Identity, *, exact_msg_id: bool = False) -> None:
        self.bus = bus
        self.identity = identity
        self.exact_msg_id = exact_msg_id

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
        # bus.client.request_raw mints a message id unrelated to the key, hence a request of our own.
        msg_id = idempotency_key if self.exact_msg_id else f"{idempotency_key}{MSG_ID_SEPARATOR}{new_id()[:12]}"
        env = Envelope(
            msg_id=msg_id,
            correlation_id=correlation_id,
            actor=self.identity.actor,
            schema_name=STEP_REQUEST_SCHEMA,
        )
        if self.identity.seed:
            env = signing.sign(self.identity.seed, subject, env, body)
        headers = {**env.to_headers(), IDEMPOTENCY_HEADER: idempotency_key}
        try:
            msg = await self.bus.nc.request(subject, body, timeout=timeout, headers=headers)
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
