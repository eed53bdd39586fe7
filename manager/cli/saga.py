"""``skyferry saga``: list, inspect and steer sagas run by the ``saga`` service.

Requests are plain dicts and replies are shown generically, so the CLI keeps
working while the saga service's views grow new fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from manager.cli.context import Session, run_session
from manager.cli.crud import read_data
from manager.cli.output import Column

SERVICE = "saga"

saga_app = typer.Typer(help="Sagas: migrations and other multi-step jobs with compensation.", no_args_is_help=True)

SAGA_COLUMNS = (
    Column("Id", "saga_id"),
    Column("Name", "name"),
    Column("Status", "status"),
    Column("Done", "steps_succeeded"),
    Column("Steps", "steps_total"),
    Column("Position", "position"),
    Column("Updated", "updated_at"),
)
STEP_COLUMNS = (
    Column("Step", "step_id"),
    Column("Status", "status"),
    Column("Attempts", "attempts"),
    Column("Group", "group"),
    Column("Depends on", "depends_on"),
    Column("Compensation", "compensation_status"),
    Column("Error", "error.message"),
)


def render_saga(s: Session, view: Any) -> None:
    """A saga view: its fields, then its steps."""
    if not s.out.human or not isinstance(view, dict):
        s.out.document(view)
        return
    fields = {k: v for k, v in view.items() if k != "steps" and v not in (None, [], "")}
    s.out.mapping(fields, title=f"Saga {view.get('saga_id', '')}")
    steps = view.get("steps")
    if isinstance(steps, list):
        s.out.table("Steps", STEP_COLUMNS, steps)


@saga_app.command("list")
def saga_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option("--status", help="Only sagas in this status.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 1000,
) -> None:
    """List sagas, oldest first."""
    payload: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}

    async def body(s: Session) -> None:
        reply = await s.raw(SERVICE, "list", payload)
        sagas = reply.get("sagas") if isinstance(reply, dict) else None
        if s.out.human and isinstance(sagas, list):
            s.out.table("Sagas", SAGA_COLUMNS, sagas)
        else:
            s.out.document(reply)

    run_session(ctx, body)


@saga_app.command("start")
def saga_start(
    ctx: typer.Context, file: Annotated[Path, typer.Argument(help="The saga plan as YAML or JSON.")]
) -> None:
    """Start a saga from a plan file (steps with actions, compensations, dependencies)."""

    async def body(s: Session) -> None:
        render_saga(s, await s.raw(SERVICE, "start", {"plan": read_data(file)}))

    run_session(ctx, body)


@saga_app.command("show")
def saga_show(ctx: typer.Context, saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga id.")]) -> None:
    """Show a saga and its steps, folded from its events."""

    async def body(s: Session) -> None:
        render_saga(s, await s.raw(SERVICE, "show", {"saga_id": saga_id}))

    run_session(ctx, body)


def _ref_command(verb: str, doc: str) -> None:
    def command(
        ctx: typer.Context,
        saga_id: Annotated[str, typer.Argument(metavar="ID", help="Saga id.")],
        reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the saga's events).")] = "",
    ) -> None:
        payload: dict[str, Any] = {"saga_id": saga_id, **({"reason": reason} if reason else {})}

        async def body(s: Session) -> None:
            render_saga(s, await s.raw(SERVICE, verb, payload))

        run_session(ctx, body)

    command.__doc__ = doc
    saga_app.command(verb, help=doc)(command)


_ref_command("pause", "Pause a saga: no new steps start; steps in flight finish.")
_ref_command("resume", "Resume a paused saga.")
_ref_command("cancel", "Cancel a saga: stop and run compensations in reverse.")
