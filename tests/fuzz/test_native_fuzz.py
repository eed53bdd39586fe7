"""``make test``: each libFuzzer harness of the native fast path replays its crash reproducers and seeds,
then fuzzes a few seconds from its corpus; any crash (memory error, undefined behaviour, broken
invariant) fails the test. ``python -m tests.fuzz.native --seconds 60`` (``make fuzz``) runs longer.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.fuzz import native

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed (deploy/install-deps.sh)"),
]

SECONDS = 3


@pytest.mark.parametrize("harness", native.HARNESSES)
def test_reproducers_and_seeds_pass(harness: str) -> None:
    """Every crash ever found (fixed since) and every seed runs clean: a regression fails here first."""
    outcome = native.replay(harness)
    assert native.inputs(native.CORPUS / harness), f"corpus/{harness} is empty: run tests.fuzz.native.gen_corpus"
    assert not outcome.crashed, outcome.log[-4000:]
    assert outcome.executions >= len(native.inputs(native.CORPUS / harness))


@pytest.mark.parametrize("harness", native.HARNESSES)
def test_a_short_campaign_finds_nothing(harness: str) -> None:
    outcome = native.run(harness, SECONDS)
    assert not outcome.crashed, f"{outcome.artifact}\n{outcome.log[-4000:]}"
    assert outcome.executions > 0 and outcome.edges > 0 and outcome.corpus > 0, outcome.log[-2000:]


def test_core_unit_checks() -> None:
    """What no socket reaches: an oversized record is refused before decryption; BLAKE2s (mac1) vectors."""
    done = subprocess.run([str(native.build_unit())], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]
