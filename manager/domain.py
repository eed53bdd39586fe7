"""Domain behaviour of the map store: validate a change, turn it into an event, fold events.

Pure functions over pydantic state; no I/O. The same :func:`apply_event` is
used to validate a write (apply to a copy, then validate the whole root) and
to fold stored events on read, so a stored stream always folds back.
"""

from __future__ import annotations

import itertools
import types
import typing
from typing import Any

import orjson
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


def validate_root(aggregate: Aggregate, data: dict[str, Any], memo: RecordMemo | None = None) -> BaseModel:
    """Validate a whole aggregate root (cross-record rules included).

    With a ``memo``, records seen before in the same JSON form are not validated again
    (see :class:`RecordMemo`); the result, and any error, is the same as without.
    """
    model = ROOT_STATE[aggregate]
    if memo is not None:
        try:
            return model.model_validate(memo.substitute(model, data))
        except (ValidationError, ModelError, TypeError):
            pass  # refused: validate afresh below, so that the error reads exactly as without the memo
    try:
        return model.model_validate(data)
    except (ValidationError, ModelError) as exc:
        raise _validation_error(exc, aggregate.value) from exc


def _record_fields(model: type[BaseModel]) -> dict[str, tuple[type[BaseModel], bool]]:
    """A root model's fields that hold records: name -> (record model, is a list)."""
    out: dict[str, tuple[type[BaseModel], bool]] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        is_list = typing.get_origin(ann) is list
        inner = typing.get_args(ann)[0] if is_list else ann
        if isinstance(inner, type) and not isinstance(inner, types.GenericAlias) and issubclass(inner, BaseModel):
            out[name] = (inner, is_list)
    return out


