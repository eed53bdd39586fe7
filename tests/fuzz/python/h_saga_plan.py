"""Saga plans as users submit them: JSON or msgpack, validated by :meth:`SagaPlan.parse`.

Mode byte: bit 0 JSON (else msgpack). Garbage may only raise a
:class:`~bus.errors.SkyferryError` (``CodecError``, ``InvalidPlan``); a plan
that parses is a DAG whose steps all have keys, and it round-trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import networkx as nx

from bus import codec
from bus.errors import SkyferryError
from bus.subjects import ContentType
from manager.saga.plan import SagaPlan

from ._input import Reader

MAX_LEN = 16384


def one_input(data: bytes) -> None:
    r = Reader(data)
    ctype = ContentType.JSON if r.byte() & 1 else ContentType.MSGPACK
    try:
        plan = SagaPlan.parse(codec.decode(r.rest(), ctype))
    except SkyferryError:
        return
    assert nx.is_directed_acyclic_graph(plan.graph())
    assert all(s.idempotency_key and s.compensation_idempotency_key for s in plan.steps)
    again = SagaPlan.parse(codec.decode(codec.encode(plan, ctype), ctype))
    assert again == plan


def _plan() -> dict[str, Any]:
    act = {"subject": "sf.cmd.migrater.capture", "payload": {"node": "web1"}}
    undo = {"subject": "sf.cmd.migrater.discard", "payload": {"node": "web1"}}
    return {
        "saga_id": "mig-1",
        "name": "migrate app1",
        "max_parallel": 2,
        "group_limits": {"wave1": 1},
        "steps": [
            {"step_id": "capture", "action": act, "compensation": undo, "group": "wave1"},
            {
                "step_id": "deploy",
                "action": {"subject": "sf.agent.vna-1.tunnel_create"},
                "depends_on": ["capture"],
                "retry": {"max_attempts": 3, "non_retryable_codes": ["forbidden"]},
                "timeout_s": 5,
            },
        ],
    }


def seeds() -> Iterator[bytes]:
    """A plan like the ones the saga tests run, as JSON and msgpack; a cyclic one."""
    plan = _plan()
    yield b"\x01" + codec.encode(plan, ContentType.JSON)
    yield b"\x00" + codec.encode(plan, ContentType.MSGPACK)
    plan["steps"][0]["depends_on"] = ["deploy"]
    yield b"\x01" + codec.encode(plan, ContentType.JSON)
