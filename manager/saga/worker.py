"""The coordinator process: ``python -m manager.saga.worker --server nats://... [--instance ID]``.

Connects, ensures the streams, starts the ``saga`` service, resumes unfinished
sagas and serves until SIGTERM/SIGINT. On a signal it stops answering commands,
cancels the runs (a compensation in flight completes first; a step in flight is
abandoned and re-run with the same idempotency key by whoever resumes the
saga), releases its leases so another coordinator can take over at once, and
drains the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from bus.client import Identity
from bus.connection import Bus, BusConfig, ensure_streams
from bus.logs import configure_logging
from manager.saga.coordinator import SagaCoordinator, default_instance_id
from manager.saga.leases import DEFAULT_LEASE_TTL_S
from manager.saga.service import SagaService
from manager.store.recorder import JetStreamRecorder

log = structlog.get_logger(__name__)


async def serve(server: str, instance: str, lease_ttl_s: float, actor: str, nkey_file: Path | None = None) -> None:
    """Run one coordinator until SIGTERM/SIGINT."""
    bus = await Bus.connect(BusConfig.from_url(server, name=f"saga-{instance}", nkey_seed_file=nkey_file))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await ensure_streams(bus)
        coordinator = SagaCoordinator(
            bus, JetStreamRecorder(bus), Identity(actor=actor), instance_id=instance, lease_ttl_s=lease_ttl_s
        )
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(coordinator.serve(), name="saga-coordinator")
            async with SagaService(bus, coordinator):
                log.info("saga_worker_ready", instance=instance, server=server)
                await stop.wait()
                log.info("saga_worker_stopping", instance=instance, running=coordinator.running)
            # No more commands; now cancel the runs (leases are released as they unwind).
            serving.cancel()
    finally:
        await bus.close()
        log.info("saga_worker_stopped", instance=instance)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m manager.saga.worker", description="Skyferry saga coordinator.")
    parser.add_argument("--server", required=True, help="NATS URL(s), comma-separated")
    parser.add_argument(
        "--instance",
        default=None,
        help="coordinator instance id (unique among live coordinators; a restart with the same id "
        "takes its sagas back at once instead of waiting for the leases to expire)",
    )
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL_S, help="saga lease TTL in seconds")
    parser.add_argument("--actor", default="saga-coordinator", help="actor id recorded in events")
    parser.add_argument("--nkey-file", type=Path, default=None, help="NATS connection seed (manager role)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--json-logs", action="store_true", help="JSON log lines instead of key=value")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=args.json_logs)
    try:
        asyncio.run(
            serve(args.server, args.instance or default_instance_id(), args.lease_ttl, args.actor, args.nkey_file)
        )
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
