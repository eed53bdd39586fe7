"""structlog set-up shared by every process: key/value, one event per line, to stderr."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(level: str = "INFO", *, json: bool = False, stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging) once per process."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    out = stream or sys.stderr
    logging.basicConfig(level=lvl, stream=out, format="%(message)s")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.processors.LogfmtRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
