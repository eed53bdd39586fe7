"""A crashed ``skyferry up`` restarts on the same home with all its data; its nats-server never outlives it."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack_proc import UpProcess, pid_alive, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    proc = UpProcess(tmp_path / "home")
    try:
        yield proc
    finally:
        pid = proc.nats_pid()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
        if pid and pid_alive(pid):  # never leave a server behind, whatever the test did
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def _overlay_ids(up: UpProcess) -> list[str]:
    done = up.cli("-o", "json", "overlay", "list")
    assert done.returncode == 0, done.stderr
    return sorted(o["record"]["id"] for o in json.loads(done.stdout))


def _create_overlay(up: UpProcess, overlay_id: str) -> None:
    done = up.cli("overlay", "create", "--id", overlay_id, "--name", overlay_id)
    assert done.returncode == 0, done.stderr


def test_sigkilled_up_takes_its_server_along_and_restarts_with_its_data(up: UpProcess) -> None:
    up.start()
    _create_overlay(up, "before-crash")
    nats_pid = up.nats_pid()
    assert nats_pid and pid_alive(nats_pid)
    up.sigkill()
    # The kernel tells the server its owner died; it must not linger as an orphan holding the port.
    wait_for(lambda: not pid_alive(nats_pid), 20, "the orphaned nats-server to exit")
    instance = (up.home / "instance").read_text()
    up.start()
    assert up.nats_pid() != nats_pid
    assert (up.home / "instance").read_text() == instance  # so the coordinator takes its leases back at once
    assert _overlay_ids(up) == ["before-crash"]
    _create_overlay(up, "after-crash")
    assert _overlay_ids(up) == ["after-crash", "before-crash"]
    assert up.stop() == 0


def test_a_hung_orphan_server_is_found_and_stopped_by_the_next_up(up: UpProcess) -> None:
    first = up.start()
    _create_overlay(up, "kept")
    nats_pid = up.nats_pid()
    assert nats_pid
    # A hung server ignores the death signal (it stays pending while the process is stopped).
    os.kill(nats_pid, signal.SIGSTOP)
    up.sigkill()
    assert pid_alive(nats_pid)
    again = up.start()
    assert not pid_alive(nats_pid)
    assert again["url"] == first["url"]  # clients that read stack.json before the crash still find it
    assert _overlay_ids(up) == ["kept"]
    assert up.stop() == 0


def test_a_second_up_on_the_same_home_is_refused(up: UpProcess) -> None:
    up.start()
    other = UpProcess(up.home)
    other.starts = 10  # its own log files
    proc = other.spawn()
    assert proc.wait(60) != 0
    assert "another process" in other.stderr() and str(up.proc.pid if up.proc else "") in other.stderr()
    # The first stack is untouched.
    _create_overlay(up, "still-serving")
    assert _overlay_ids(up) == ["still-serving"]
    assert up.stop() == 0
