"""Reading libFuzzer's log (atheris and native harnesses print the same lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class LogFigures:
    """The last status line, the final run count and any artifact (crash, timeout, leak) of a run."""

    executions: int = 0
    coverage: int = 0
    features: int = 0
    corpus: int = 0
    seconds: float = 0.0
    artifact: str | None = None


def parse_log(text: str) -> LogFigures:
    """The figures of one libFuzzer run's output."""
    out = LogFigures()
    for line in text.splitlines():
        if m := _STATUS.match(line):
            out.executions, out.coverage, out.features, out.corpus = (int(g) for g in m.groups())
        elif m := _DONE.match(line):
            out.executions, out.seconds = int(m.group(1)), float(m.group(2))
        elif m := _ARTIFACT.search(line):
            out.artifact = m.group(1)
    return out
