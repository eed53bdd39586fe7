"""``skyferry overlay|domain|netmap``: the network map, record by record or whole."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bus.kinds import KINDS
from bus.mapio import MapFormat, decode_map_text, detect_format, dump_map, load_network_map
from bus.messages import Empty, NetMapImport, NetMapImportResult, NetMapView
from bus.models import LocalOverlayNetwork, ModelError, NetworkDomain, NetworkMap, TunnelMode
from manager.cli.context import Session, run_session
from manager.cli.crud import (
    KindCli,
    add_record_commands,
    create_record,
    delete_record,
    get_record,
    show_write,
    update_record,
)
from manager.cli.errors import CliError, local_error
from manager.cli.views import (
    DOMAIN_COLUMNS,
    LOCAL_OVERLAY_COLUMNS,
    OVERLAY_COLUMNS,
    RESOURCE_COLUMNS,
    VNA_COLUMNS,
    render_domains,
    render_network_map,
)

SUB = {"list": "list", "show": "get", "add": "create", "update": "update", "remove": "delete"}

overlay_app = typer.Typer(help="Overlay networks: layer-2 networks that span network domains.", no_args_is_help=True)
add_record_commands(overlay_app, KindCli("overlay", "overlay", OVERLAY_COLUMNS))

domain_app = typer.Typer(help="Network domains, their VNAs, resource domains and overlay joins.", no_args_is_help=True)
add_record_commands(
    domain_app,
    KindCli(
        "domain",
        "domain",
        DOMAIN_COLUMNS,
        verbs={"list": "list", "create": "create", "update": "update", "delete": "delete"},
    ),
)
vna_app = typer.Typer(help="Virtual network appliances of a domain.", no_args_is_help=True)
add_record_commands(vna_app, KindCli("vna", "VNA", VNA_COLUMNS, verbs=SUB))
resource_app = typer.Typer(help="Resource domains (server pools) of a domain.", no_args_is_help=True)
add_record_commands(resource_app, KindCli("resource_domain", "resource domain", RESOURCE_COLUMNS, verbs=SUB))
local_app = typer.Typer(help="Local overlay networks of a domain (see also join/leave).", no_args_is_help=True)
add_record_commands(
    local_app,
    KindCli("local_overlay", "local overlay network", LOCAL_OVERLAY_COLUMNS, verbs=SUB),
)
domain_app.add_typer(vna_app, name="vna")
domain_app.add_typer(resource_app, name="resource")
domain_app.add_typer(local_app, name="overlay")

netmap_app = typer.Typer(help="The whole network map: import and export as YAML, JSON or XML.", no_args_is_help=True)


@domain_app.command("show")
def domain_show(ctx: typer.Context, domain_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show a domain with its VNAs, resource domains and local overlay networks."""

    async def body(s: Session) -> None:
        view = await get_record(s, KINDS["domain"], domain_id)
        if s.out.human:
            assert isinstance(view.record, NetworkDomain)
            render_domains(s.out, [view.record])
        else:
            s.out.document(view)

    run_session(ctx, body)


@domain_app.command("join")
def domain_join(
    ctx: typer.Context,
    domain_id: Annotated[str, typer.Argument(metavar="DOMAIN")],
    overlay_id: Annotated[str, typer.Argument(metavar="OVERLAY")],
    vlan: Annotated[
        list[int] | None, typer.Option("--vlan", help="Local VLAN id joined to the overlay (repeat).")
    ] = None,
    tunnel_server: Annotated[
        bool, typer.Option("--tunnel-server/--no-tunnel-server", help="This domain's VNA runs a tunnel server.")
    ] = False,
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Peer VNA tunnel URI to connect to (repeat).")
    ] = None,
    mode: Annotated[TunnelMode, typer.Option("--mode", help="How tunnel segments carry frames.")] = TunnelMode.STREAM,
    trusted: Annotated[
        bool, typer.Option("--trusted/--untrusted", help="Links are trusted (no encryption needed).")
    ] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Update an existing join instead of failing.")] = False,
) -> None:
    """Join local segments of a domain to an overlay network (a local overlay network)."""

    async def body(s: Session) -> None:
        kind = KINDS["local_overlay"]
        record = LocalOverlayNetwork(
            overlay_id=overlay_id,
            vlan_ids=vlan or [],
            provide_tunnel_server=tunnel_server,
            peer_uris=peer or [],
            tunnel_mode=mode,
            trusted=trusted,
        )
        if replace:
            view = await get_record(s, kind, overlay_id, domain_id)
            result = await update_record(s, kind, record, domain_id, expected_version=view.version)
        else:
            result = await create_record(s, kind, record, domain_id)
        show_write(s.out, result, "overlay join")

    run_session(ctx, body)


