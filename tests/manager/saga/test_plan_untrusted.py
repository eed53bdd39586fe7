"""Plans from users (issue 9): validation stays linear in the plan's size and errors stay typed."""

from __future__ import annotations

import time
from typing import Any

import pytest

from manager.saga.errors import InvalidPlan
from manager.saga.plan import SagaPlan


def _steps(n: int) -> list[dict[str, Any]]:
    return [{"step_id": f"s{i}", "action": {"subject": "sf.cmd.svc.verb"}} for i in range(n)]


def test_largest_plan_validates_in_linear_time() -> None:
    """10,000 steps (the limit) took ~2 s of CPU with a quadratic duplicate check; now a fraction of that."""
    SagaPlan.parse({"saga_id": "warm", "name": "n", "steps": _steps(10)})
    start = time.process_time()
    plan = SagaPlan.parse({"saga_id": "big", "name": "n", "steps": _steps(10_000)})
    assert time.process_time() - start < 1.0
    assert len(plan.steps) == 10_000


def test_duplicate_ids_are_still_named() -> None:
    steps = _steps(5) + _steps(2)
    with pytest.raises(InvalidPlan) as exc:
        SagaPlan.parse({"saga_id": "dup", "name": "n", "steps": steps})
    assert "duplicate step ids: ['s0', 's1']" in str(exc.value.details["errors"])
