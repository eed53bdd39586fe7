"""Exit codes of the CLI and the errors it raises itself.

Every :class:`bus.errors.SkyferryError` ends the command with the exit code of
its family, so scripts can tell "fix your input" from "try again later"::

    0  ok
    1  internal error (a bug, here or in a participant)
    2  usage or validation (bad option, bad file, invalid record, unknown command)
    3  authentication or authorisation (unknown user, bad signature, forbidden)
    4  state (not found, already exists, concurrency conflict, invalid state change)
    5  bus unavailable or timeout (no server, nobody answers, no reply in time)
    130 interrupted (Ctrl-C) where that is not the normal way to stop
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from pydantic import ValidationError

from bus.errors import ErrorCode, SkyferryError
from bus.models import ModelError


class ExitCode(IntEnum):
    """Process exit codes, one per error family."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    AUTH = 3
    STATE = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130


_FAMILY: dict[ErrorCode, ExitCode] = {
    ErrorCode.BAD_REQUEST: ExitCode.USAGE,
    ErrorCode.MALFORMED: ExitCode.USAGE,
    ErrorCode.UNKNOWN_COMMAND: ExitCode.USAGE,
    ErrorCode.VALIDATION: ExitCode.USAGE,
    ErrorCode.UNAUTHENTICATED: ExitCode.AUTH,
    ErrorCode.FORBIDDEN: ExitCode.AUTH,
    ErrorCode.NOT_FOUND: ExitCode.STATE,
    ErrorCode.ALREADY_EXISTS: ExitCode.STATE,
    ErrorCode.CONFLICT: ExitCode.STATE,
    ErrorCode.INVALID_STATE: ExitCode.STATE,
    ErrorCode.UNAVAILABLE: ExitCode.UNAVAILABLE,
    ErrorCode.TIMEOUT: ExitCode.UNAVAILABLE,
    ErrorCode.INTERNAL: ExitCode.INTERNAL,
}


def exit_code_of(err: SkyferryError) -> ExitCode:
    """The exit code of an error's family."""
    return _FAMILY.get(err.code, ExitCode.INTERNAL)


class CliError(SkyferryError):
    """A problem the CLI finds before anything is sent: a bad option, an unreadable file."""

    def __init__(
        self, message: str, *, code: ErrorCode = ErrorCode.BAD_REQUEST, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.code = code


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic errors as ``{"loc": "a.b", "msg": ...}``, the shape the manager uses."""
    return [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def local_error(exc: ValidationError | ModelError, what: str) -> CliError:
    """Turn a local validation failure (a file or ``--set`` values) into a :class:`CliError`."""
    from bus.mapio import MapValidationError

    if isinstance(exc, ValidationError):
        errors = validation_errors(exc)
    elif isinstance(exc, MapValidationError):
        errors = [{"loc": e.path, "msg": e.message} for e in exc.errors]
    else:
        errors = [{"loc": "", "msg": str(exc)}]
    first = (": ".join(v for v in (errors[0]["loc"], errors[0]["msg"]) if v)) if errors else str(exc)
    return CliError(f"invalid {what}: {first}", code=ErrorCode.VALIDATION, details={"errors": errors})
