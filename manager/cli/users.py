"""``skyferry user`` and ``skyferry whoami``: accounts, their signing keys and authorisations."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from bus import signing
from bus.kinds import KINDS
from bus.messages import Empty, WhoAmI
from bus.models import Authorisation, UserAccount
from bus.permissions import Role
from manager.cli.context import Session, run_session
from manager.cli.crud import KindCli, add_record_commands, create_record, modify_record, show_write
from manager.cli.errors import CliError
from manager.cli.views import USER_COLUMNS
from manager.stack import ADMIN_ID, SAGA_ACCOUNT

user_app = typer.Typer(help="User accounts: signing keys, groups, authorisations.", no_args_is_help=True)
add_record_commands(
    user_app, KindCli("user", "user", USER_COLUMNS, verbs={"list": "list", "show": "get", "delete": "delete"})
)

#: Key files a new user's seed must never replace by default: the stack's own seeds.
RESERVED_KEY_NAMES = frozenset({*(r.value for r in Role), ADMIN_ID, SAGA_ACCOUNT})

AuthOpt = Annotated[
    list[Authorisation] | None,
    typer.Option("--authorisation", "--authorization", "-a", help="Authorisation (repeat); replaces the set."),
]
GroupOpt = Annotated[list[str] | None, typer.Option("--group", "-g", help="Group (repeat); replaces the list.")]


def write_secret(path: Path, text: str) -> None:
    """Write a secret with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def key_path_for(keys_dir: Path, name: str, key_out: Path | None, force: bool) -> Path:
    """Where a new user's seed goes; refuses to overwrite a key unless forced."""
    if key_out is None:
        if name in RESERVED_KEY_NAMES:
            raise CliError(f"{keys_dir / (name + '.nk')} is a stack key; choose another place with --key-out")
        key_out = keys_dir / f"{name}.nk"
    if key_out.exists() and not force:
        raise CliError(f"{key_out} already exists (use --force to overwrite, or --key-out)")
    return key_out


@user_app.command("create")
def user_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="User id.")],
    authorisation: AuthOpt = None,
    group: GroupOpt = None,
    display_name: Annotated[str, typer.Option("--display-name", help="Human-readable name.")] = "",
    key_out: Annotated[
        Path | None, typer.Option("--key-out", help="Where to write the new seed (default: <home>/keys/NAME.nk).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file.")] = False,
) -> None:
    """Create a user with a fresh nkey: the seed is written 0600 locally, only the public key is sent."""

    async def body(s: Session) -> None:
        target = key_path_for(s.settings.keys_dir, name, key_out, force)
        seed = signing.generate_user_seed()
        user = UserAccount(
            id=name,
            display_name=display_name,
            public_key=signing.public_key_of(seed),
            groups=group or [],
            authorisations=set(authorisation or []),
        )
        # The seed lands next to its final place first and is moved there only once the user exists,
        # so a refused create never clobbers an existing key file.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        write_secret(tmp, seed)
        try:
            result = await create_record(s, KINDS["user"], user)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, target)
        if s.out.human:
            show_write(s.out, result, "user")
            s.out.success(f"signing key written to {target} (mode 0600)")
            s.out.note(f"act as this user: skyferry --user {name} --user-key {target} whoami")
        else:
            s.out.document({"result": result, "key_file": str(target), "public_key": user.public_key})

    run_session(ctx, body)


@user_app.command("update")
def user_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    authorisation: AuthOpt = None,
    group: GroupOpt = None,
    display_name: Annotated[str | None, typer.Option("--display-name", help="Human-readable name.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Field value: key=value, JSON values.")] = None,
) -> None:
    """Change a user's authorisations, groups or name (read, change, write at the version read)."""

    def change(record: dict[str, Any]) -> None:
        if authorisation is not None:
            record["authorisations"] = [a.value for a in authorisation]
        if group is not None:
            record["groups"] = group
        if display_name is not None:
            record["display_name"] = display_name

    async def body(s: Session) -> None:
        show_write(s.out, await modify_record(s, KINDS["user"], name, sets=sets, change=change), "user")

    run_session(ctx, body)


def _set_disabled(ctx: typer.Context, name: str, disabled: bool) -> None:
    def change(record: dict[str, Any]) -> None:
        record["disabled"] = disabled

    async def body(s: Session) -> None:
        show_write(s.out, await modify_record(s, KINDS["user"], name, change=change), "user")

    run_session(ctx, body)


@user_app.command("disable")
def user_disable(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Disable a user: every further command of theirs is refused."""
    _set_disabled(ctx, name, True)


@user_app.command("enable")
def user_enable(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Enable a disabled user again."""
    _set_disabled(ctx, name, False)


def whoami(ctx: typer.Context) -> None:
    """Show the user the manager authenticates you as."""

    async def body(s: Session) -> None:
        s.settings.require_identity()
        me = await s.call("whoami", Empty(), WhoAmI)
        s.out.document(me)

    run_session(ctx, body)
