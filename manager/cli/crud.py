"""Generic record commands: CLI verbs mapped onto the manager's ``<kind>_<verb>`` commands.

One :class:`KindCli` describes a record kind for the CLI (its table columns and
the argument naming its root, if it lives inside one);
:func:`add_record_commands` registers ``list``, ``show``, ``create``/``add``,
``update`` and ``delete``/``remove`` for it. Records come from a YAML/JSON file
(``-f``), ``--id``/``--name`` and ``--set key=value`` options; updates read the
current record, apply the changes and write with the version they read
(optimistic concurrency: a concurrent change makes the update fail, not vanish).

This module deliberately has no ``from __future__ import annotations``: the
command signatures are built in closures and typer evaluates them at runtime.
"""

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from bus.errors import ErrorCode
from bus.kinds import KINDS, ROOT_KIND, RecordKind
from bus.mapio import MapFormatError, _parse_json, _parse_yaml, decode_map_text
from bus.messages import MESSAGES, WriteResult
from manager.cli.context import Session, run_session
from manager.cli.errors import CliError, local_error
from manager.cli.output import Column, Output

# --- building records from files and options ---------------------------------------------------


def read_data(path: Path) -> Any:
    """Plain data from a YAML or JSON file (YAML read as the map importer reads it: no sexagesimal MACs)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = decode_map_text(raw)
        return _parse_json(text) if path.suffix.lower() == ".json" else _parse_yaml(text)
    except MapFormatError as exc:
        raise CliError(f"{path}: {exc}", code=ErrorCode.VALIDATION) from exc


def parse_set(item: str) -> tuple[list[str], Any, str]:
    """``a.b=value`` -> (path, value, raw text); the value is JSON when it parses as JSON."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CliError(f"--set expects key=value, got {item!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip().split("."), value, raw


def _put(data: Any, path: list[str], value: Any) -> None:
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(data, list):
            if not part.isdigit() or int(part) >= len(data):
                raise CliError(f"--set {'.'.join(path)}: no list item {part!r}")
            index: int | str = int(part)
        elif isinstance(data, dict):
            index = part
            if not last and not isinstance(data.get(part), dict | list):
                data[part] = {}
        else:
            raise CliError(f"--set {'.'.join(path)}: {'.'.join(path[:i])} is not an object")
        if last:
            data[index] = value
        else:
            data = data[index]


def build_record(
    kind: RecordKind,
    base: dict[str, Any] | None = None,
    *,
    file: Path | None = None,
    fields: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> BaseModel:
    """A validated record: ``base`` (or the file), then ``fields``, then ``--set`` values.

    A ``--set`` value that parsed as JSON but must be text (``--set name=123``) is retried as text.
    """
    data: Any = dict(base or {})
    if file is not None:
        data = read_data(file)
        if not isinstance(data, dict):
            raise CliError(f"{file}: expected one {kind.name} record (a mapping)", code=ErrorCode.VALIDATION)
    data.update({k: v for k, v in (fields or {}).items() if v is not None})
    parsed = [parse_set(s) for s in sets or []]
    for path, value, _ in parsed:
        _put(data, path, value)
    try:
        return kind.model.model_validate(data)
    except ValidationError as exc:
        as_text = {tuple(e["loc"]) for e in exc.errors() if e["type"] == "string_type"}
        retry = [(p, raw) for p, v, raw in parsed if not isinstance(v, str) and tuple(p) in as_text]
        if not retry:
            raise local_error(exc, kind.name) from exc
        for path, raw in retry:
            _put(data, path, raw)
        try:
            return kind.model.model_validate(data)
        except ValidationError as again:
            raise local_error(again, kind.name) from again


# --- calling the store ---------------------------------------------------------------------------


def _parent(kind: RecordKind, parent: str) -> dict[str, Any]:
    return {} if kind.is_root else {"parent_id": parent}


async def list_records(s: Session, kind: RecordKind, parent: str = "") -> list[Any]:
    m = MESSAGES[kind.name]
    result = await s.call(f"{kind.name}_list", m.list(**_parent(kind, parent)), m.list_result)
    return list(result.items)


async def get_record(s: Session, kind: RecordKind, record_id: str, parent: str = "", **as_of: Any) -> Any:
    """The record's view: ``record``, ``aggregate_id`` and ``version``."""
    m = MESSAGES[kind.name]
    return await s.call(f"{kind.name}_get", m.get(**_parent(kind, parent), id=record_id, **as_of), m.view)


async def create_record(s: Session, kind: RecordKind, record: BaseModel, parent: str = "") -> WriteResult:
    m = MESSAGES[kind.name]
    return await s.call(f"{kind.name}_create", m.create(**_parent(kind, parent), record=record), WriteResult)


async def update_record(
    s: Session, kind: RecordKind, record: BaseModel, parent: str = "", expected_version: int | None = None
) -> WriteResult:
    m = MESSAGES[kind.name]
    req = m.update(**_parent(kind, parent), record=record, expected_version=expected_version)
    return await s.call(f"{kind.name}_update", req, WriteResult)


async def delete_record(
    s: Session, kind: RecordKind, record_id: str, parent: str = "", expected_version: int | None = None
) -> WriteResult:
    m = MESSAGES[kind.name]
    req = m.delete(**_parent(kind, parent), id=record_id, expected_version=expected_version)
    return await s.call(f"{kind.name}_delete", req, WriteResult)


async def modify_record(
    s: Session,
    kind: RecordKind,
    record_id: str,
    parent: str = "",
    *,
    file: Path | None = None,
    fields: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> WriteResult:
    """Read, change and write back one record with the version read (optimistic concurrency)."""
    view = await get_record(s, kind, record_id, parent)
    current = view.record.model_dump(mode="json", context={"include_secrets": True})
    if change is not None:
        change(current)
    record = build_record(kind, current, file=file, fields=fields, sets=sets)
    if str(getattr(record, kind.key)) != record_id:
        raise CliError(f"the record's {kind.key} is {getattr(record, kind.key)!r}, not {record_id!r}")
    return await update_record(s, kind, record, parent, expected_version=view.version)


def show_write(out: Output, result: WriteResult, what: str = "") -> None:
    """Confirm a write (people) or print the :class:`WriteResult` (scripts)."""
    if out.human:
        verb = result.event_type.rsplit(".", 1)[-1]
        where = "" if result.aggregate_id == result.id else f" in {result.aggregate} {result.aggregate_id}"
        out.success(f"{verb} {what or result.kind} {result.id}{where} (position {result.version})")
    else:
        out.document(result)


# --- registering commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class KindCli:
    """How the CLI presents one record kind."""

    kind: str
    noun: str
    columns: tuple[Column, ...]
    verbs: dict[str, str] = field(
        default_factory=lambda: {
            "list": "list",
            "show": "get",
            "create": "create",
            "update": "update",
            "delete": "delete",
        }
    )
    """CLI verb -> store verb, for the verbs to register."""

    @property
    def record_kind(self) -> RecordKind:
        return KINDS[self.kind]

    @property
    def parent_name(self) -> str:
        return ROOT_KIND[self.record_kind.aggregate].name.upper()


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0].lower() in "aeio" else f"a {noun}"


def _shape_parent(fn: Callable[..., None], kind: RecordKind) -> Callable[..., None]:
    """Root records have no parent argument (hidden; it keeps its default); children need it first."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "parent"]
    if not kind.is_root:
        parent = sig.parameters["parent"].replace(default=inspect.Parameter.empty)
        params.insert(1, parent)  # right after ctx: ``DOMAIN ID``
    fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return fn


def add_record_commands(app: typer.Typer, spec: KindCli) -> None:
    """Register the generic verbs of ``spec`` on ``app``."""
    builders = {"list": _list_cmd, "get": _show_cmd, "create": _create_cmd, "update": _update_cmd}
    builders["delete"] = _delete_cmd
    for cli_verb, store_verb in spec.verbs.items():
        fn = _shape_parent(builders[store_verb](spec), spec.record_kind)
        app.command(cli_verb, help=fn.__doc__)(fn)


def _list_cmd(spec: KindCli) -> Callable[..., None]:
    kind = spec.record_kind

    def list_(
        ctx: typer.Context,
        parent: Annotated[str, typer.Argument(metavar=spec.parent_name, help="Id of the root record.")] = "",
    ) -> None:
        async def body(s: Session) -> None:
            items = await list_records(s, kind, parent)
            if s.out.human:
                s.out.table(f"{spec.noun[0].upper()}{spec.noun[1:]}s", spec.columns, [i.record for i in items])
            else:
                s.out.document(items)

        run_session(ctx, body)

    list_.__doc__ = f"List {spec.noun} records."
    return list_


def _show_cmd(spec: KindCli) -> Callable[..., None]:
    kind = spec.record_kind

    def show(
        ctx: typer.Context,
        record_id: Annotated[str, typer.Argument(metavar="ID", help=f"Id of the {spec.noun}.")],
        parent: Annotated[str, typer.Argument(metavar=spec.parent_name, help="Id of the root record.")] = "",
    ) -> None:
        async def body(s: Session) -> None:
            view = await get_record(s, kind, record_id, parent)
            if s.out.human:
                s.out.mapping(view.record.model_dump(mode="json"), title=f"{spec.noun} {record_id}")
            else:
                s.out.document(view)

        run_session(ctx, body)

    show.__doc__ = f"Show one {spec.noun}."
    return show


def _create_cmd(spec: KindCli) -> Callable[..., None]:
    kind = spec.record_kind

    def create(
        ctx: typer.Context,
        parent: Annotated[str, typer.Argument(metavar=spec.parent_name, help="Id of the root record.")] = "",
        file: Annotated[Path | None, typer.Option("--file", "-f", help="The record as YAML or JSON.")] = None,
        record_id: Annotated[str | None, typer.Option("--id", help=f"The record's {kind.key}.")] = None,
        name: Annotated[str | None, typer.Option("--name", help="The record's name.")] = None,
        sets: Annotated[
            list[str] | None, typer.Option("--set", help="Field value: key=value, dotted keys, JSON values.")
        ] = None,
    ) -> None:
        async def body(s: Session) -> None:
            record = build_record(kind, file=file, fields={kind.key: record_id, "name": name}, sets=sets)
            show_write(s.out, await create_record(s, kind, record, parent), spec.noun)

        run_session(ctx, body)

    create.__doc__ = f"Create {_a(spec.noun)} from -f FILE and/or --id/--name/--set options."
    return create


def _update_cmd(spec: KindCli) -> Callable[..., None]:
    kind = spec.record_kind

    def update(
        ctx: typer.Context,
        record_id: Annotated[str, typer.Argument(metavar="ID", help=f"Id of the {spec.noun}.")],
        parent: Annotated[str, typer.Argument(metavar=spec.parent_name, help="Id of the root record.")] = "",
        file: Annotated[Path | None, typer.Option("--file", "-f", help="Replace with this YAML/JSON record.")] = None,
        name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
        sets: Annotated[
            list[str] | None, typer.Option("--set", help="Field value: key=value, dotted keys, JSON values.")
        ] = None,
    ) -> None:
        async def body(s: Session) -> None:
            result = await modify_record(s, kind, record_id, parent, file=file, fields={"name": name}, sets=sets)
            show_write(s.out, result, spec.noun)

        run_session(ctx, body)

    update.__doc__ = f"Update {_a(spec.noun)}: read it, apply -f FILE / --set, write it back at the version read."
    return update


def _delete_cmd(spec: KindCli) -> Callable[..., None]:
    kind = spec.record_kind

    def delete(
        ctx: typer.Context,
        record_id: Annotated[str, typer.Argument(metavar="ID", help=f"Id of the {spec.noun}.")],
        parent: Annotated[str, typer.Argument(metavar=spec.parent_name, help="Id of the root record.")] = "",
        expected_version: Annotated[
            int | None, typer.Option("--expected-version", help="Refuse unless the root is still at this version.")
        ] = None,
    ) -> None:
        async def body(s: Session) -> None:
            show_write(s.out, await delete_record(s, kind, record_id, parent, expected_version), spec.noun)

        run_session(ctx, body)

    delete.__doc__ = f"Delete {_a(spec.noun)}."
    return delete
