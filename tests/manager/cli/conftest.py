"""A real stack run by ``skyferry up`` in a subprocess, and an in-process CLI runner against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bus.server import free_port
from manager.cli import app

ENV_VARS = [
    "SKYFERRY_NATS_URL",
    "SKYFERRY_HOME",
    "SKYFERRY_NATS_NKEY",
    "SKYFERRY_NATS_CREDS",
    "SKYFERRY_USER",
    "SKYFERRY_USER_KEY",
    "SKYFERRY_OUTPUT",
    "SKYFERRY_TIMEOUT",
]

Sf = Callable[..., Result]


def skyferry_command() -> list[str]:
    """How to run the CLI as a process (the console script, else ``python -m``)."""
    script = Path(sys.executable).parent / "skyferry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "manager.cli"]


def clean_env() -> dict[str, str]:
    """The environment without SKYFERRY_* settings that would leak into the CLI."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS}


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``skyferry up`` in the background; its state directory. Stopping it must exit 0."""
    home = tmp_path_factory.mktemp("stack")
    proc = subprocess.Popen(
        [*skyferry_command(), "-o", "json", "up", "--home", str(home), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # `up -o json` prints one line once the stack is ready
        if not line:
            raise RuntimeError(f"skyferry up failed: {proc.stderr.read() if proc.stderr else ''}")
        info = json.loads(line)
        assert info["state_dir"] == str(home)
        yield home
    finally:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner(env={**{k: None for k in ENV_VARS}, "COLUMNS": "200"})


@pytest.fixture
def sf(runner: CliRunner, stack_home: Path) -> Sf:
    """Run ``skyferry --home <stack> ARGS...`` in-process."""

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["--home", str(stack_home), *args])

    return invoke
