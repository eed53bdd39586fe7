"""Pure folding for the projections: the domain's fold for map roots, a generic one for sagas.

Map roots (overlay, domain, app, user) fold with :func:`manager.domain.apply_event`,
exactly as the manager does, so a read model never disagrees with the store.
Saga events are written by the saga coordinator; the projection only keeps a
summary (name, status, last event type), so it needs no knowledge of the plan.

The projector keeps states in their JSON form (``model_dump(mode="json")``, which is
all :func:`manager.domain.apply_event` reads of a state) and folds with
:func:`fold_json`: the same fold, without turning a cached state back into a model
first. The JSON form is what ``aggregates.state`` stores anyway.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bus.kinds import ROOT_STATE, Aggregate
from manager.domain import RecordMemo, apply_event
from manager.projections.errors import InvalidEvent
from manager.store.recorder import StoredEvent

SAGA_PREFIX = "skyferry.v1.saga."

#: Folded state of one root: a model for map roots, a plain dict for sagas, None if absent/deleted.
RootState = BaseModel | dict[str, Any] | None
#: A root's state in JSON form (None: absent or deleted).
JsonState = dict[str, Any] | None

# Saga event suffixes that do not name a status of their own.
_RUNNING = frozenset({"started", "resumed", "retrying"})


def aggregate_of(aggregate_type: str) -> Aggregate:
    """The aggregate root type named by an event subject.

    Raises:
        InvalidEvent: not a known aggregate type.
    """
    try:
        return Aggregate(aggregate_type)
    except ValueError:
        raise InvalidEvent(f"unknown aggregate type {aggregate_type!r}") from None


def saga_status(event_type: str) -> str:
    """Status implied by a saga event: its suffix, with progress events read as running/compensating.

    ``step_started`` -> ``running``, ``step_compensated`` -> ``compensating``,
    ``completed`` / ``compensated`` / ``failed`` / ``paused`` as they are.
    """
    suffix = event_type.rpartition(".")[2]
    if suffix.startswith(("step_compensat", "compensation_")) or suffix == "compensating":
        return "compensating"
    if suffix.startswith("step_") or suffix in _RUNNING:
        return "running"
    return suffix


def fold_saga(state: dict[str, Any] | None, ev: StoredEvent) -> dict[str, Any]:
    """Fold one saga event into its summary."""
    if not ev.event_type.startswith(SAGA_PREFIX) or len(ev.event_type) == len(SAGA_PREFIX):
        raise InvalidEvent(f"not a saga event type: {ev.event_type!r}")
    prev = state or {}
    name = ev.data.get("name")
    return {
        "id": ev.aggregate_id,
        "name": name if isinstance(name, str) else prev.get("name"),
        "status": saga_status(ev.event_type),
        "last_event_type": ev.event_type,
        "events": int(prev.get("events", 0)) + 1,
    }


def fold_event(aggregate: Aggregate, state: RootState, ev: StoredEvent) -> RootState:
    """Fold one event into a root's state.

    Raises:
        InvalidEvent: the event does not fit the state (wrong type, bad payload, missing root...).
    """
    if aggregate is Aggregate.SAGA:
        return fold_saga(state if isinstance(state, dict) else None, ev)
    model = state if isinstance(state, BaseModel) else None
    try:
        return apply_event(aggregate, model, ev.event_type, ev.data)
    except InvalidEvent:
        raise
    except Exception as exc:  # a pure fold: whatever it raises is the event's fault, never the database's
        raise InvalidEvent(f"cannot fold {ev.event_type}: {exc}", details={"error": type(exc).__name__}) from exc


class _JsonForm(BaseModel):
    """A root's state already in JSON form, handed to :func:`apply_event` in place of its model.

    ``apply_event`` reads a state only through ``model_dump(mode="json")`` (and never
    mutates the result): returning the JSON form spares re-validating a cached state
    into a model only to dump it again. Any other use fails (it has no other field),
    and the fold falls back to the real model (see :func:`fold_json`).
    """

    form: dict[str, Any]

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        if kwargs != {"mode": "json"}:
            raise _NeedsModel
        return self.form


class _NeedsModel(Exception):
    """apply_event used a state other than through its JSON dump: fold with the real model."""


def fold_json(aggregate: Aggregate, state: JsonState, ev: StoredEvent, memo: RecordMemo | None = None) -> JsonState:
    """:func:`fold_event` on states in JSON form: the manager's fold, state in and out as JSON.

    ``memo`` spares validating again the records of a root that the event left as they were
    (:class:`manager.domain.RecordMemo`); the folded state is the same with or without it.

    Raises:
        InvalidEvent: the event does not fit the state (wrong type, bad payload, missing root...).
    """
    if aggregate is Aggregate.SAGA:
        return fold_saga(state, ev)
    proxy = None if state is None else _JsonForm.model_construct(form=state)
    try:
        folded = apply_event(aggregate, proxy, ev.event_type, ev.data, memo)
    except (_NeedsModel, AttributeError):  # the domain read the state some other way: same fold, real model
        return state_to_json(fold_event(aggregate, state_from_json(aggregate, state), ev))
    except InvalidEvent:
        raise
    except Exception as exc:  # a pure fold: whatever it raises is the event's fault, never the database's
        raise InvalidEvent(f"cannot fold {ev.event_type}: {exc}", details={"error": type(exc).__name__}) from exc
    if folded is None:
        return None
    return folded.model_dump(mode="json") if memo is None else memo.dump(folded)


def state_to_json(state: RootState) -> dict[str, Any] | None:
    """JSON form stored in ``aggregates.state`` (secrets masked, as in events)."""
    if state is None or isinstance(state, dict):
        return state
    return state.model_dump(mode="json")


def state_from_json(aggregate: Aggregate, data: dict[str, Any] | None) -> RootState:
    """Inverse of :func:`state_to_json`.

    Raises:
        InvalidEvent: the stored state no longer validates (the model changed: rebuild).
    """
    if data is None or aggregate is Aggregate.SAGA:
        return data
    try:
        return ROOT_STATE[aggregate].model_validate(data)
    except ValueError as exc:  # pydantic ValidationError and the models' ModelError are ValueErrors
        raise InvalidEvent(f"stored {aggregate.value} state does not validate; rebuild the projection") from exc
