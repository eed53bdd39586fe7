"""``skyferry demo`` end to end: its own stack, the samples through the bus, a clean stop."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from manager.cli import app
from tests.manager.cli.helpers import ok


def test_demo_runs_end_to_end(runner: CliRunner, tmp_path: Path) -> None:
    home = tmp_path / "demo"
    out = ok(runner.invoke(app, ["demo", "--home", str(home)])).stdout
    for title in ("Overlay networks", "VNAs", "Local overlay networks", "Nodes and interfaces"):
        assert title in out
    assert "off -> running refused" in out and "fenced -> running" in out
    assert "app.state_changed" in out
    assert (home / "stack.json").is_file()

    # Again on the same state: maps are re-imported idempotently; JSON mode prints one summary document.
    summary = json.loads(ok(runner.invoke(app, ["-o", "json", "demo", "--home", str(home)])).stdout)
    assert summary["application_map"]["application"]["state"] == "running"
    assert [s["to"] for s in summary["states"] if "position" in s][-1] == "running"
    assert summary["events"][-1]["event_type"] == "skyferry.v1.evt.app.state_changed"
    assert len(summary["events"]) > 12  # the first run's events are still there


def test_demo_in_a_temporary_directory(runner: CliRunner) -> None:
    result = ok(runner.invoke(app, ["-o", "json", "demo"]))
    summary = json.loads(result.stdout)
    assert not Path(summary["state_dir"]).exists()  # cleaned up
