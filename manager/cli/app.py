"""``skyferry app``: application maps, their life cycle, and the records inside them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer

from bus.mapio import decode_map_text, detect_format, dump_map, load_application_map
from bus.messages import AppExport, AppImport, AppMapView, AppSetState, WriteResult
from bus.models import ApplicationMap, ApplicationState, ModelError, Status, StatusLevel
from manager.cli.context import Session, run_session
from manager.cli.crud import KindCli, add_record_commands, show_write
from manager.cli.errors import CliError, local_error
from manager.cli.output import Column
from manager.cli.records import SUB, export_format, write_text
from manager.cli.views import APP_COLUMNS, APP_NETWORK_COLUMNS, NODE_COLUMNS, render_app_map

app_app = typer.Typer(help="Application maps: import/export, state changes, nodes and networks.", no_args_is_help=True)
add_record_commands(
    app_app, KindCli("app", "application", APP_COLUMNS, verbs={"list": "list", "update": "update", "delete": "delete"})
)
node_app = typer.Typer(help="Nodes (servers or images to deploy) of an application.", no_args_is_help=True)
add_record_commands(node_app, KindCli("node", "node", NODE_COLUMNS, verbs=SUB))
network_app = typer.Typer(help="Application networks (production and fence overlays).", no_args_is_help=True)
add_record_commands(network_app, KindCli("app_network", "application network", APP_NETWORK_COLUMNS, verbs=SUB))
pool_app = typer.Typer(help="Node pools (scaled copies of a prime node).", no_args_is_help=True)
pool_columns = (Column("Id", "id"), Column("Prime node", "prime_node"), Column("Min", "min_nodes"))
add_record_commands(pool_app, KindCli("node_pool", "node pool", (*pool_columns, Column("Max", "max_nodes")), verbs=SUB))
db_app = typer.Typer(help="Databases used by nodes and how they migrate.", no_args_is_help=True)
db_columns = (Column("Id", "id"), Column("Node", "node_id"), Column("Migrate mode", "migrate_mode"))
add_record_commands(db_app, KindCli("database", "database", db_columns, verbs=SUB))
app_app.add_typer(node_app, name="node")
app_app.add_typer(network_app, name="network")
app_app.add_typer(pool_app, name="pool")
app_app.add_typer(db_app, name="database")

AsOfPosition = Annotated[
    int | None, typer.Option("--as-of-position", min=1, help="As it was at this event stream position.")
]
AsOfTime = Annotated[str | None, typer.Option("--as-of-time", help="As it was at this ISO time (UTC if no zone).")]


def as_of(position: int | None, time: str | None) -> dict[str, Any]:
    """AsOf fields from the options; a time without a zone is UTC."""
    when: dt.datetime | None = None
    if time is not None:
        try:
            when = dt.datetime.fromisoformat(time)
        except ValueError as exc:
            raise CliError(f"--as-of-time: {time!r} is not an ISO date/time") from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    return {"as_of_position": position, "as_of_time": when}


def read_application_map(path: Path) -> ApplicationMap:
    """Load and validate an application map file (format from the extension, else sniffed)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return load_application_map(decode_map_text(raw), detect_format(path) if path.suffix else None)
    except ModelError as exc:
        raise local_error(exc, f"application map {path}") from exc


async def import_app(s: Session, am: ApplicationMap, *, replace: bool = False) -> WriteResult:
    return await s.call("app_import", AppImport(map=am, replace=replace), WriteResult)


async def export_app(s: Session, app_id: str, **when: Any) -> AppMapView:
    return await s.call("app_export", AppExport(id=app_id, **when), AppMapView)


async def set_state(s: Session, app_id: str, state: ApplicationState, status: Status | None = None) -> WriteResult:
    return await s.call("app_set_state", AppSetState(id=app_id, state=state, status=status), WriteResult)


@app_app.command("show")
def app_show(
    ctx: typer.Context,
    app_id: Annotated[str, typer.Argument(metavar="ID")],
    as_of_position: AsOfPosition = None,
    as_of_time: AsOfTime = None,
) -> None:
    """Show an application map (now, or as of an earlier position or time)."""

    async def body(s: Session) -> None:
        view = await export_app(s, app_id, **as_of(as_of_position, as_of_time))
        if s.out.human:
            render_app_map(s.out, view.map, view.version)
        else:
            s.out.document(view)

    run_session(ctx, body)


@app_app.command("import")
def app_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Application map (.yaml, .json or .xml).")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing application of the same id.")] = False,
) -> None:
    """Create (or with --replace, replace) an application from a map file, in one event."""

    async def body(s: Session) -> None:
        show_write(s.out, await import_app(s, read_application_map(file), replace=replace), "application")

    run_session(ctx, body)


@app_app.command("export")
def app_export(
    ctx: typer.Context,
    app_id: Annotated[str, typer.Argument(metavar="ID")],
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="yaml, json or xml (default: --out's extension, else yaml).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    as_of_position: AsOfPosition = None,
    as_of_time: AsOfTime = None,
) -> None:
    """Export an application map (secrets masked)."""
    chosen = export_format(fmt, out)

    async def body(s: Session) -> None:
        view = await export_app(s, app_id, **as_of(as_of_position, as_of_time))
        write_text(s, dump_map(view.map, chosen), out)

    run_session(ctx, body)


@app_app.command("state")
def app_state(
    ctx: typer.Context,
    app_id: Annotated[str, typer.Argument(metavar="ID")],
    new_state: Annotated[ApplicationState, typer.Argument(metavar="NEW_STATE", help="Target state.")],
    level: Annotated[StatusLevel, typer.Option("--level", help="Status level after the change.")] = StatusLevel.OK,
    detail: Annotated[str, typer.Option("--detail", help="Status detail.")] = "",
) -> None:
    """Move an application along its life cycle (illegal transitions are refused)."""

    async def body(s: Session) -> None:
        result = await set_state(s, app_id, new_state, Status(level=level, detail=detail))
        if s.out.human:
            s.out.success(f"application {app_id} is now {new_state.value} (position {result.version})")
        else:
            s.out.document(result)

    run_session(ctx, body)
