"""Run the atheris harnesses: ``python -m tests.fuzz.python --seconds N [--harness NAME ...]``.

Each harness runs in its own process (libFuzzer owns the process) over its
repo corpus and crash reproducers; new inputs go to a temporary directory
(``--grow`` copies the ones that added coverage into the repo corpus), a
crash, hang or leak is written to ``crashes/<name>/`` and makes the exit
status non-zero. ``--seed`` writes each harness' seeds (real messages of the
implementation) into its corpus first. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.fuzz.libfuzzer import LogFigures, parse_log
from tests.fuzz.python import CORPUS, CRASHES, HARNESSES


@dataclass
class Outcome(LogFigures):
    """What one harness run did."""

    harness: str = ""
    finding: str | None = None


def write_seeds(name: str) -> int:
    """Write the harness' seeds into ``corpus/<name>/`` (content-addressed); return how many are new."""
    harness = importlib.import_module(f"tests.fuzz.python.h_{name}")
    out = CORPUS / name
    out.mkdir(parents=True, exist_ok=True)
    new = 0
    for seed in harness.seeds():
        path = out / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}"
        if not path.exists():
            path.write_bytes(seed)
            new += 1
    return new


def parse_output(name: str, text: str, returncode: int) -> Outcome:
    """A harness' outcome from its libFuzzer log and exit status."""
    f = parse_log(text)
    finding = f.artifact or (f"exit status {returncode}" if returncode else None)
    return Outcome(**asdict(f), harness=name, finding=finding)


def run_harness(name: str, seconds: int, *, grow: bool = False, quiet: bool = True) -> Outcome:
    """Fuzz one harness for ``seconds`` in a subprocess."""
    harness = importlib.import_module(f"tests.fuzz.python.h_{name}")
    corpus, crashes = CORPUS / name, CRASHES / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz.python.run",
            name,
            f"-max_total_time={seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-max_len={harness.MAX_LEN}",
            f"-artifact_prefix={crashes}/",
            tmp,
            str(corpus),
            str(crashes),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=seconds + 120)
        if grow:  # every unit libFuzzer kept added coverage when it was found (-merge needs a re-executable argv[0])
            for unit in Path(tmp).iterdir():
                if not (corpus / unit.name).exists():
                    shutil.copyfile(unit, corpus / unit.name)
    log = proc.stdout + proc.stderr
    if not quiet or proc.returncode:
        sys.stderr.write(log[-6000:])
    outcome = parse_output(name, log, proc.returncode)
    outcome.corpus = sum(1 for _ in corpus.iterdir())
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.python", description=__doc__)
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness")
    ap.add_argument("--harness", action="append", choices=HARNESSES, help="only this harness (repeatable)")
    ap.add_argument("--seed", action="store_true", help="write the seeds into the corpora first")
    ap.add_argument("--grow", action="store_true", help="copy the inputs that added coverage into the repo corpora")
    ap.add_argument("--json", type=Path, help="write the outcomes as JSON")
    ap.add_argument("--verbose", action="store_true", help="show libFuzzer's output")
    args = ap.parse_args(argv)
    names = args.harness or list(HARNESSES)
    outcomes = []
    for name in names:
        if args.seed:
            write_seeds(name)
        o = run_harness(name, args.seconds, grow=args.grow, quiet=not args.verbose)
        outcomes.append(o)
        print(
            f"{name:10} executions={o.executions:>9} coverage={o.coverage:>5} features={o.features:>6} "
            f"corpus={o.corpus:>4} finding={o.finding or '-'}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    return 1 if any(o.finding for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
