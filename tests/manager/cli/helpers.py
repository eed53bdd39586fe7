"""Assertions shared by the CLI tests."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import Result


def ok(result: Result) -> Result:
    """Assert success, showing what the CLI said if not."""
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def as_json(result: Result) -> Any:
    """The JSON document a successful ``-o json`` command printed."""
    return json.loads(ok(result).stdout)


def failed(result: Result, code: int, error: str) -> str:
    """Assert a clean failure: exit code, one ``error[<error>]`` line, no traceback; returns that line."""
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith(f"error[{error}]: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]
