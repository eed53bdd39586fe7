"""Keys and config files of an installation; ``skyferry up`` and ``deploy/install.sh`` both use this module.

::

    python -m deploy.keys init [--etc /etc/skyferry] [--var /var/lib/skyferry] [--nats-url URL] [--vna-id ID]
    python -m deploy.keys show [--etc /etc/skyferry]

What ``init`` makes under the config directory (``--etc``, else ``$SKYFERRY_ETC``, else ``/etc/skyferry``)::

    keys/<role>.nk                 NATS connection seed per role (manager, component, agent, cli, observer, saga)
    keys/admin.nk, admin.pub       the first administrator's signing seed and its public key
    keys/saga-coordinator.nk, .pub the saga coordinator's signing seed (its service account) and public key
    nats.env                       SF_<ROLE>_NKEY=<public key>: the variables deploy/nats/*.conf reference
    nats.conf                      deploy/nats/single.conf (listen address, monitor port, store dir settable)
    manager.env saga.env vna.env   what the systemd units read (URL, read-model URL, VNA id, extra options)

Re-running is safe: an existing key is never overwritten (seeds are published with a hard link, which
fails if the name exists), a signing seed moved off the host is not made anew while its ``.pub`` is
there, existing config files are kept (operators edit them), and only ``nats.env``, derived from the
seeds, is rewritten when it no longer matches them. Seeds are mode 0600 in a 0700
directory; nothing half-written is ever visible (temporary name, fsync, then link or rename).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bus import signing
from bus.errors import ErrorCode, SkyferryError
from bus.logs import configure_logging
from bus.nats_config import env_var, single_node_text
from bus.permissions import Role

log = structlog.get_logger(__name__)

DEFAULT_ETC = Path("/etc/skyferry")
DEFAULT_VAR = Path("/var/lib/skyferry")
ETC_ENV = "SKYFERRY_ETC"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

ADMIN = "admin"
"""Signing key (and user id) of the first administrator."""
SAGA_SIGNER = "saga-coordinator"
"""Signing key (and service-account id) of the saga coordinator: the manager checks its steps against it."""
SIGNING_KEYS = (ADMIN, SAGA_SIGNER)

SEED_MODE = 0o600
KEYS_DIR_MODE = 0o700


class InstallError(SkyferryError):
    """A key or config file of the installation cannot be made or read."""

    code = ErrorCode.INVALID_STATE


def add_etc_and_server_args(parser: argparse.ArgumentParser) -> None:
    """The ``--etc`` and ``--server`` options every daemon takes, with the install's defaults."""
    parser.add_argument(
        "--etc",
        type=Path,
        default=None,
        help=f"config directory with keys/ (${ETC_ENV}, else {DEFAULT_ETC})",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("SKYFERRY_NATS_URL", DEFAULT_NATS_URL),
        help="comma-separated NATS URLs ($SKYFERRY_NATS_URL)",
    )


def etc_dir(explicit: Path | None = None) -> Path:
    """The config directory: ``explicit``, else ``$SKYFERRY_ETC``, else ``/etc/skyferry``."""
    if explicit is not None:
        return explicit
    env = os.environ.get(ETC_ENV)
    return Path(env) if env else DEFAULT_ETC


def key_names() -> list[str]:
    """Every key file name (without ``.nk``): the NATS roles, then the signing keys."""
    return [*(r.value for r in Role), *SIGNING_KEYS]


def seed_path(keys_dir: Path, name: str) -> Path:
    return keys_dir / f"{name}.nk"


def public_path(keys_dir: Path, name: str) -> Path:
    return keys_dir / f"{name}.pub"