class RecordMemo:
    """Validated records of roots, by model and JSON form, for folds that validate one root per event.

    Folding an event into an application map validates the whole map, though an
    event changes one record of it. Validation is a pure function of a record's
    JSON form, and pydantic takes an instance of a field's model as valid without
    looking into it (``revalidate_instances="never"``), so a root rebuilt from the
    memo's instances re-runs only its own cross-record rules and validates only
    the records it has not seen before; :meth:`dump` then assembles the root's
    JSON form from the records' dumps. Instances and dumps are shared between
    roots: only for folds whose result is dumped and dropped (the projections),
    never for states handed out to be read or changed, and root validators must
    check their records, never change them. Bounded: the least recently used go first.
    """

    def __init__(self, size: int = 16_384) -> None:
        self.size = size
        self._by_text: dict[tuple[type[BaseModel], bytes], _Memoized] = {}
        self._by_form: dict[int, _Memoized] = {}
        """id of a dump handed out -> its record (the next fold meets that very dict again)."""
        self._by_instance: dict[int, _Memoized] = {}
        """id of an instance -> its record, least recently used first."""
        self._fields: dict[type[BaseModel], dict[str, tuple[type[BaseModel], bool]]] = {}

    def __len__(self) -> int:
        return len(self._by_instance)

    def substitute(self, root: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with each record of a ``root`` field replaced by its validated instance.

        Raises:
            ValidationError, ModelError: a record not seen before does not validate.
        """
        if not isinstance(data, dict):
            return data  # pydantic refuses it, with its own words
        out = dict(data)
        for name, (model, is_list) in self._record_fields(root).items():
            value = data.get(name)
            if is_list and isinstance(value, list):
                out[name] = [self.record(model, item) for item in value]
            elif not is_list and value is not None:
                out[name] = self.record(model, value)
        return out

    def record(self, model: type[BaseModel], item: Any) -> Any:
        """The validated instance of one record (``item`` itself when it is not a JSON object)."""
        if not isinstance(item, dict):
            return item
        known = self._by_form.get(id(item))
        if known is None or known.form is not item or type(known.instance) is not model:
            try:
                key = (model, orjson.dumps(item))
            except TypeError:  # not JSON: leave it to pydantic
                return item
            known = self._by_text.get(key)
            if known is None:
                return self._add(model, item, key).instance
        by_instance = self._by_instance
        del by_instance[id(known.instance)]  # used now: to the end of the line
        by_instance[id(known.instance)] = known
        return known.instance

    def _add(self, model: type[BaseModel], item: dict[str, Any], key: tuple[type[BaseModel], bytes]) -> _Memoized:
        instance = model.model_validate(item)
        form = instance.model_dump(mode="json")
        # The next fold meets the record in its folded form (this very dict, or its text): known so too.
        known = _Memoized(instance, form, (key, (model, orjson.dumps(form))))
        if len(self._by_instance) >= self.size:
            self._evict(max(1, self.size // 8))
        for k in known.keys:
            self._by_text[k] = known
        self._by_form[id(form)] = known
        self._by_instance[id(instance)] = known
        return known

    def _evict(self, count: int) -> None:
        for instance_id in list(itertools.islice(self._by_instance, count)):
            known = self._by_instance.pop(instance_id)
            self._by_form.pop(id(known.form), None)
            for k in known.keys:
                if self._by_text.get(k) is known:
                    del self._by_text[k]

    def dump(self, root: BaseModel) -> dict[str, Any]:
        """``root.model_dump(mode="json")``, its records' parts taken from the memo."""
        fields = self._record_fields(type(root))
        rest = [name for name in type(root).model_fields if name not in fields]
        plain = root.model_dump(mode="json", include=set(rest)) if rest else {}
        out: dict[str, Any] = {}
        for name in type(root).model_fields:
            if name not in fields:
                out[name] = plain[name]
                continue
            value = getattr(root, name)
            if isinstance(value, list):
                out[name] = [self._dump_of(item) for item in value]
            else:
                out[name] = None if value is None else self._dump_of(value)
        return out

    def _dump_of(self, instance: BaseModel) -> dict[str, Any]:
        known = self._by_instance.get(id(instance))
        if known is not None and known.instance is instance:
            return known.form
        return instance.model_dump(mode="json")

    def _record_fields(self, root: type[BaseModel]) -> dict[str, tuple[type[BaseModel], bool]]:
        fields = self._fields.get(root)
        if fields is None:
            fields = self._fields[root] = _record_fields(root)
        return fields

    def clear(self) -> None:
        """Forget every record."""
        self._by_text.clear()
        self._by_form.clear()
        self._by_instance.clear()


class _Memoized:
    """A validated record and its JSON form (both kept alive, so that their ids stay theirs)."""

    __slots__ = ("form", "instance", "keys")

    def __init__(
        self, instance: BaseModel, form: dict[str, Any], keys: tuple[tuple[type[BaseModel], bytes], ...]
    ) -> None:
        self.instance = instance
        self.form = form
        self.keys = keys


def key_of(kind: RecordKind, record: BaseModel | dict[str, Any]) -> str:
    data = record if isinstance(record, dict) else record.model_dump(mode="json")
    return str(data[kind.key])


def _root_dict(state: BaseModel | None) -> dict[str, Any] | None:
    return None if state is None else state.model_dump(mode="json")


def apply_event(
    aggregate: Aggregate,
    state: BaseModel | None,
    ev_type: str,
    data: dict[str, Any],
    memo: RecordMemo | None = None,
) -> BaseModel | None:
    """Fold one event into the root state (``None`` = absent or deleted).

    ``memo``: see :class:`RecordMemo` (only where the result is dumped and dropped).
    """
    if not ev_type.startswith(EVENT_PREFIX):
        raise ValidationFailed(f"unknown event type {ev_type!r}")
    kind_name, _, verb = ev_type[len(EVENT_PREFIX) :].rpartition(".")
    current = _root_dict(state)
    if aggregate is Aggregate.APP and kind_name == "app" and verb in ("imported", "state_changed"):
        return _apply_app_special(current, verb, data, memo)
    kind = KINDS.get(kind_name)
    if kind is None or kind.aggregate is not aggregate:
        raise ValidationFailed(f"event {ev_type!r} does not belong to a {aggregate.value}")
    if kind.is_root:
        return _apply_root(aggregate, kind, current, verb, data, memo)
    if current is None:
        raise NotFound(f"{aggregate.value} does not exist")
    return _apply_child(aggregate, kind, current, verb, data, memo)


def _record_of(data: dict[str, Any]) -> dict[str, Any]:
    record = data.get("record")
    if not isinstance(record, dict):
        raise ValidationFailed(f"event data needs a record object, got {type(record).__name__}")
    return record


def _id_of(data: dict[str, Any]) -> str:
    key = data.get("id")
    if not isinstance(key, str):
        raise ValidationFailed(f"event data needs an id string, got {type(key).__name__}")
    return key


def _apply_root(
    aggregate: Aggregate,
    kind: RecordKind,
    current: dict[str, Any] | None,
    verb: str,
    data: dict[str, Any],
    memo: RecordMemo | None,
) -> BaseModel | None:
    if verb == "deleted":
        return None
    record = _record_of(data)
    if aggregate is Aggregate.APP:
        base = current or {"application": record}
        return validate_root(aggregate, {**base, "application": record}, memo)
    if verb == "updated" and current is not None:
        keep = {f: current[f] for f in _CHILD_FIELDS.get(aggregate, set()) if f in current}
        return validate_root(aggregate, {**record, **keep}, memo)
    return validate_root(aggregate, record, memo)


def _apply_child(
    aggregate: Aggregate,
    kind: RecordKind,
    current: dict[str, Any],
    verb: str,
    data: dict[str, Any],
    memo: RecordMemo | None,
) -> BaseModel:
    assert kind.parent_field is not None
    items: list[dict[str, Any]] = list(current.get(kind.parent_field) or [])
    if verb == "deleted":
        key = _id_of(data)
        items = [i for i in items if str(i[kind.key]) != key]
    else:
        record = _record_of(data)
        key = key_of(kind, record)
        items = [i for i in items if str(i[kind.key]) != key] if verb == "updated" else items
        items.append(record)
    return validate_root(aggregate, {**current, kind.parent_field: items}, memo)


def _apply_app_special(
    current: dict[str, Any] | None, verb: str, data: dict[str, Any], memo: RecordMemo | None
) -> BaseModel:
    if verb == "imported":
        return validate_root(Aggregate.APP, data.get("map"), memo)  # type: ignore[arg-type]  # validated there
    if current is None:
        raise NotFound("application does not exist")
    app = {**current["application"], "state": data["to_state"], "status": data["status"]}
    return validate_root(Aggregate.APP, {**current, "application": app}, memo)


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
