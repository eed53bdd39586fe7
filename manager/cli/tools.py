"""``skyferry schema`` and ``skyferry sign``: for downstream systems and the plain ``nats`` CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
import yaml

from bus import signing
from bus.envelope import Envelope
from bus.messages import Empty, SchemaDocument
from bus.subjects import ContentType
from manager.cli.context import Session, Settings, run, run_session
from manager.cli.errors import CliError
from manager.cli.output import OutputFormat

RAW_SCHEMA = "skyferry.v1.raw"


def schema(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the AsyncAPI document of every command and event (JSON; YAML with -o yaml)."""

    async def body(s: Session) -> None:
        doc = (await s.call("schema", Empty(), SchemaDocument)).document
        if s.settings.output is OutputFormat.YAML:
            text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text)
            s.out.note(f"wrote {out}")

    run_session(ctx, body)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def sign(
    ctx: typer.Context,
    subject: Annotated[str, typer.Argument(help="Subject the command goes to, e.g. sf.cmd.manager.whoami.")],
    data: Annotated[str, typer.Option("--json", help="The exact JSON body you will send.")] = "{}",
    schema_name: Annotated[str, typer.Option("--schema", help="Sf-Schema header value.")] = RAW_SCHEMA,
    full: Annotated[bool, typer.Option("--command", help="Print a whole `nats req` command line.")] = False,
) -> None:
    """Print signed headers as -H 'K:V' arguments for `nats req` (valid once, for 2 minutes)."""

    async def body(settings: Settings) -> None:
        try:
            json.loads(data)
        except ValueError as exc:
            raise CliError(f"--json is not valid JSON: {exc}") from exc
        ident = settings.require_identity()
        assert ident.seed is not None
        env = Envelope(actor=ident.actor, schema_name=schema_name, content_type=ContentType.JSON)
        # The signature covers the body's bytes exactly as given: send them unchanged.
        env = signing.sign(ident.seed, subject, env, data.encode())
        args = " ".join(f"-H {_quote(f'{k}:{v}')}" for k, v in env.to_headers().items())
        if full:
            conn = f"--server {shlex.quote(settings.server_url())}"
            nkey = settings.nkey_file()
            if nkey is not None:
                conn += f" --nkey {shlex.quote(str(nkey))}"
            args = f"nats req {conn} {shlex.quote(subject)} {_quote(data)} {args}"
        typer.echo(args)

    run(ctx, body)