def _publish(path: Path, text: str, mode: int, *, replace: bool) -> bool:
    """Write ``text`` to a temporary file, fsync, then rename (``replace``) or hard-link it into place.

    Returns False when ``replace`` is false and ``path`` already exists (nothing written).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_seed(path: Path) -> str:
    try:
        seed = path.read_text().strip()
        signing.public_key_of(seed)
    except (OSError, ValueError, TypeError) as exc:
        raise InstallError(f"{path} is not a readable nkey seed: {exc}", details={"path": str(path)}) from exc
    except Exception as exc:  # nkeys raises its own error types for a malformed seed
        raise InstallError(f"{path} is not a valid nkey seed: {exc!r}", details={"path": str(path)}) from exc
    if path.stat().st_mode & 0o077:
        os.chmod(path, SEED_MODE)
        log.warning("seed_mode_tightened", path=str(path), mode=oct(SEED_MODE))
    return seed


@dataclass
class KeySet:
    """The keys of an installation by name: seeds, and public keys of signing seeds kept elsewhere."""

    seeds: dict[str, str]
    created: list[str] = field(default_factory=list)
    publics: dict[str, str] = field(default_factory=dict)
    """Signing keys whose seed is not on this host (e.g. the admin's, moved to the operator)."""

    def public(self, name: str) -> str:
        return signing.public_key_of(self.seeds[name]) if name in self.seeds else self.publics[name]

    def role_public_keys(self) -> dict[Role, str]:
        """Public nkey of each role's NATS user (what the server config lists)."""
        return {r: self.public(r.value) for r in Role}


def _read_public(path: Path) -> str:
    key = path.read_text().strip()
    if not re.fullmatch(r"U[A-Z2-7]{55}", key):
        raise InstallError(f"{path} is not a public user nkey", details={"path": str(path)})
    return key


def ensure_keys(keys_dir: Path) -> KeySet:
    """Create the missing seeds under ``keys_dir`` (and the signing keys' ``.pub``); never overwrite one.

    A signing key whose seed is gone but whose ``.pub`` is there was moved off the host on purpose
    (the admin's, to the operator): it is kept as the public key, not made anew.

    Raises:
        InstallError: an existing key is unreadable, or a ``.pub`` does not match its seed.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=KEYS_DIR_MODE)
    keys = KeySet({})
    for name in key_names():
        path = seed_path(keys_dir, name)
        if not path.exists():
            if name in SIGNING_KEYS and public_path(keys_dir, name).exists():
                keys.publics[name] = _read_public(public_path(keys_dir, name))
                continue
            if _publish(path, signing.generate_user_seed() + "\n", SEED_MODE, replace=False):
                keys.created.append(name)
                log.info("key_created", name=name, path=str(path))
        keys.seeds[name] = _read_seed(path)
    for name in SIGNING_KEYS:
        if name not in keys.seeds:
            continue
        pub = signing.public_key_of(keys.seeds[name])
        path = public_path(keys_dir, name)
        if not _publish(path, pub + "\n", 0o644, replace=False) and path.read_text().strip() != pub:
            raise InstallError(
                f"{path} does not match {seed_path(keys_dir, name)}; remove the stale .pub to have it rewritten",
                details={"path": str(path)},
            )
    return keys


def load_keys(keys_dir: Path) -> KeySet:
    """The keys under ``keys_dir``, creating nothing.

    Raises:
        InstallError: a key is missing or unreadable.
    """
    keys = KeySet({})
    missing = []
    for name in key_names():
        seed, pub = seed_path(keys_dir, name), public_path(keys_dir, name)
        if seed.exists():
            keys.seeds[name] = _read_seed(seed)
        elif name in SIGNING_KEYS and pub.exists():
            keys.publics[name] = _read_public(pub)
        else:
            missing.append(name)
    if missing:
        raise InstallError(f"missing keys under {keys_dir}: {', '.join(missing)}", details={"missing": missing})
    return keys


def nats_env_text(keys: KeySet) -> str:
    """``nats.env``: the public key of every role's NATS user, as the NATS configs reference them."""
    lines = [
        "# Generated by `python -m deploy.keys init` from keys/<role>.nk; read by skyferry-nats.service.",
        *(f"{env_var(role).name}={pub}" for role, pub in keys.role_public_keys().items()),
    ]
    return "\n".join(lines) + "\n"


def default_vna_id() -> str:
    """This host's name as a subject-safe VNA id."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "vna"


@dataclass
class Site:
    """Host-specific settings written into the env files and ``nats.conf`` on first install."""

    var: Path = DEFAULT_VAR
    nats_url: str = DEFAULT_NATS_URL
    vna_id: str = field(default_factory=default_vna_id)
    nats_host: str = "0.0.0.0"
    nats_port: int = 4222
    nats_http_port: int = 8222
    nats_store_dir: Path | None = None
    """Default: ``<var>/nats``."""

    def env_files(self) -> dict[str, str]:
        head = "# Written once by `python -m deploy.keys init`; edit freely, re-running keeps it.\n"
        rm = f"sqlite:///{self.var / 'read-models.sqlite'}"
        return {
            "manager.env": head + f"SKYFERRY_NATS_URL={self.nats_url}\nSKYFERRY_PROJECTION_URL={rm}\n",
            "saga.env": head + f"SKYFERRY_NATS_URL={self.nats_url}\n",
            "vna.env": head
            + f"SKYFERRY_VNA_ID={self.vna_id}\nSKYFERRY_NATS_URL={self.nats_url}\n"
            + "# Extra options of python -m vna_agent, split into words (e.g. --netns NS in the lab).\n"
            + "SKYFERRY_VNA_OPTS=\n",
        }

    def nats_conf(self) -> str:
        """``single.conf`` as shipped in deploy/nats, with this site's listen address, ports and store."""
        store = self.nats_store_dir or self.var / "nats"
        return single_node_text(
            host=self.nats_host, port=self.nats_port, monitor_port=self.nats_http_port, store_dir=str(store)
        )


@dataclass
class InitResult:
    """What :func:`init` created (everything else was there already)."""

    etc: Path
    keys_created: list[str]
    files_written: list[str]


def init(etc: Path, site: Site | None = None) -> InitResult:
    """Make the keys, ``nats.env``, ``nats.conf`` and the units' env files under ``etc`` (idempotent)."""
    site = site or Site()
    etc.mkdir(parents=True, exist_ok=True)
    keys = ensure_keys(etc / "keys")
    written: list[str] = []
    env = etc / "nats.env"
    text = nats_env_text(keys)
    if not env.exists() or env.read_text() != text:
        _publish(env, text, 0o644, replace=True)
        written.append(env.name)
    for name, body in {"nats.conf": site.nats_conf(), **site.env_files()}.items():
        if _publish(etc / name, body, 0o644, replace=False):
            written.append(name)
    log.info("install_keys_ready", etc=str(etc), keys_created=keys.created, files_written=written)
    return InitResult(etc, keys.created, written)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m deploy.keys", description="Skyferry installation keys and config")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create missing keys and config files (never overwrites a key)")
    p_show = sub.add_parser("show", help="print the public keys")
    for p in (p_init, p_show):
        p.add_argument("--etc", type=Path, default=None, help=f"config directory (${ETC_ENV}, else {DEFAULT_ETC})")
    p_init.add_argument("--var", type=Path, default=DEFAULT_VAR, help="state directory the env files point at")
    p_init.add_argument("--nats-url", default=DEFAULT_NATS_URL, help="how the daemons reach NATS")
    p_init.add_argument("--vna-id", default=None, help="this host's VNA id (default: the host name)")
    p_init.add_argument("--nats-listen", type=_hostport, default=("0.0.0.0", 4222), help="nats.conf listen HOST:PORT")
    p_init.add_argument("--nats-http-port", type=int, default=8222, help="nats.conf monitoring port")
    p_init.add_argument("--nats-store-dir", type=Path, default=None, help="JetStream store (default: <var>/nats)")
    args = ap.parse_args(argv)
    configure_logging("INFO")
    etc = etc_dir(args.etc)
    try:
        if args.cmd == "show":
            keys = load_keys(etc / "keys")
            print(json.dumps({name: keys.public(name) for name in key_names()}, indent=2))
            return 0
        host, port = args.nats_listen
        site = Site(
            var=args.var,
            nats_url=args.nats_url,
            vna_id=args.vna_id or default_vna_id(),
            nats_host=host,
            nats_port=port,
            nats_http_port=args.nats_http_port,
            nats_store_dir=args.nats_store_dir,
        )
        result = init(etc, site)
    except (InstallError, OSError) as exc:
        print(f"deploy.keys: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"etc": str(result.etc), "keys_created": result.keys_created, "files": result.files_written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
