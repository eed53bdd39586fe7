"""Users through the CLI: keys written locally, identities that work, refusals with the right code."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

from tests.manager.cli.conftest import Sf
from tests.manager.cli.helpers import as_json, failed, ok


def test_user_create_writes_key_and_can_act(sf: Sf, tmp_path: Path, stack_home: Path) -> None:
    name = f"ann-{uuid.uuid4().hex[:6]}"
    key = tmp_path / "ann.nk"
    created = as_json(
        sf("-o", "json", "user", "create", name, "-a", "network-read", "-g", "netops", "--key-out", str(key))
    )
    assert created["key_file"] == str(key) and created["public_key"].startswith("U")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("SU")

    me = as_json(sf("-o", "json", "--user", name, "--user-key", str(key), "whoami"))
    assert me == {"id": name, "display_name": "", "groups": ["netops"], "authorisations": ["network-read"]}
    # The public key is all the manager has: the seed never left this machine.
    record = as_json(sf("-o", "json", "user", "show", name))["record"]
    assert record["public_key"] == created["public_key"] and key.read_text().strip() not in str(record)

    # Default key place: <home>/keys/<name>.nk, found again by --user alone.
    other = f"bo-{uuid.uuid4().hex[:6]}"
    ok(sf("user", "create", other, "-a", "application-read"))
    assert (stack_home / "keys" / f"{other}.nk").is_file()
    assert as_json(sf("-o", "json", "--user", other, "whoami"))["id"] == other
    failed(sf("user", "create", other), 2, "bad_request")  # key file exists: never overwritten
    again = tmp_path / "again.nk"
    failed(sf("user", "create", other, "--key-out", str(again)), 4, "already_exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.nk"]  # the refused seed was not kept

    ok(sf("user", "update", other, "-a", "application-read", "-a", "network-read", "--display-name", "Bo"))
    assert as_json(sf("-o", "json", "user", "show", other))["record"]["display_name"] == "Bo"


def test_forbidden_action_exits_with_auth_code(sf: Sf, tmp_path: Path) -> None:
    name = f"ro-{uuid.uuid4().hex[:6]}"
    key = tmp_path / "ro.nk"
    ok(sf("user", "create", name, "-a", "network-read", "--key-out", str(key)))
    me = ["--user", name, "--user-key", str(key)]
    ok(sf(*me, "overlay", "list"))
    result = sf(*me, "overlay", "create", "--id", f"x-{name}", "--name", "x")
    line = failed(result, 3, "forbidden")
    assert result.stderr.strip() == line  # exactly one line
    assert "network-write" in line
    failed(sf(*me, "user", "list"), 3, "forbidden")

    ok(sf("user", "disable", name))
    failed(sf(*me, "overlay", "list"), 3, "forbidden")
    ok(sf("user", "enable", name))
    ok(sf(*me, "overlay", "list"))


def test_unknown_or_unkeyed_user_is_unauthenticated(sf: Sf, tmp_path: Path) -> None:
    failed(sf("--user", "nobody-here", "whoami"), 3, "unauthenticated")
    missing = tmp_path / "none.nk"
    failed(sf("--user", "admin", "--user-key", str(missing), "overlay", "list"), 2, "bad_request")
    failed(sf("user", "create", "cli"), 2, "bad_request")  # would replace the stack's own NATS key
