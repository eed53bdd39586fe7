"""deploy.keys / deploy/install.sh: the keys and files the shipped units need, made once, shared with the stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bus import signing
from bus.nats_config import env_var
from bus.permissions import Role
from deploy import keys
from manager import __main__ as manager_main
from manager.saga import worker
from manager.stack import Stack
from tests.deploy.units import UNITS_DIR, load_unit, read_env_file

REPO = Path(__file__).resolve().parents[2]
# Files the units name that the installation does not make: the tunnel client's are written for the
# migrated server it runs on (its key on first start).
NOT_INSTALLED = {"tunnel-client.yaml", "tunnel-client.key"}


def _init(tmp_path: Path, **site: object) -> Path:
    etc = tmp_path / "etc"
    keys.init(etc, keys.Site(var=tmp_path / "var", vna_id="vna-1", **site))  # type: ignore[arg-type]
    return etc


def _snapshot(etc: Path) -> dict[str, bytes]:
    return {str(p.relative_to(etc)): p.read_bytes() for p in sorted(etc.rglob("*")) if p.is_file()}


def test_init_makes_every_key_with_private_modes(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    kdir = etc / "keys"
    assert kdir.stat().st_mode & 0o777 == 0o700
    for name in keys.key_names():
        path = kdir / f"{name}.nk"
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_text().strip().startswith("SU")
    for name in keys.SIGNING_KEYS:
        pub = (kdir / f"{name}.pub").read_text().strip()
        assert pub == signing.public_key_of((kdir / f"{name}.nk").read_text().strip())
    env = read_env_file(etc / "nats.env")
    assert env == {env_var(r).name: signing.public_key_of((kdir / f"{r.value}.nk").read_text().strip()) for r in Role}
    assert read_env_file(etc / "vna.env")["SKYFERRY_VNA_ID"] == "vna-1"
    assert read_env_file(etc / "manager.env")["SKYFERRY_PROJECTION_URL"].endswith(
        str(tmp_path / "var" / "read-models.sqlite")
    )


def test_init_with_defaults_writes_the_shipped_nats_conf(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    keys.init(etc)
    assert (etc / "nats.conf").read_text() == (REPO / "deploy" / "nats" / "single.conf").read_text()


def test_rerun_never_overwrites_a_key_or_an_edited_file(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    (etc / "manager.env").write_text("SKYFERRY_NATS_URL=nats://edited:4222\n")
    before = _snapshot(etc)
    result = keys.init(etc, keys.Site(var=tmp_path / "other", vna_id="other"))
    assert result.keys_created == [] and result.files_written == []
    assert _snapshot(etc) == before
    # A key added later (an upgrade that brings a new role) is made; nats.env follows the seeds.
    (etc / "keys" / "saga.nk").unlink()
    (etc / "nats.env").write_text("stale\n")
    result = keys.init(etc)
    assert result.keys_created == ["saga"] and result.files_written == ["nats.env"]
    assert {k: v for k, v in _snapshot(etc).items() if k not in ("keys/saga.nk", "nats.env")} == {
        k: v for k, v in before.items() if k not in ("keys/saga.nk", "nats.env")
    }
    assert read_env_file(etc / "nats.env")["SF_SAGA_NKEY"] == signing.public_key_of(
        (etc / "keys" / "saga.nk").read_text().strip()
    )


def test_an_admin_seed_moved_off_the_host_is_not_made_anew(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    pub = (etc / "keys" / "admin.pub").read_text()
    (etc / "keys" / "admin.nk").unlink()
    result = keys.init(etc)
    assert result.keys_created == [] and not (etc / "keys" / "admin.nk").exists()
    assert (etc / "keys" / "admin.pub").read_text() == pub
    assert keys.load_keys(etc / "keys").public(keys.ADMIN) == pub.strip()


def test_a_stale_public_key_is_refused_not_replaced(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    (etc / "keys" / "admin.pub").write_text(signing.public_key_of(signing.generate_user_seed()) + "\n")
    with pytest.raises(keys.InstallError, match="does not match"):
        keys.init(etc)


def test_loose_seed_modes_are_tightened(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    (etc / "keys" / "cli.nk").chmod(0o644)
    keys.init(etc)
    assert (etc / "keys" / "cli.nk").stat().st_mode & 0o777 == 0o600


def test_install_script_without_system_is_the_module(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    run = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--etc", str(etc), "--var", str(tmp_path / "v"), "--no-system"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (etc / "keys").glob("*.nk")) == sorted(f"{n}.nk" for n in keys.key_names())
    again = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--etc", str(etc), "--no-system"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert again.returncode == 0, again.stderr
    assert '"keys_created": []' in again.stdout


def test_the_embedded_stack_makes_the_same_keys(tmp_path: Path) -> None:
    seeds = Stack(tmp_path / "home").ensure_keys()
    assert sorted(seeds) == sorted(keys.key_names())
    assert keys.load_keys(tmp_path / "home" / "keys").seeds == seeds


def _units() -> list[str]:
    return sorted(p.name for p in UNITS_DIR.glob("*.service"))


@pytest.mark.parametrize("unit", _units())
def test_every_file_a_unit_names_under_etc_is_installed(unit: str) -> None:
    text = (UNITS_DIR / unit).read_text()
    named = set(re.findall(r"/etc/skyferry/([\w./-]+)", text))
    made = {*(f"keys/{n}.nk" for n in keys.key_names()), *(f"keys/{n}.pub" for n in keys.SIGNING_KEYS)}
    made |= {"nats.env", "nats.conf", "manager.env", "saga.env", "vna.env"}
    assert named - made - NOT_INSTALLED == set()


def _module_args(argv: list[str], module: str) -> list[str]:
    i = argv.index("-m")
    assert argv[i + 1] == module
    return argv[i + 2 :]


def test_manager_and_coordinator_units_resolve_their_keys(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    replace = {"/etc/skyferry": str(etc), "/var/lib/skyferry": str(tmp_path / "var")}
    kdir = etc / "keys"

    unit = load_unit("skyferry-manager.service", replace)
    cfg = manager_main.config_from_args(manager_main.parse_args(_module_args(unit.argv(), "manager")))
    assert cfg.bus.nkey_seed_file == kdir / "manager.nk"
    assert cfg.admin_public_key == (kdir / "admin.pub").read_text().strip()
    assert cfg.saga_public_key == (kdir / "saga-coordinator.pub").read_text().strip()
    assert cfg.saga_seed is None  # the coordinator runs as its own unit
    assert cfg.projection_url and cfg.projection_url.endswith("read-models.sqlite")
    # SKYFERRY_MANAGER_OPTS=--coordinator hosts it in the manager instead.
    (etc / "manager.env").write_text((etc / "manager.env").read_text() + "SKYFERRY_MANAGER_OPTS=--coordinator\n")
    hosted = manager_main.config_from_args(manager_main.parse_args(_module_args(unit.argv(), "manager")))
    assert hosted.saga_seed == (kdir / "saga-coordinator.nk").read_text().strip()

    unit = load_unit("skyferry-saga.service", replace)
    wcfg = worker.config_from_args(worker.parse_args(_module_args(unit.argv(), "manager.saga.worker")))
    assert wcfg.bus.nkey_seed_file == kdir / "saga.nk"
    assert wcfg.identity.actor == keys.SAGA_SIGNER == cfg.saga_account
    assert wcfg.identity.seed == (kdir / "saga-coordinator.nk").read_text().strip()
    assert wcfg.authenticate
    assert re.fullmatch(r"[A-Za-z0-9_-]+", wcfg.instance)

    argv = load_unit("skyferry-vna-agent.service", replace).argv()
    assert argv[argv.index("--vna-id") + 1] == "vna-1"
    assert argv[argv.index("--nkey-file") + 1] == str(kdir / "agent.nk")
    assert argv[-1] == str(tmp_path / "var" / "vna")  # empty SKYFERRY_VNA_OPTS adds no word


def test_the_etc_option_finds_the_keys_without_flags(tmp_path: Path) -> None:
    etc = _init(tmp_path)
    cfg = manager_main.config_from_args(manager_main.parse_args(["--etc", str(etc)]))
    assert cfg.bus.nkey_seed_file == etc / "keys" / "manager.nk" and cfg.saga_public_key
    wcfg = worker.config_from_args(worker.parse_args(["--etc", str(etc)]))
    assert wcfg.bus.nkey_seed_file == etc / "keys" / "saga.nk" and wcfg.identity.seed
    with pytest.raises(manager_main.ManagerSetupError):
        manager_main.config_from_args(manager_main.parse_args(["--nkey-file", str(tmp_path / "missing.nk")]))
