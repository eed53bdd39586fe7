"""Run the native fast path's libFuzzer harnesses: ``python -m tests.fuzz.native --seconds N [--harness NAME]``.

Prints, per harness: executions, coverage (libFuzzer's ``cov:`` edges), corpus size; exits non-zero on
any crash (the reproducer is kept in ``tests/fuzz/native/crashes/<harness>/``). ``--json`` also writes
the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tests.fuzz.native import HARNESSES, Outcome, replay, run


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.native", description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness")
    parser.add_argument("--harness", action="append", choices=HARNESSES, help="only this harness (repeatable)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def _report(o: Outcome) -> str:
    state = "CRASH " + (o.artifact or "") if o.crashed else "ok"
    return f"{o.harness:10} executions={o.executions:<10} edges={o.edges:<6} corpus={o.corpus:<5} {state}"


def main(argv: list[str] | None = None) -> int:
    """Replay every reproducer, then fuzz each harness; 1 if anything crashed."""
    args = _args(argv)
    outcomes: list[Outcome] = []
    for name in args.harness or HARNESSES:
        first = replay(name)
        if first.crashed:  # a reproducer of a fixed finding crashes again: a regression
            print(f"{name:10} REGRESSION: a reproducer or seed crashes\n{first.log[-4000:]}", file=sys.stderr)
            outcomes.append(first)
            continue
        outcome = run(name, args.seconds)
        print(_report(outcome), flush=True)
        if outcome.crashed:
            print(outcome.log[-4000:], file=sys.stderr)
        outcomes.append(outcome)
    if args.json:
        args.json.write_text(
            json.dumps([{k: v for k, v in asdict(o).items() if k != "log"} for o in outcomes], indent=2)
        )
    return 1 if any(o.crashed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
