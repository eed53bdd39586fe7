"""The VNA agent daemon: ``python -m vna_agent --vna-id vna1 --server nats://... [--netns NS]``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from bus.connection import Bus, BusConfig
from bus.logs import configure_logging
from vna_agent.agent import VnaAgent
from vna_agent.service import VnaAgentService
from vna_agent.state import AgentStateError

log = structlog.get_logger("vna_agent")
#: Exit status when the state directory cannot be used (EX_CONFIG).
EXIT_STATE = 78


async def _run(args: argparse.Namespace) -> None:
    agent = VnaAgent(args.vna_id, args.state_dir, netns=args.netns)  # reads state.json first
    bus = await Bus.connect(BusConfig.from_url(args.server, name=f"vna-{args.vna_id}", nkey_seed_file=args.nkey_file))
    agent.start()
    await agent.restore()  # before the first command: a re-run then finds its spec in place
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with VnaAgentService(bus, agent, flow_interval_s=args.flow_interval):
            await stop.wait()
    finally:
        await agent.close()
        await bus.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vna_agent", description="Skyferry VNA agent")
    ap.add_argument("--vna-id", required=True)
    ap.add_argument("--server", default="nats://127.0.0.1:4222")
    ap.add_argument("--nkey-file", type=Path, default=None, help="NATS connection seed (agent role)")
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/skyferry/vna"))
    ap.add_argument("--netns", default=None, help="run the data plane in this network namespace (lab)")
    ap.add_argument("--flow-interval", type=float, default=5.0)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    configure_logging(args.log_level)
    try:
        asyncio.run(_run(args))
    except AgentStateError as exc:
        log.error("agent_start_failed", vna=args.vna_id, state_dir=str(args.state_dir), error=exc.message)
        sys.exit(EXIT_STATE)


if __name__ == "__main__":
    main()
