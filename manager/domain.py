"""Domain behaviour of the map store: validate a change, turn it into an event, fold events.

Pure functions over pydantic state; no I/O. The same :func:`apply_event` is
used to validate a write (apply to a copy, then validate the whole root) and
to fold stored events on read, so a stored stream always folds back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from bus.errors import AlreadyExists, InvalidState, NotFound, ValidationFailed
from bus.kinds import KINDS, ROOT_KIND, ROOT_STATE, Aggregate, RecordKind
from bus.messages import EVENT_PREFIX, event_type
from bus.models import ApplicationMap
from bus.models.application import ApplicationState, check_transition
from bus.models.common import ModelError, Status

#: Children of a root that a root ``updated`` event must not touch.
_CHILD_FIELDS: dict[Aggregate, set[str]] = {
    Aggregate.DOMAIN: {"vnas", "resource_domains", "local_overlay_networks"},
}


def _validation_error(exc: ValidationError | ModelError, what: str) -> ValidationFailed:
    if isinstance(exc, ValidationError):
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
    else:
        errors = [{"loc": "", "msg": str(exc)}]
    return ValidationFailed(f"invalid {what}: {errors[0]['msg'] if errors else exc}", details={"errors": errors})


def validate_root(aggregate: Aggregate, data: dict[str, Any]) -> BaseModel:
    """Validate a whole aggregate root (cross-record rules included)."""
    try:
        return ROOT_STATE[aggregate].model_validate(data)
    except (ValidationError, ModelError) as exc:
        raise _validation_error(exc, aggregate.value) from exc


def key_of(kind: RecordKind, record: BaseModel | dict[str, Any]) -> str:
    data = record if isinstance(record, dict) else record.model_dump(mode="json")
    return str(data[kind.key])


def _root_dict(state: BaseModel | None) -> dict[str, Any] | None:
    return None if state is None else state.model_dump(mode="json")


def apply_event(aggregate: Aggregate, state: BaseModel | None, ev_type: str, data: dict[str, Any]) -> BaseModel | None:
    """Fold one event into the root state (``None`` = absent or deleted)."""
    if not ev_type.startswith(EVENT_PREFIX):
        raise ValidationFailed(f"unknown event type {ev_type!r}")
    kind_name, _, verb = ev_type[len(EVENT_PREFIX) :].rpartition(".")
    current = _root_dict(state)
    if aggregate is Aggregate.APP and kind_name == "app" and verb in ("imported", "state_changed"):
        return _apply_app_special(current, verb, data)
    kind = KINDS.get(kind_name)
    if kind is None or kind.aggregate is not aggregate:
        raise ValidationFailed(f"event {ev_type!r} does not belong to a {aggregate.value}")
    if kind.is_root:
        return _apply_root(aggregate, kind, current, verb, data)
    if current is None:
        raise NotFound(f"{aggregate.value} does not exist")
    return _apply_child(aggregate, kind, current, verb, data)


def _apply_root(
    aggregate: Aggregate, kind: RecordKind, current: dict[str, Any] | None, verb: str, data: dict[str, Any]
) -> BaseModel | None:
    if verb == "deleted":
        return None
    record = data["record"]
    if aggregate is Aggregate.APP:
        base = current or {"application": record}
        return validate_root(aggregate, {**base, "application": record})
    if verb == "updated" and current is not None:
        keep = {f: current[f] for f in _CHILD_FIELDS.get(aggregate, set()) if f in current}
        return validate_root(aggregate, {**record, **keep})
    return validate_root(aggregate, record)


def _apply_child(
    aggregate: Aggregate, kind: RecordKind, current: dict[str, Any], verb: str, data: dict[str, Any]
) -> BaseModel:
    assert kind.parent_field is not None
    items: list[dict[str, Any]] = list(current.get(kind.parent_field) or [])
    if verb == "deleted":
        items = [i for i in items if str(i[kind.key]) != data["id"]]
    else:
        record = data["record"]
        key = key_of(kind, record)
        items = [i for i in items if str(i[kind.key]) != key] if verb == "updated" else items
        items.append(record)
    return validate_root(aggregate, {**current, kind.parent_field: items})


def _apply_app_special(current: dict[str, Any] | None, verb: str, data: dict[str, Any]) -> BaseModel:
    if verb == "imported":
        return validate_root(Aggregate.APP, data["map"])
    if current is None:
        raise NotFound("application does not exist")
    app = {**current["application"], "state": data["to_state"], "status": data["status"]}
    return validate_root(Aggregate.APP, {**current, "application": app})


# --- deciding: command -> (event type, event data), with the business rules ------------------------


def find_child(kind: RecordKind, root: BaseModel, key: str) -> BaseModel | None:
    assert kind.parent_field is not None
    for item in getattr(root, kind.parent_field):
        if key_of(kind, item) == key:
            return item  # type: ignore[no-any-return]
    return None


def decide_create(kind: RecordKind, root: BaseModel | None, record: BaseModel) -> tuple[str, dict[str, Any]]:
    """Event for creating ``record``; refuses duplicates."""
    data = {"record": record.model_dump(mode="json")}
    key = key_of(kind, record)
    if kind.is_root:
        if root is not None:
            raise AlreadyExists(f"{kind.name} {key!r} already exists")
        return event_type(kind.name, "created"), data
    if root is None:
        raise NotFound(f"{ROOT_KIND[kind.aggregate].name} does not exist")
    if find_child(kind, root, key) is not None:
        raise AlreadyExists(f"{kind.name} {key!r} already exists")
    return event_type(kind.name, "created"), data


def decide_update(kind: RecordKind, root: BaseModel | None, record: BaseModel) -> tuple[str, dict[str, Any]]:
    """Event for replacing ``record``; the record must exist."""
    key = key_of(kind, record)
    if root is None or (not kind.is_root and find_child(kind, root, key) is None):
        raise NotFound(f"{kind.name} {key!r} does not exist")
    if kind.is_root and kind.aggregate is Aggregate.APP:
        assert isinstance(root, ApplicationMap)
        if record.state != root.application.state:  # type: ignore[attr-defined]
            raise InvalidState("application state changes only through app_set_state")
    return event_type(kind.name, "updated"), {"record": record.model_dump(mode="json")}


def decide_delete(kind: RecordKind, root: BaseModel | None, key: str) -> tuple[str, dict[str, Any]]:
    """Event for deleting record ``key``."""
    if root is None or (not kind.is_root and find_child(kind, root, key) is None):
        raise NotFound(f"{kind.name} {key!r} does not exist")
    return event_type(kind.name, "deleted"), {"id": key}


def decide_set_state(
    root: BaseModel | None, to_state: ApplicationState, status: Status | None
) -> tuple[str, dict[str, Any]]:
    """Event for an application state change; enforces the life cycle."""
    if root is None:
        raise NotFound("application does not exist")
    assert isinstance(root, ApplicationMap)
    current = root.application.state
    try:
        check_transition(current, to_state)
    except ModelError as exc:
        raise InvalidState(str(exc), details={"from": current.value, "to": to_state.value}) from exc
    return event_type("app", "state_changed"), {
        "from_state": current.value,
        "to_state": to_state.value,
        "status": (status or Status()).model_dump(mode="json"),
    }
