"""libFuzzer harnesses of the native fast path (``fuzz_*.c`` here, over ``vna_agent/dataplane/_fastpath_core.c``).

Each harness is built with clang ``-fsanitize=fuzzer,address,undefined`` into ``build/fuzz/`` (gitignored)
and run over its seed corpus (``corpus/<harness>/``, from :mod:`.gen_corpus`) and crash reproducers
(``crashes/<harness>/``, replayed first: each is a finding that was fixed). New inputs go to a work
directory under ``build/fuzz/``; a crash is copied into ``crashes/<harness>/`` and fails the run.

``python -m tests.fuzz.native --seconds N [--harness NAME]`` runs a campaign; ``tests/fuzz/test_native_fuzz.py``
runs each harness a few seconds in ``make test``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CORE = ROOT / "vna_agent" / "dataplane"
BUILD = ROOT / "build" / "fuzz"
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
HARNESSES = ("datagram", "stream", "keyed")
#: Larger than any record (MAX_RECORD) plus the harness' own framing.
MAX_LEN = 70000
CFLAGS = (
    "-g",
    "-O1",
    "-std=c99",
    "-D_GNU_SOURCE",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fsanitize=fuzzer,address,undefined",
    "-fno-sanitize-recover=undefined",
)

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


class FuzzToolchainMissing(RuntimeError):
    """clang (or its libFuzzer runtime) is not installed: run deploy/install-deps.sh."""


@dataclass
class Outcome:
    """What one harness run did."""

    harness: str
    executions: int = 0
    edges: int = 0
    features: int = 0
    corpus: int = 0
    seconds: int = 0
    crashed: bool = False
    artifact: str | None = None
    log: str = ""


def clang() -> str:
    """The clang to build with; raises :class:`FuzzToolchainMissing`."""
    found = shutil.which("clang")
    if found is None:
        raise FuzzToolchainMissing("clang is not installed (deploy/install-deps.sh installs it)")
    return found


def _sources(harness: str) -> list[Path]:
    return [HERE / f"fuzz_{harness}.c", HERE / "fuzz_common.h", CORE / "_fastpath_core.c", CORE / "_fastpath_core.h"]


def build(harness: str) -> Path:
    """Compile one harness (only when a source changed); returns the binary."""
    out = BUILD / harness
    sources = _sources(harness)
    if out.exists() and all(s.stat().st_mtime < out.stat().st_mtime for s in sources):
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = [clang(), *CFLAGS, f"-I{CORE}", str(sources[0]), str(sources[2]), "-lcrypto", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "libclang_rt.fuzzer" in done.stderr or "cannot find" in done.stderr:
            raise FuzzToolchainMissing(done.stderr.strip())
        raise RuntimeError(f"building {harness} failed:\n{done.stderr}")
    return out


def build_unit() -> Path:
    """Compile ``unit_core.c`` (plain checks of the core under ASan+UBSan, no libFuzzer); returns the binary."""
    out = BUILD / "unit_core"
    sources = [HERE / "unit_core.c", HERE / "fuzz_common.h", CORE / "_fastpath_core.c", CORE / "_fastpath_core.h"]
    if out.exists() and all(s.stat().st_mtime < out.stat().st_mtime for s in sources):
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    flags = [f.replace("fuzzer,", "") for f in CFLAGS]
    cmd = [clang(), *flags, f"-I{CORE}", str(sources[0]), str(sources[2]), "-lcrypto", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building unit_core failed:\n{done.stderr}")
    return out


def inputs(directory: Path) -> list[Path]:
    """The files of a corpus or crash directory (none if it does not exist)."""
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def replay(harness: str) -> Outcome:
    """Run the harness once over each crash reproducer and each seed (all must pass)."""
    binary = build(harness)
    files = [*inputs(CRASHES / harness), *inputs(CORPUS / harness)]
    outcome = Outcome(harness)
    if not files:
        return outcome
    done = subprocess.run(
        [str(binary), "-runs=0", f"-max_len={MAX_LEN}", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    outcome.executions = len(files)
    outcome.crashed = done.returncode != 0
    outcome.log = done.stderr
    return outcome


def _parse(outcome: Outcome, log: str) -> None:
    for line in log.splitlines():
        if m := _STATUS.match(line):
            outcome.executions = int(m.group(1))
            outcome.edges, outcome.features, outcome.corpus = int(m.group(2)), int(m.group(3)), int(m.group(4))
        elif m := _DONE.match(line):
            outcome.executions, outcome.seconds = int(m.group(1)), int(m.group(2))
        elif m := _ARTIFACT.search(line):
            outcome.artifact = m.group(1)


def _keep_crash(harness: str, artifact: str) -> str:
    """Copy a crash into crashes/<harness>/ (named by its content) so it is replayed from now on."""
    data = Path(artifact).read_bytes()
    dest = CRASHES / harness / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return str(dest.relative_to(ROOT))


def run(harness: str, seconds: int) -> Outcome:
    """Fuzz one harness for ``seconds`` over its corpus and reproducers; a crash is kept in crashes/."""
    binary = build(harness)
    work = BUILD / "work" / harness
    artifacts = BUILD / "artifacts" / harness
    for d in (work, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    seeds = [str(d) for d in (CORPUS / harness, CRASHES / harness) if d.is_dir()]
    cmd = [
        str(binary),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(work),
        *seeds,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    outcome = Outcome(harness, log=done.stderr)
    _parse(outcome, done.stderr)
    outcome.crashed = done.returncode != 0
    if outcome.artifact:
        outcome.artifact = _keep_crash(harness, outcome.artifact)
    return outcome
