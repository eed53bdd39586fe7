"""``skyferry up`` (the embedded stack in the foreground) and ``skyferry demo``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

import manager
from bus.errors import InvalidState
from bus.models import ApplicationState
from bus.server import DEFAULT_SYNC_INTERVAL
from manager.cli.app import export_app, import_app, read_application_map, set_state
from manager.cli.context import Settings, run, session
from manager.cli.errors import CliError
from manager.cli.events import EventPrinter, TailOptions, tail_events
from manager.cli.output import Output
from manager.cli.records import export_network_map, import_network_map, read_network_map
from manager.cli.views import render_app_map, render_network_map
from manager.gc_tuning import tune_gc
from manager.stack import ADMIN_ID, Stack

NETWORK_SAMPLE = "network-map.yaml"
APP_SAMPLE = "app-3tier.yaml"

#: running -> ... -> running, with one illegal move (off -> running) that the manager must refuse.
DEMO_STATES = [
    ApplicationState.SHUTTING_DOWN,
    ApplicationState.OFF,
    ApplicationState.RUNNING,
    ApplicationState.BOOTING,
    ApplicationState.FENCED,
    ApplicationState.RUNNING,
]

HomeOpt = Annotated[Path | None, typer.Option("--home", help="State directory (keys, stack.json, JetStream store).")]


def _print_up(out: Output, stack: Stack) -> None:
    assert stack.info is not None
    info = {
        "url": stack.info.url,
        "state_dir": str(stack.state_dir),
        "keys_dir": stack.info.keys_dir,
        "admin_key": str(stack.info.key_file(ADMIN_ID)),
        "monitor_port": stack.info.monitor_port,
        "pid": os.getpid(),
    }
    if out.human:
        out.mapping(info, title="Skyferry stack is up")
        out.out.print("Point the CLI at it:")
        out.out.print(f"  export SKYFERRY_HOME={stack.state_dir}", soft_wrap=True)
        out.out.print("  skyferry whoami        # acts as admin with keys/admin.nk", soft_wrap=True)
        out.out.print("Ctrl-C (or SIGTERM) stops it.")
    else:
        out.line(info)
    sys.stdout.flush()


def up(
    ctx: typer.Context,
    home: HomeOpt = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="NATS client port.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    sync_interval: Annotated[
        str,
        typer.Option(
            "--sync-interval",
            help="JetStream fsync policy: 'always' (an acknowledged event survives power loss) or a "
            "duration such as '2m' (faster; a power loss can lose that much acknowledged data).",
        ),
    ] = DEFAULT_SYNC_INTERVAL,
) -> None:
    """Run the embedded stack (nats-server + manager) in the foreground until Ctrl-C or SIGTERM."""

    async def body(settings: Settings) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stack = Stack(home or settings.home, host=host, port=port, sync_interval=sync_interval)
        try:
            await stack.start()
            tune_gc()
            _print_up(settings.out, stack)
            await stop.wait()
            settings.out.note("stopping...")
        finally:
            await stack.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        settings.out.note("stack stopped")

    run(ctx, body, interrupt_ok=True)


def samples_dir(given: Path | None = None) -> Path:
    """Where the sample maps are: ``--samples``, ``SKYFERRY_SAMPLES``, the source tree, or ./deploy/samples."""
    candidates = [given] if given else []
    if os.environ.get("SKYFERRY_SAMPLES"):
        candidates.append(Path(os.environ["SKYFERRY_SAMPLES"]))
    candidates += [Path(manager.__file__).resolve().parents[1] / "deploy" / "samples", Path("deploy") / "samples"]
    for path in candidates:
        if (path / NETWORK_SAMPLE).is_file() and (path / APP_SAMPLE).is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise CliError(f"sample maps {NETWORK_SAMPLE} and {APP_SAMPLE} not found (tried {tried}); pass --samples DIR")


@contextlib.contextmanager
def _state_dir(home: Path | None) -> Iterator[Path]:
    if home is not None:
        yield home
        return
    with tempfile.TemporaryDirectory(prefix="skyferry-demo-") as tmp:
        yield Path(tmp)


async def run_demo(settings: Settings, state_dir: Path, samples: Path) -> dict[str, Any]:
    """Start a stack in ``state_dir``, drive it through the bus, stop it; returns a summary."""
    out = settings.out
    netmap, appmap = read_network_map(samples / NETWORK_SAMPLE), read_application_map(samples / APP_SAMPLE)
    summary: dict[str, Any] = {"state_dir": str(state_dir), "states": [], "events": []}
    async with Stack(state_dir) as stack:
        assert stack.info is not None
        summary["url"] = stack.info.url
        out.note(f"stack up at {stack.info.url}, state in {state_dir}")
        demo = Settings(home=state_dir, output=settings.output, timeout=settings.timeout, verbose=settings.verbose)
        demo.out = out
        async with session(demo) as s:
            out.heading(f"1. Network map ({NETWORK_SAMPLE}) imported through the bus")
            await import_network_map(s, netmap)
            nm = (await export_network_map(s)).map
            summary["network_map"] = nm
            if out.human:
                render_network_map(out, nm)

            out.heading(f"2. Application map ({APP_SAMPLE}) imported through the bus")
            await import_app(s, appmap, replace=True)
            view = await export_app(s, appmap.application.id)
            summary["application_map"] = view.map
            if out.human:
                render_app_map(out, view.map, view.version)

            out.heading("3. Life cycle: legal moves are written, illegal ones refused")
            current = view.map.application.state
            for target in DEMO_STATES:
                try:
                    result = await set_state(s, appmap.application.id, target)
                except InvalidState as err:
                    out.refused(f"{current.value} -> {target.value} refused, as it should be: {err.message}")
                    summary["states"].append({"from": current, "to": target, "refused": err.message})
                    continue
                out.success(f"{current.value} -> {target.value} (position {result.version})")
                summary["states"].append({"from": current, "to": target, "position": result.version})
                current = target

            out.heading("4. Every event written, read back from the stream")
            printer = EventPrinter(out)

            def on_event(ev: dict[str, Any]) -> None:
                summary["events"].append(ev)
                if out.human:
                    printer(ev)

            await tail_events(s, TailOptions(from_start=True, follow=False), on_event)
    out.note("demo finished; stack stopped")
    return summary


def demo(
    ctx: typer.Context,
    home: HomeOpt = None,
    samples: Annotated[Path | None, typer.Option("--samples", help="Directory holding the sample maps.")] = None,
) -> None:
    """Start a throw-away stack, import the sample maps through the bus, show them, and stop."""

    async def body(settings: Settings) -> None:
        src = samples_dir(samples)
        chosen = home or (settings.home if settings.home_explicit else None)
        with _state_dir(chosen) as state_dir:
            summary = await run_demo(settings, state_dir, src)
        if not settings.out.human:
            settings.out.document(summary)

    run(ctx, body)
