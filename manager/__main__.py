"""Run the manager against an existing NATS deployment: ``python -m manager --server URL ...``.

Keys default to the files ``deploy/install.sh`` (``python -m deploy.keys init``) makes under the config
directory (``--etc``, else ``$SKYFERRY_ETC``, else ``/etc/skyferry``), each used only if it exists:
``keys/manager.nk`` (NATS), ``keys/admin.pub`` (first administrator), ``keys/saga-coordinator.pub``
(the separate coordinator's service account). ``--coordinator`` hosts a saga coordinator in this
process, signing with ``keys/saga-coordinator.nk``, like ``skyferry up`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from bus import signing
from bus.connection import BusConfig
from bus.logs import configure_logging
from bus.permissions import Role
from deploy import keys as install_keys
from manager.app import ManagerApp, ManagerConfig
from manager.gc_tuning import tune_gc

log = structlog.get_logger(__name__)


class ManagerSetupError(install_keys.InstallError):
    """A key file the manager was pointed at is missing or unreadable."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(prog="python -m manager", description="Skyferry migration manager")
    install_keys.add_etc_and_server_args(ap)
    ap.add_argument("--nkey-file", type=Path, help="NATS connection seed (default <etc>/keys/manager.nk)")
    ap.add_argument("--creds", type=Path, help="NATS .creds file")
    ap.add_argument(
        "--admin-key-file", type=Path, help="seed or public key of the first admin (default <etc>/keys/admin.pub)"
    )
    ap.add_argument(
        "--saga-account-key-file",
        type=Path,
        help="seed or public key of the saga coordinator's service account (default <etc>/keys/saga-coordinator.pub)",
    )
    ap.add_argument("--saga-account", default=install_keys.SAGA_SIGNER, help="id of that service account")
    ap.add_argument("--coordinator", action="store_true", help="host a saga coordinator and the saga service here")
    ap.add_argument(
        "--saga-key-file",
        type=Path,
        help="with --coordinator: the coordinator's signing seed (default <etc>/keys/saga-coordinator.nk)",
    )
    ap.add_argument(
        "--projection-url",
        default=os.environ.get("SKYFERRY_PROJECTION_URL"),
        help="read models, e.g. sqlite:///var/lib/skyferry/rm.db ($SKYFERRY_PROJECTION_URL)",
    )
    ap.add_argument("--instance", default=None)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-json", action="store_true")
    return ap.parse_args(argv)


def _key_file(explicit: Path | None, default: Path) -> Path | None:
    """``explicit`` (which must exist), else ``default`` if it exists, else None."""
    if explicit is not None:
        if not explicit.is_file():
            raise ManagerSetupError(f"key file {explicit} does not exist", details={"path": str(explicit)})
        return explicit
    return default if default.is_file() else None


def _public_key(path: Path | None) -> str | None:
    """The public key in ``path`` (a public key, or a seed whose public key is taken)."""
    if path is None:
        return None
    text = path.read_text().strip()
    try:
        return signing.public_key_of(text) if text.startswith("S") else text
    except Exception as exc:  # nkeys raises its own types for a malformed seed
        raise ManagerSetupError(f"{path} holds no valid nkey: {exc!r}", details={"path": str(path)}) from exc


def config_from_args(args: argparse.Namespace) -> ManagerConfig:
    """The manager's configuration from the command line and the config directory.

    Raises:
        ManagerSetupError: a key file given explicitly (or needed by ``--coordinator``) is missing.
    """
    keys = install_keys.etc_dir(args.etc) / "keys"
    nkey = _key_file(args.nkey_file, install_keys.seed_path(keys, Role.MANAGER.value)) if not args.creds else None
    saga_seed = None
    if args.coordinator:
        seed_file = _key_file(args.saga_key_file, install_keys.seed_path(keys, install_keys.SAGA_SIGNER))
        if seed_file is None:
            raise ManagerSetupError(
                f"--coordinator needs a signing seed: --saga-key-file or {keys}/saga-coordinator.nk"
            )
        saga_seed = seed_file.read_text().strip()
    cfg = ManagerConfig(
        bus=BusConfig.from_url(args.server, name="manager", nkey_seed_file=nkey, creds_file=args.creds),
        admin_public_key=_public_key(
            _key_file(args.admin_key_file, install_keys.public_path(keys, install_keys.ADMIN))
        ),
        projection_url=args.projection_url or None,
        saga_seed=saga_seed,
        saga_public_key=_public_key(
            _key_file(args.saga_account_key_file, install_keys.public_path(keys, install_keys.SAGA_SIGNER))
        ),
        saga_account=args.saga_account,
    )
    if args.instance:
        cfg.instance = args.instance
    return cfg


async def _run(cfg: ManagerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tune_gc()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ManagerApp(cfg):
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    try:
        cfg = config_from_args(args)
    except ManagerSetupError as exc:
        log.error("manager_setup_failed", error=exc.message, **exc.details)
        sys.exit(2)
    asyncio.run(_run(cfg))


if __name__ == "__main__":
    main()
