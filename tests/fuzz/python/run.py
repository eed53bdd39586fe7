"""One harness under atheris: ``python -m tests.fuzz.python.run NAME [libFuzzer flags] [corpus dirs]``.

The harness is imported inside :func:`atheris.instrument_imports`, so the
project's parsers report coverage to libFuzzer. Logging is silenced: a
refused handshake logs a warning, which would dominate the run time.
"""

from __future__ import annotations

import importlib
import logging
import sys

import atheris
import structlog

from tests.fuzz.python import INSTRUMENTED


def main() -> None:
    name = sys.argv[1]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        harness = importlib.import_module(f"tests.fuzz.python.h_{name}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
