"""CLI pieces that need no server: --set parsing, settings resolution, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus import signing
from bus.errors import (
    AlreadyExists,
    BusTimeout,
    BusUnavailable,
    Forbidden,
    InternalError,
    InvalidState,
    NoResponders,
    NotFound,
    Unauthenticated,
    ValidationFailed,
)
from bus.kinds import KINDS
from bus.models import OverlayNetwork
from manager.cli.context import DEFAULT_URL, Settings
from manager.cli.crud import build_record, parse_set
from manager.cli.errors import CliError, ExitCode, exit_code_of
from manager.cli.records import export_format
from manager.stack import StackInfo


def test_parse_set_values_are_json_when_they_parse() -> None:
    assert parse_set("a.b=10") == (["a", "b"], 10, "10")
    assert parse_set("flag=true")[1] is True
    assert parse_set("vlans=[1,2]")[1] == [1, 2]
    assert parse_set("mac=52:54:00:00:01:0a")[1] == "52:54:00:00:01:0a"
    assert parse_set("x=")[1] == ""
    with pytest.raises(CliError):
        parse_set("novalue")


def test_build_record_layers_file_fields_and_sets(tmp_path: Path) -> None:
    f = tmp_path / "ov.yaml"
    f.write_text("id: ov1\nname: One\nvni: 5\n")
    rec = build_record(KINDS["overlay"], file=f, fields={"name": None}, sets=["description=d", "name=42"])
    assert rec == OverlayNetwork(id="ov1", name="42", vni=5, description="d")
    node = build_record(
        KINDS["node"],
        {
            "id": "n",
            "name": "n",
            "server_id": "s",
            "interfaces": [{"name": "eth0", "application_network": "l", "mask": "24", "address": "10.0.0.5"}],
        },
        sets=["interfaces.0.address=10.0.0.6"],
    )
    assert str(node.interfaces[0].address) == "10.0.0.6"  # type: ignore[attr-defined]
    with pytest.raises(CliError) as err:
        build_record(KINDS["overlay"], fields={"id": "x"}, sets=["vni=0"])
    assert err.value.details["errors"][0]["loc"] in ("name", "vni")
    with pytest.raises(CliError):
        build_record(KINDS["overlay"], fields={"id": "x", "name": "x"}, sets=["interfaces.9.x=1"])


def test_exit_codes_by_family() -> None:
    cases = {
        ValidationFailed("x"): ExitCode.USAGE,
        CliError("x"): ExitCode.USAGE,
        Unauthenticated("x"): ExitCode.AUTH,
        Forbidden("x"): ExitCode.AUTH,
        NotFound("x"): ExitCode.STATE,
        AlreadyExists("x"): ExitCode.STATE,
        InvalidState("x"): ExitCode.STATE,
        BusUnavailable("x"): ExitCode.UNAVAILABLE,
        BusTimeout("x"): ExitCode.UNAVAILABLE,
        NoResponders("x"): ExitCode.UNAVAILABLE,
        InternalError("x"): ExitCode.INTERNAL,
    }
    assert {type(e).__name__: exit_code_of(e) for e in cases} == {type(e).__name__: c for e, c in cases.items()}


def test_settings_follow_the_state_directory(tmp_path: Path) -> None:
    bare = Settings(home=tmp_path / "nothing")
    assert bare.server_url() == DEFAULT_URL and bare.actor() is None and bare.nkey_file() is None

    home = tmp_path / "home"
    keys = home / "keys"
    keys.mkdir(parents=True)
    StackInfo(url="nats://127.0.0.1:1234", monitor_port=1, keys_dir=str(keys)).save(home)
    (keys / "cli.nk").write_text(signing.generate_user_seed())
    (keys / "admin.nk").write_text(signing.generate_user_seed())
    s = Settings(home=home)
    assert s.server_url() == "nats://127.0.0.1:1234"
    assert s.nkey_file() == keys / "cli.nk"
    ident = s.identity()
    assert ident is not None and ident.actor == "admin" and ident.seed == (keys / "admin.nk").read_text().strip()
    config = Settings(home=home, server="nats://a:1, nats://b:2").bus_config()
    assert config.servers == ["nats://a:1", "nats://b:2"] and config.max_reconnect_attempts == 2
    assert Settings(home=home, creds=keys / "cli.nk").nkey_file() is None  # creds carry their own seed
    with pytest.raises(CliError):
        Settings(home=home, user="admin", user_key=tmp_path / "missing.nk").identity()


def test_export_format() -> None:
    assert export_format(None, None) == "yaml"
    assert export_format(None, Path("x.xml")) == "xml"
    assert export_format("JSON", Path("x.xml")) == "json"


def test_json_errors_carry_details(capsys: pytest.CaptureFixture[str]) -> None:
    from manager.cli.output import Output, OutputFormat

    Output(OutputFormat.JSON).error(NotFound("gone", details={"id": "x"}))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error[not_found]: gone"
    assert json.loads(err[1]) == {"error": {"code": "not_found", "message": "gone", "details": {"id": "x"}}}
