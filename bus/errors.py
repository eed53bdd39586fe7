"""Skyferry's error tree, shared by every component.

::

    SkyferryError
    ├── BusError                      transport-level problems
    │   ├── BusUnavailable            no server reachable / connection lost (retryable)
    │   ├── BusTimeout                no reply in time (retryable)
    │   └── NoResponders              nobody serves that subject (retryable)
    ├── CodecError                    malformed msgpack/JSON or wrong content type
    └── RemoteError                   a typed error reply from another participant
        (``code`` says which; see :class:`ErrorCode`)

Every error carries an :class:`ErrorCode`; :func:`error_from_reply` turns a
wire error back into the same class on the caller's side.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorCode(StrEnum):
    """Wire error codes; stable, part of the public contract."""

    BAD_REQUEST = "bad_request"
    MALFORMED = "malformed"
    UNKNOWN_COMMAND = "unknown_command"
    VALIDATION = "validation"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"
    INVALID_STATE = "invalid_state"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"


RETRYABLE_CODES = frozenset({ErrorCode.CONFLICT, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT})


class ErrorReply(BaseModel):
    """The body of a typed error reply: code, message, details."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(default="skyferry.v1.error", description="Versioned wire type name.")
    code: ErrorCode = Field(description="Machine-readable error code.")
    message: str = Field(description="Human-readable message.")
    details: dict[str, Any] = Field(default_factory=dict, description="Structured context.")
    retryable: bool = Field(default=False, description="Whether the same request may succeed later.")


class SkyferryError(Exception):
    """Root of every Skyferry error."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_reply(self) -> ErrorReply:
        """The wire form of this error."""
        return ErrorReply(code=self.code, message=self.message, details=self.details, retryable=self.retryable)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class BusError(SkyferryError):
    """Transport-level failure."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class BusUnavailable(BusError):
    """No NATS server reachable or the connection is closed."""


class BusTimeout(BusError):
    """No reply within the timeout."""

    code = ErrorCode.TIMEOUT


class NoResponders(BusError):
    """Nobody listens on the subject (the participant is gone)."""


class CodecError(SkyferryError):
    """A payload could not be decoded."""

    code = ErrorCode.MALFORMED


class RemoteError(SkyferryError):
    """An error reported by another participant; subclasses map the codes."""


class BadRequest(RemoteError):
    code = ErrorCode.BAD_REQUEST


class IdempotencyKeyReused(BadRequest):
    """An idempotency key already took effect for a different command (never retryable)."""


class UnknownCommand(RemoteError):
    code = ErrorCode.UNKNOWN_COMMAND


class ValidationFailed(RemoteError):
    code = ErrorCode.VALIDATION


class Unauthenticated(RemoteError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(RemoteError):
    code = ErrorCode.FORBIDDEN


class NotFound(RemoteError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(RemoteError):
    code = ErrorCode.ALREADY_EXISTS


class ConcurrencyConflict(RemoteError):
    """Optimistic concurrency: the aggregate moved on since it was read."""

    code = ErrorCode.CONFLICT
    retryable = True


class InvalidState(RemoteError):
    code = ErrorCode.INVALID_STATE


class RemoteUnavailable(RemoteError):
    code = ErrorCode.UNAVAILABLE
    retryable = True


class RemoteTimeout(RemoteError):
    code = ErrorCode.TIMEOUT
    retryable = True


class Unsupported(RemoteError):
    """The platform lacks a feature (e.g. 802.1q on this kernel)."""

    code = ErrorCode.UNSUPPORTED


class InternalError(RemoteError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[RemoteError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.MALFORMED: BadRequest,
    ErrorCode.UNKNOWN_COMMAND: UnknownCommand,
    ErrorCode.VALIDATION: ValidationFailed,
    ErrorCode.UNAUTHENTICATED: Unauthenticated,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.ALREADY_EXISTS: AlreadyExists,
    ErrorCode.CONFLICT: ConcurrencyConflict,
    ErrorCode.INVALID_STATE: InvalidState,
    ErrorCode.UNAVAILABLE: RemoteUnavailable,
    ErrorCode.TIMEOUT: RemoteTimeout,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_reply(reply: ErrorReply) -> RemoteError:
    """Rebuild the typed exception for an error reply received over the bus."""
    cls = _BY_CODE.get(reply.code, InternalError)
    err = cls(reply.message, details=reply.details)
    if reply.code == ErrorCode.MALFORMED:
        err.code = ErrorCode.MALFORMED
    return err
