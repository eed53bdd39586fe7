"""atheris harnesses of every Python parser of network and user input (issue 9).

Each harness module ``h_<name>.py`` defines ``one_input(data: bytes)`` (the
parser under test plus its invariants: garbage may only raise a typed
:class:`~bus.errors.SkyferryError` or, on the data plane, become a counted
drop; anything else escapes and is a finding) and ``seeds()`` (real messages
produced by the implementation, written to ``corpus/<name>/`` by
``python -m tests.fuzz.python --seed``). Crash reproducers are kept under
``crashes/<name>/`` and replayed by ``tests/fuzz/test_python_fuzz.py``.

This package imports nothing of the project so that the runner can import
the harness under atheris' coverage instrumentation.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
HARNESSES = ("handshake", "record", "datagram", "stream", "bus_codec", "mapio", "saga_plan")
#: Packages whose Python code is instrumented for coverage.
INSTRUMENTED = ("bus", "manager", "vna_agent")
