"""VnaAgentService: stopping it while it publishes, and a failed publish (no lab needed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from bus.connection import Bus
from bus.vna import Ack
from vna_agent.service import VnaAgentService


async def test_a_cancelled_publish_is_not_swallowed(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py turns a cancellation inside publish into an ordinary error; the loops must still stop."""
    started = asyncio.Event()

    async def publish_like_nats_py(*args: object, **kwargs: object) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("too many stalled messages") from None  # what nats.js does

    monkeypatch.setattr(bus.js, "publish", publish_like_nats_py)
    svc = SimpleNamespace(bus=bus)

    async def loop() -> None:
        while True:  # like _watch_conflicts: publish, go on
            await VnaAgentService._js_publish(svc, "sf.alert.x.y", Ack())  # type: ignore[arg-type]

    task = asyncio.create_task(loop())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)  # before the fix the loop ran on
    assert task in done and task.cancelled()


async def test_an_ordinary_publish_error_is_logged_not_raised(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bus outage")

    monkeypatch.setattr(bus.js, "publish", failing)
    with capture_logs() as logs:
        await VnaAgentService._js_publish(SimpleNamespace(bus=bus), "sf.alert.x.y", Ack())  # type: ignore[arg-type]
    failed = [e for e in logs if e["event"] == "publish_failed"]
    assert len(failed) == 1, logs
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["subject"] == "sf.alert.x.y"
    assert "bus outage" in failed[0]["error"]
