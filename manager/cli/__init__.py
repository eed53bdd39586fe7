"""``skyferry``: the command-line interface, a thin wrapper over the NATS bus.

Every command (except ``up``, ``demo`` and ``sign``) opens one connection,
sends signed requests to the participants' ``sf.cmd.<service>.<verb>``
endpoints and prints the replies; nothing is read or written behind the bus's
back. Exit codes are listed in :mod:`manager.cli.errors`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from manager.cli.app import app_app
from manager.cli.context import Settings, default_home
from manager.cli.events import events_app
from manager.cli.output import OutputFormat
from manager.cli.records import domain_app, netmap_app, overlay_app
from manager.cli.saga import saga_app
from manager.cli.stack import demo, up
from manager.cli.status import status
from manager.cli.tools import schema, sign
from manager.cli.users import user_app, whoami

__all__ = ["app", "main"]

app = typer.Typer(
    name="skyferry",
    help="Skyferry: move multi-server applications across a hybrid cloud, over a NATS bus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Stderr:
    """Writes to whatever ``sys.stderr`` is now (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(verbose: bool) -> None:
    """structlog and stdlib logging to stderr: WARNING, or DEBUG with ``--verbose``; stdout stays clean."""
    level = logging.DEBUG if verbose else logging.WARNING
    stream: Any = _Stderr()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.getLogger("nats").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


@app.callback()
def root(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            "-s",
            envvar="SKYFERRY_NATS_URL",
            help="NATS URL(s), comma-separated (default: from stack.json).",
        ),
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", envvar="SKYFERRY_HOME", help="State directory of the local stack.")
    ] = None,
    nkey: Annotated[
        Path | None,
        typer.Option("--nkey", envvar="SKYFERRY_NATS_NKEY", help="NATS connection seed file (default: keys/cli.nk)."),
    ] = None,
    creds: Annotated[
        Path | None, typer.Option("--creds", envvar="SKYFERRY_NATS_CREDS", help="NATS .creds file (JWT + seed).")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", "-u", envvar="SKYFERRY_USER", help="Act as this user (default: admin).")
    ] = None,
    user_key: Annotated[
        Path | None,
        typer.Option("--user-key", envvar="SKYFERRY_USER_KEY", help="The user's signing seed (default: keys/USER.nk)."),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", envvar="SKYFERRY_OUTPUT", help="table, json or yaml.")
    ] = OutputFormat.TABLE,
    timeout: Annotated[
        float, typer.Option("--timeout", envvar="SKYFERRY_TIMEOUT", min=0.1, help="Seconds to wait for a reply.")
    ] = 5.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log to stderr at debug level.")] = False,
) -> None:
    """Global options; every one can also come from the environment."""
    configure_logging(verbose)
    ctx.obj = Settings(
        home=home or default_home(),
        server=server,
        nkey=nkey,
        creds=creds,
        user=user,
        user_key=user_key,
        output=output,
        timeout=timeout,
        verbose=verbose,
        home_explicit=_from_command_line(ctx, "home"),
    )


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


app.add_typer(overlay_app, name="overlay")
app.add_typer(domain_app, name="domain")
app.add_typer(netmap_app, name="netmap")
app.add_typer(app_app, name="app")
app.add_typer(user_app, name="user")
app.add_typer(events_app, name="events")
app.add_typer(saga_app, name="saga")
app.command("whoami")(whoami)
app.command("status")(status)
app.command("schema")(schema)
app.command("sign")(sign)
app.command("up")(up)
app.command("demo")(demo)


def main() -> None:
    """Console-script entry point."""
    app()
