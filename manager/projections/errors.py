"""Errors of the SQL projections.

::

    SkyferryError
    └── ProjectionError               something went wrong projecting events
        ├── InvalidEvent              an event the read model cannot fold (recorded, skipped)
        ├── ProjectionConflict        another projector moved the same position (retryable)
        ├── ProjectionGap             a batch starts past the stored position + 1 (retryable)
        ├── ProjectionStoreError      the SQL database failed or is unreachable (retryable)
        └── UnsupportedDatabase       the engine URL names no supported database

Lower libraries' errors (SQLAlchemy, drivers) become :class:`ProjectionStoreError`
in :mod:`manager.projections.projector` and nowhere else.
"""

from __future__ import annotations

from bus.errors import ErrorCode, SkyferryError


class ProjectionError(SkyferryError):
    """Root of the projection errors."""


class InvalidEvent(ProjectionError):
    """An event that cannot be decoded or folded; it goes to ``projection_errors``."""

    code = ErrorCode.VALIDATION


class ProjectionConflict(ProjectionError):
    """The stored position changed under us: two projectors share one name."""

    code = ErrorCode.CONFLICT
    retryable = True


class ProjectionStoreError(ProjectionError):
    """The SQL database refused or failed a statement."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class UnsupportedDatabase(ProjectionError):
    """Only SQLite (aiosqlite) and PostgreSQL (asyncpg) are supported."""

    code = ErrorCode.BAD_REQUEST


class ProjectionGap(ProjectionError):
    """A batch does not start right after the stored position (events would be skipped)."""

    code = ErrorCode.CONFLICT
    retryable = True
