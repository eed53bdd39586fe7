"""Run the manager against an existing NATS deployment: ``python -m manager --server URL ...``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from bus import signing
from bus.connection import BusConfig
from bus.logs import configure_logging
from manager.app import ManagerApp, ManagerConfig
from manager.gc_tuning import tune_gc


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m manager", description="Skyferry migration manager")
    ap.add_argument("--server", default="nats://127.0.0.1:4222", help="comma-separated NATS URLs")
    ap.add_argument("--nkey-file", type=Path, help="NATS connection seed (manager role)")
    ap.add_argument("--creds", type=Path, help="NATS .creds file")
    ap.add_argument("--admin-key-file", type=Path, help="seed or public key of the first administrator")
    ap.add_argument("--projection-url", default=None, help="read models, e.g. sqlite:///var/lib/skyferry/rm.db")
    ap.add_argument("--instance", default=None)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-json", action="store_true")
    return ap.parse_args()


async def _run(args: argparse.Namespace) -> None:
    admin_pub = None
    if args.admin_key_file:
        text = args.admin_key_file.read_text().strip()
        admin_pub = signing.public_key_of(text) if text.startswith("S") else text
    cfg = ManagerConfig(
        bus=BusConfig.from_url(args.server, name="manager", nkey_seed_file=args.nkey_file, creds_file=args.creds),
        admin_public_key=admin_pub,
        projection_url=args.projection_url,
    )
    if args.instance:
        cfg.instance = args.instance
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tune_gc()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with ManagerApp(cfg):
        await stop.wait()


def main() -> None:
    args = _args()
    configure_logging(args.log_level, json=args.log_json)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