@domain_app.command("leave")
def domain_leave(
    ctx: typer.Context,
    domain_id: Annotated[str, typer.Argument(metavar="DOMAIN")],
    overlay_id: Annotated[str, typer.Argument(metavar="OVERLAY")],
) -> None:
    """Remove a domain's local overlay network (its segments leave the overlay)."""

    async def body(s: Session) -> None:
        show_write(s.out, await delete_record(s, KINDS["local_overlay"], overlay_id, domain_id), "overlay join")

    run_session(ctx, body)


# --- whole network map ---------------------------------------------------------------------------


def read_network_map(path: Path) -> NetworkMap:
    """Load and validate a network map file (format from the extension, else sniffed)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        fmt = detect_format(path) if path.suffix else None
        return load_network_map(decode_map_text(raw), fmt)
    except ModelError as exc:
        raise local_error(exc, f"network map {path}") from exc


async def import_network_map(s: Session, nm: NetworkMap) -> NetMapImportResult:
    return await s.call("netmap_import", NetMapImport(map=nm), NetMapImportResult)


async def export_network_map(s: Session) -> NetMapView:
    return await s.call("netmap_export", Empty(), NetMapView)


def write_text(s: Session, text: str, out: Path | None) -> None:
    """Write an exported document to ``out`` or stdout."""
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    s.out.note(f"wrote {out}")


@netmap_app.command("import")
def netmap_import(
    ctx: typer.Context, file: Annotated[Path, typer.Argument(help="Network map (.yaml, .json or .xml).")]
) -> None:
    """Create or update every overlay and domain of a network map file."""

    async def body(s: Session) -> None:
        result = await import_network_map(s, read_network_map(file))
        if s.out.human:
            for w in result.written:
                show_write(s.out, w)
            if result.unchanged:
                s.out.success(f"unchanged: {', '.join(result.unchanged)}")
        else:
            s.out.document(result)

    run_session(ctx, body)


@netmap_app.command("export")
def netmap_export(
    ctx: typer.Context,
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="yaml, json or xml (default: --out's extension, else yaml).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Export the whole network map (secrets masked)."""
    chosen = export_format(fmt, out)

    async def body(s: Session) -> None:
        view = await export_network_map(s)
        write_text(s, dump_map(view.map, chosen), out)

    run_session(ctx, body)


@netmap_app.command("show")
def netmap_show(ctx: typer.Context) -> None:
    """Show the network map as tables (or -o json/yaml)."""

    async def body(s: Session) -> None:
        view = await export_network_map(s)
        if s.out.human:
            render_network_map(s.out, view.map)
        else:
            s.out.document(view)

    run_session(ctx, body)


def export_format(fmt: str | None, out: Path | None) -> MapFormat:
    """The map format from ``--format``, else ``--out``'s extension, else YAML."""
    if fmt is None:
        if out is not None and out.suffix:
            try:
                return detect_format(out)
            except ModelError:
                return "yaml"
        return "yaml"
    lowered = fmt.lower()
    if lowered not in ("yaml", "json", "xml"):
        raise typer.BadParameter(f"{fmt!r} is not one of yaml, json, xml", param_hint="--format")
    return lowered  # type: ignore[return-value]
