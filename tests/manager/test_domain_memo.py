"""RecordMemo: a fold that re-validates only the records an event changed gives exactly the plain fold."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from bus.errors import SkyferryError
from bus.kinds import Aggregate
from bus.messages import event_type
from manager.domain import RecordMemo, apply_event
from tests.manager.projections.samples import APP_MAP, HISTORY


def _fold(
    steps: list[tuple[Aggregate, str, dict[str, Any]]], memo: RecordMemo | None
) -> list[dict[str, Any] | str | None]:
    """Fold a history root by root; each step's state in JSON form (or the error's text)."""
    states: dict[Aggregate, Any] = {}
    out: list[dict[str, Any] | str | None] = []
    for agg, ev_type, data in steps:
        try:
            folded = apply_event(agg, states.get(agg), ev_type, copy.deepcopy(data), memo)
        except SkyferryError as exc:
            out.append(f"{type(exc).__name__}: {exc.message}")
            continue
        states[agg] = folded
        if folded is None:
            out.append(None)
        else:
            out.append(memo.dump(folded) if memo is not None else folded.model_dump(mode="json"))
    return out


def _node(i: int, k: int, address: str | None = None) -> dict[str, Any]:
    return {
        "id": f"n{i}",
        "name": f"Node {i} rev {k}",
        "server_id": "srv1",
        "deploy_priority": (k * 7) % 1000,
        "interfaces": [
            {"name": "eth0", "application_network": "lan1", "address": address or f"10.1.1.{30 + i}", "prefix_len": 24}
        ],
    }


def _app_history(seed: int) -> list[tuple[Aggregate, str, dict[str, Any]]]:
    """An application imported, then random node creates/updates/deletes (some invalid), state changes."""
    rnd = random.Random(seed)
    steps: list[tuple[Aggregate, str, dict[str, Any]]] = [
        (Aggregate.APP, event_type("app", "imported"), {"map": APP_MAP})
    ]
    live: set[int] = set()
    for k in range(120):
        i = rnd.randrange(6)
        roll = rnd.random()
        if roll < 0.1:  # invalid: an address outside the subnet, or a dangling network
            bad = _node(i, k, address="192.168.9.9")
            if rnd.random() < 0.5:
                bad["interfaces"][0]["application_network"] = "nowhere"
            verb = "created" if i not in live else "updated"
            steps.append((Aggregate.APP, event_type("node", verb), {"record": bad}))
        elif roll < 0.2 and live:
            gone = rnd.choice(sorted(live))
            live.discard(gone)
            steps.append((Aggregate.APP, event_type("node", "deleted"), {"id": f"n{gone}"}))
        elif roll < 0.25:  # garbage shapes: not a record at all
            steps.append((Aggregate.APP, event_type("node", "updated"), {"record": ["not", "a", "node"]}))
        elif roll < 0.3:
            app = {**APP_MAP["application"], "description": f"rev {k}"}
            steps.append((Aggregate.APP, event_type("app", "updated"), {"record": app}))
        else:
            verb = "updated" if i in live else "created"
            live.add(i)
            steps.append((Aggregate.APP, event_type("node", verb), {"record": _node(i, k)}))
    return steps


@pytest.mark.parametrize("seed", range(6))
def test_memo_fold_equals_plain_fold(seed: int) -> None:
    steps = _app_history(seed)
    plain = _fold(steps, None)
    assert any(isinstance(s, str) for s in plain), "the history must contain refused events"
    assert _fold(steps, RecordMemo()) == plain
    assert _fold(steps, RecordMemo(size=4)) == plain  # evicting constantly changes nothing either


def test_memo_fold_equals_plain_fold_for_every_aggregate_type() -> None:
    steps = [(Aggregate(a), ev_type, data) for a, _id, ev_type, data in HISTORY if a != "saga"]
    by_type: dict[Aggregate, list[tuple[Aggregate, str, dict[str, Any]]]] = {}
    for step in steps:
        by_type.setdefault(step[0], []).append(step)
    memo = RecordMemo()
    for agg, history in by_type.items():
        assert _fold(history, memo) == _fold(history, None), agg


def test_a_refused_record_reads_as_without_memo() -> None:
    memo = RecordMemo()
    state = apply_event(Aggregate.APP, None, event_type("app", "imported"), {"map": APP_MAP}, memo)
    bad = _node(1, 1, address="10.1.1.0")  # the network address of lan1
    with pytest.raises(SkyferryError) as plain:
        apply_event(Aggregate.APP, state, event_type("node", "created"), {"record": bad})
    with pytest.raises(SkyferryError) as memoized:
        apply_event(Aggregate.APP, state, event_type("node", "created"), {"record": bad}, memo)
    assert type(memoized.value) is type(plain.value)
    assert memoized.value.message == plain.value.message
    assert memoized.value.details == plain.value.details
    assert "not a host address" in plain.value.message


def test_records_met_again_are_not_validated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    memo = RecordMemo()
    state = apply_event(Aggregate.APP, None, event_type("app", "imported"), {"map": APP_MAP}, memo)
    assert state is not None
    known = len(memo)
    validated: list[str] = []
    original = RecordMemo._add

    def counting(self: RecordMemo, model: Any, item: Any, key: Any) -> Any:
        validated.append(model.__name__)
        return original(self, model, item, key)

    monkeypatch.setattr(RecordMemo, "_add", counting)
    folded = apply_event(Aggregate.APP, state, event_type("node", "created"), {"record": _node(3, 1)}, memo)
    assert validated == ["Node"]  # only the new record; the map's other records came from the memo
    assert len(memo) == known + 1
    assert folded is not None and [n.id for n in folded.nodes] == ["web1", "db1", "n3"]  # type: ignore[attr-defined]


def test_memo_is_bounded_and_keeps_what_is_in_use() -> None:
    memo = RecordMemo(size=16)
    state = apply_event(Aggregate.APP, None, event_type("app", "imported"), {"map": APP_MAP}, memo)
    for k in range(200):
        state = apply_event(Aggregate.APP, state, event_type("node", "updated"), {"record": _node_for_db1(k)}, memo)
        assert len(memo) <= 16
    assert state is not None
    assert memo.dump(state) == state.model_dump(mode="json")


def _node_for_db1(k: int) -> dict[str, Any]:
    node = copy.deepcopy(APP_MAP["nodes"][1])
    node["capture_priority"] = k % 1000
    return node
