"""Plans are validated data: ids, dependencies, cycles, subjects, keys, JSON round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bus.errors import ErrorCode, ValidationFailed
from manager.saga import ActionRef, InvalidPlan, RetryPolicy, SagaPlan, StepSpec
from manager.saga.testing import chain_plan, participant_step


def _step(step_id: str, *deps: str, group: str | None = None) -> StepSpec:
    return participant_step(step_id, depends_on=list(deps), group=group)


def test_valid_plan_fills_default_idempotency_keys() -> None:
    plan = SagaPlan(saga_id="mig-1", name="m", steps=[_step("a"), _step("b", "a")])
    assert plan.step("a").idempotency_key == "mig-1:a:action"
    assert plan.step("b").compensation_idempotency_key == "mig-1:b:compensation"
    assert plan.max_parallel == 1


def test_explicit_keys_are_kept() -> None:
    step = _step("a").model_copy(update={"idempotency_key": "k1", "compensation_idempotency_key": "k2"})
    plan = SagaPlan(saga_id="x", name="m", steps=[step])
    assert (plan.step("a").action_key, plan.step("a").compensation_key) == ("k1", "k2")


def test_json_round_trip_is_identical() -> None:
    plan = chain_plan("rt", 3)
    again = SagaPlan.model_validate_json(plan.model_dump_json())
    assert again == plan


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([_step("a", "b"), _step("b", "a")], "cycle"),
        ([_step("a", "b"), _step("b", "c"), _step("c", "a")], "cycle"),
        ([_step("a", "a")], "itself"),
        ([_step("a", "ghost")], "unknown steps"),
        ([_step("a"), _step("a")], "duplicate"),
    ],
)
def test_bad_dependency_graphs_are_refused(steps: list[StepSpec], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SagaPlan(saga_id="bad", name="bad", steps=steps)


def test_parse_raises_a_typed_validation_error() -> None:
    data = chain_plan("p", 2).model_dump(mode="json")
    data["steps"][0]["depends_on"] = ["s2"]
    with pytest.raises(InvalidPlan) as info:
        SagaPlan.parse(data)
    assert isinstance(info.value, ValidationFailed)
    assert info.value.code is ErrorCode.VALIDATION
    assert "cycle" in info.value.details["errors"][0]["msg"]


@pytest.mark.parametrize("saga_id", ["a.b", "a*", "", "x" * 65, "a b"])
def test_saga_id_must_be_a_subject_token(saga_id: str) -> None:
    with pytest.raises(ValidationError):
        SagaPlan(saga_id=saga_id, name="n", steps=[_step("a")])


@pytest.mark.parametrize(
    "subject",
    ["$JS.API.STREAM.DELETE.SF_EVENTS", "sf.evt.app.x", "sf.cmd.svc", "sf.cmd.svc.*", "sf.agent.>", "other.x.y"],
)
def test_action_subjects_are_restricted_to_commands_and_agents(subject: str) -> None:
    with pytest.raises(ValidationError):
        ActionRef(subject=subject)


def test_agent_and_command_subjects_are_accepted() -> None:
    assert ActionRef(subject="sf.agent.vna-1.configure").subject == "sf.agent.vna-1.configure"
    assert ActionRef(subject="sf.cmd.migrater.capture").subject == "sf.cmd.migrater.capture"


def test_group_limits_must_name_known_groups() -> None:
    with pytest.raises(ValidationError, match="unknown group"):
        SagaPlan(saga_id="g", name="g", steps=[_step("a", group="wave1")], group_limits={"wave2": 1})
    plan = SagaPlan(saga_id="g", name="g", steps=[_step("a", group="w")], group_limits={"w": 2}, max_parallel=4)
    assert plan.group_limit("w") == 2


def test_empty_plan_is_refused() -> None:
    with pytest.raises(ValidationError):
        SagaPlan(saga_id="e", name="e", steps=[])


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, backoff_multiplier=2, max_backoff_s=0.5)
    assert [policy.delay(a) for a in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert RetryPolicy(max_attempts=10_000, backoff_multiplier=1000).delay(9_999) == 30.0
