"""The atheris harnesses in CI: every corpus input and crash reproducer replays cleanly, and each
harness fuzzes a few seconds without a finding (``make test``; ``make fuzz`` runs them longer)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.fuzz.python import CORPUS, CRASHES, HARNESSES
from tests.fuzz.python.__main__ import run_harness

FUZZ_SECONDS = 3


def _inputs(name: str) -> list[Path]:
    return sorted(p for d in (CORPUS / name, CRASHES / name) if d.is_dir() for p in d.iterdir() if p.is_file())


@pytest.mark.parametrize("name", HARNESSES)
def test_corpus_and_reproducers_replay(name: str) -> None:
    harness = importlib.import_module(f"tests.fuzz.python.h_{name}")
    inputs = _inputs(name)
    assert len(inputs) >= 3, "every harness has a seed corpus"
    for path in inputs:
        harness.one_input(path.read_bytes())
    for seed in harness.seeds():  # the implementation's current messages, too
        harness.one_input(seed)


@pytest.mark.slow
@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_briefly(name: str) -> None:
    outcome = run_harness(name, FUZZ_SECONDS)
    assert outcome.finding is None, outcome
    assert outcome.executions > 0 and outcome.coverage > 0, outcome
