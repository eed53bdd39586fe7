"""The message envelope: ids, actor, time and schema carried in NATS headers.

The body stays a plain payload (msgpack or JSON) so that the plain ``nats``
CLI and downstream systems can read it; the envelope travels in headers.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from bus.errors import CodecError
from bus.subjects import ContentType, Header

SCHEMA_PREFIX = "skyferry.v1."


def new_id() -> str:
    """A new message id (uuid4 hex)."""
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Envelope(BaseModel):
    """Metadata of one message. Signature verification is in :mod:`bus.signing`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    msg_id: str = Field(default_factory=new_id, description="Unique id of this message.")
    correlation_id: str | None = Field(default=None, description="Id of the conversation/job.")
    causation_id: str | None = Field(default=None, description="Id of the message that caused this one.")
    actor: str | None = Field(default=None, description="Acting user or component id.")
    timestamp: dt.datetime = Field(default_factory=utcnow, description="When it was sent (UTC).")
    schema_name: str = Field(description="Versioned type name of the payload.")
    content_type: ContentType = ContentType.MSGPACK
    signature: str | None = Field(default=None, description="Base64url ed25519 signature, if signed.")

    def to_headers(self) -> dict[str, str]:
        """Header form, ready for ``nc.publish(headers=...)``."""
        headers = {
            Header.MSG_ID.value: self.msg_id,
            Header.TIMESTAMP.value: self.timestamp.isoformat(),
            Header.SCHEMA.value: self.schema_name,
            Header.CONTENT_TYPE.value: self.content_type.value,
        }
        if self.correlation_id:
            headers[Header.CORRELATION_ID.value] = self.correlation_id
        if self.causation_id:
            headers[Header.CAUSATION_ID.value] = self.causation_id
        if self.actor:
            headers[Header.ACTOR.value] = self.actor
        if self.signature:
            headers[Header.SIGNATURE.value] = self.signature
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, default_schema: str = "") -> Envelope:
        """Parse headers; missing ids are generated, a bad timestamp is a :class:`CodecError`."""
        from bus.codec import content_type_of

        h = dict(headers or {})
        ts_raw = h.get(Header.TIMESTAMP)
        try:
            ts = dt.datetime.fromisoformat(ts_raw) if ts_raw else utcnow()
        except ValueError as exc:
            raise CodecError(f"bad {Header.TIMESTAMP} header: {ts_raw!r}") from exc
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=dt.UTC)
        return cls(
            msg_id=h.get(Header.MSG_ID) or new_id(),
            correlation_id=h.get(Header.CORRELATION_ID),
            causation_id=h.get(Header.CAUSATION_ID),
            actor=h.get(Header.ACTOR),
            timestamp=ts,
            schema_name=h.get(Header.SCHEMA) or default_schema,
            content_type=content_type_of(h),
            signature=h.get(Header.SIGNATURE),
        )

    def child(self, schema_name: str, actor: str | None = None) -> Envelope:
        """Envelope for a message caused by this one (same correlation)."""
        return Envelope(
            correlation_id=self.correlation_id or self.msg_id,
            causation_id=self.msg_id,
            actor=actor if actor is not None else self.actor,
            schema_name=schema_name,
        )
