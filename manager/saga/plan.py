"""A saga plan is data: steps (action, compensation, retry policy, timeout, idempotency key) in a DAG.

Scheduling rules the coordinator applies to a plan:

* a step may start once every step in its ``depends_on`` has succeeded;
* at most ``max_parallel`` steps run at once; a step with a ``group`` also
  counts against ``group_limits[group]`` (default: ``max_parallel``), which is
  how "capture priority" style waves are expressed: one group per wave, each
  wave depending on the previous one;
* among ready steps, plan order breaks ties (so ``max_parallel=1``, the
  default, runs ready steps one at a time in the order they are listed).

Action subjects are restricted to ``sf.cmd.>`` and ``sf.agent.>``: a plan
submitted by a user must not be able to make the coordinator talk to ``$JS.API``
or other internals. (A separate coordinator process also runs as the NATS
``saga`` role, which cannot; one hosted in the manager has the manager's wide
permissions, so this check is what stands in the way there.)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, ClassVar

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from bus.errors import ErrorCode
from manager.saga.errors import InvalidPlan

TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_KEY_PATTERN = r"^[^~\s]{1,200}$"  # "~" separates the key from the nonce in a request's message id
_SUBJECT = re.compile(r"^sf\.(cmd|agent)(\.[A-Za-z0-9_-]{1,64}){2,}$")


class ActionRef(BaseModel):
    """One bus request: the subject to call and the payload to send."""

    model_config = ConfigDict(extra="forbid")
    subject: str = Field(description="Request subject under sf.cmd.> or sf.agent.> (no wildcards).")
    payload: dict[str, Any] = Field(default_factory=dict, description="Request payload (JSON-able).")

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        if not _SUBJECT.match(value):
            raise ValueError(f"action subject must be sf.cmd.<svc>.<verb> or sf.agent.<id>.<verb>, got {value!r}")
        return value


class RetryPolicy(BaseModel):
    """How often and how patiently a step (or its compensation) is retried."""

    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(default=5, ge=1, le=10_000, description="Attempts in total, the first included.")
    initial_backoff_s: float = Field(default=0.5, ge=0, description="Delay after the first failed attempt.")
    backoff_multiplier: float = Field(default=2.0, ge=1, description="Growth of the delay per attempt.")
    max_backoff_s: float = Field(default=30.0, ge=0, description="Upper bound of one delay.")
    non_retryable_codes: list[ErrorCode] = Field(
        default_factory=list,
        description="Error codes that fail the step at once even if the error says it is retryable.",
    )

    def delay(self, attempt: int) -> float:
        """Delay before the attempt that follows failed attempt number ``attempt`` (1-based)."""
        try:
            raw = self.initial_backoff_s * self.backoff_multiplier ** max(attempt - 1, 0)
        except OverflowError:
            raw = math.inf
        return min(raw, self.max_backoff_s)


class StepSpec(BaseModel):
    """One step: action, optional compensation, dependencies, group, retry policy, timeout, keys."""

    model_config = ConfigDict(extra="forbid")
    step_id: str = Field(pattern=TOKEN_PATTERN, description="Unique within the plan; subject-token-safe.")
    action: ActionRef
    compensation: ActionRef | None = Field(default=None, description="Undoes the action; None: nothing to undo.")
    depends_on: list[str] = Field(default_factory=list, description="Steps that must succeed first.")
    group: str | None = Field(default=None, pattern=TOKEN_PATTERN, description="Concurrency group.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy | None = Field(default=None, description="Defaults to ``retry``.")
    timeout_s: float = Field(default=30.0, gt=0, le=86_400, description="Timeout of one attempt.")
    idempotency_key: str | None = Field(
        default=None, pattern=_KEY_PATTERN, description="Default: '<saga_id>:<step_id>:action'."
    )
    compensation_idempotency_key: str | None = Field(
        default=None, pattern=_KEY_PATTERN, description="Default: '<saga_id>:<step_id>:compensation'."
    )
    description: str = ""

    @property
    def action_key(self) -> str:
        """The action's idempotency key (filled in by :class:`SagaPlan`)."""
        assert self.idempotency_key is not None, "StepSpec outside a SagaPlan has no key"
        return self.idempotency_key

    @property
    def compensation_key(self) -> str:
        """The compensation's idempotency key (filled in by :class:`SagaPlan`)."""
        assert self.compensation_idempotency_key is not None, "StepSpec outside a SagaPlan has no key"
        return self.compensation_idempotency_key

    @property
    def compensation_policy(self) -> RetryPolicy:
        """Retry policy of the compensation (``compensation_retry`` or ``retry``)."""
        return self.compensation_retry or self.retry


class SagaPlan(BaseModel):
    """A saga's plan; validated when built (unique ids, known dependencies, no cycle)."""

    __schema_name__: ClassVar[str] = "skyferry.v1.saga.plan"
    model_config = ConfigDict(extra="forbid")
    saga_id: str = Field(pattern=TOKEN_PATTERN, description="Saga id; subject-token-safe.")
    name: str = Field(min_length=1, max_length=200)
    steps: list[StepSpec] = Field(min_length=1, max_length=10_000)
    max_parallel: int = Field(default=1, ge=1, le=1024, description="Steps running at once, in total.")
    group_limits: dict[str, int] = Field(default_factory=dict, description="Steps of a group running at once.")
    _by_id: dict[str, StepSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SagaPlan:
        ids = [s.step_id for s in self.steps]
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)  # not ids.count: quadratic in 10,000 steps
        if dupes:
            raise ValueError(f"duplicate step ids: {dupes}")
        known = set(ids)
        for step in self.steps:
            unknown = [d for d in step.depends_on if d not in known]
            if unknown:
                raise ValueError(f"step {step.step_id!r} depends on unknown steps {unknown}")
            if step.step_id in step.depends_on:
                raise ValueError(f"step {step.step_id!r} depends on itself")
        graph = self.graph()
        if not nx.is_directed_acyclic_graph(graph):
            cycle = [edge[0] for edge in nx.find_cycle(graph)]
            raise ValueError(f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}")
        groups = {s.group for s in self.steps if s.group}
        for group, limit in self.group_limits.items():
            if group not in groups:
                raise ValueError(f"group_limits names unknown group {group!r}")
            if limit < 1:
                raise ValueError(f"group limit of {group!r} must be >= 1")
        for step in self.steps:
            if step.idempotency_key is None:
                step.idempotency_key = f"{self.saga_id}:{step.step_id}:action"
            if step.compensation_idempotency_key is None:
                step.compensation_idempotency_key = f"{self.saga_id}:{step.step_id}:compensation"
        self._by_id = {s.step_id: s for s in self.steps}
        return self

    @classmethod
    def parse(cls, data: Any) -> SagaPlan:
        """Validate plan data.

        Raises:
            InvalidPlan: with the pydantic errors in ``details['errors']``.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
            raise InvalidPlan("invalid saga plan", details={"errors": errors}) from exc

    def graph(self) -> nx.DiGraph:
        """Dependency graph: an edge ``dep -> step`` for every dependency."""
        g: nx.DiGraph = nx.DiGraph()
        g.add_nodes_from(s.step_id for s in self.steps)
        g.add_edges_from((dep, s.step_id) for s in self.steps for dep in s.depends_on)
        return g

    def step(self, step_id: str) -> StepSpec:
        """The step with that id (KeyError if none)."""
        return self._by_id[step_id]

    def group_limit(self, group: str) -> int:
        """Steps of ``group`` that may run at once."""
        return self.group_limits.get(group, self.max_parallel)
