"""The whole embedded stack SIGKILLed again and again during a long saga: it always completes, each effect once.

``skyferry up`` (manager, saga coordinator, projections) and its nats-server are separate
processes; the test starts a saga of 300 sequential steps with ``skyferry saga start``, each
creating an overlay through ``sf.cmd.manager.overlay_create`` (its compensation deletes it),
then kills every process of the stack at random instants, at least 10 times, restarting
``skyferry up`` on the same home each time. A crash must never turn into a rollback: the run
ends ``completed``, and every overlay has exactly one event, its creation.

The kills are spread over the saga: a watcher follows the coordinator's progress messages
(``sf.progress.<saga>``, across the restarts) and each kill comes at a random step count
plus a random delay, so every one of them lands while the saga is running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.msg import Msg

from bus import codec, subjects
from bus.connection import Bus, BusConfig
from bus.messages import event_type
from manager.store import JetStreamRecorder
from tests.e2e.stack_proc import UpProcess, wait_for

STEPS = 300
KILLS = 10
RUNS = 5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _plan(saga_id: str) -> dict[str, Any]:
    steps = []
    for i in range(1, STEPS + 1):
        ov = f"{saga_id}-ov{i}"
        steps.append(
            {
                "step_id": f"s{i}",
                "action": {"subject": "sf.cmd.manager.overlay_create", "payload": {"record": {"id": ov, "name": ov}}},
                "compensation": {"subject": "sf.cmd.manager.overlay_delete", "payload": {"id": ov}},
                "depends_on": [f"s{i - 1}"] if i > 1 else [],
                "timeout_s": 5,
            }
        )
    return {"saga_id": saga_id, "name": f"{STEPS} overlays", "steps": steps}


def _saga(up: UpProcess, saga_id: str) -> dict[str, Any]:
    done = up.cli("-o", "json", "saga", "show", saga_id)
    assert done.returncode == 0, done.stderr
    view: dict[str, Any] = json.loads(done.stdout)
    return view


class ProgressWatcher:
    """Follows ``sf.progress.<saga>`` in a thread of its own, reconnecting across the stack's restarts."""

    def __init__(self, url: str, seed_file: Path, saga_id: str) -> None:
        self.url, self.seed_file, self.saga_id = url, seed_file, saga_id
        self.succeeded = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        bus = await Bus.connect(
            BusConfig(
                servers=[self.url], name="kill-loop-progress", nkey_seed_file=self.seed_file, reconnect_time_wait=0.05
            )
        )
        try:
            await bus.nc.subscribe(subjects.progress(self.saga_id), cb=self._on_progress)
            await self._stop.wait()
        finally:
            await bus.close()

    async def _on_progress(self, msg: Msg) -> None:
        self.succeeded = max(self.succeeded, int(codec.decode(msg.data).get("steps_succeeded") or 0))


async def _overlay_events(up: UpProcess) -> list[tuple[str, str]]:
    info = up.info
    bus = await Bus.connect(
        BusConfig(servers=[info["url"]], name="kill-loop-check", nkey_seed_file=Path(info["keys_dir"]) / "manager.nk")
    )
    try:
        return [(e.aggregate_id, e.event_type) async for e in JetStreamRecorder(bus).read_all(aggregate_type="overlay")]
    finally:
        await bus.close()


@pytest.mark.parametrize("run", range(RUNS))
def test_stack_killed_at_random_during_a_long_saga_completes_every_step_once(tmp_path: Path, run: int) -> None:
    rng = random.Random(run)
    saga_id = f"kill{run}"
    up = UpProcess(tmp_path / "home")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(_plan(saga_id)))
    info = up.start()
    # Kill points: random step counts over the saga, each plus a random delay (a step in flight, an
    # append, a reply on its way, a restart's replay...). The last fifth is left free: the watcher
    # may see a restart's first steps late, and the last kill must still find the saga running.
    kill_at = sorted(rng.sample(range(5, STEPS * 4 // 5), KILLS))
    try:
        with ProgressWatcher(info["url"], Path(info["keys_dir"]) / "cli.nk", saga_id) as progress:
            started = up.cli("-o", "json", "saga", "start", str(plan_file))
            assert started.returncode == 0, started.stderr
            for at_step in kill_at:
                wait_for(lambda n=at_step: progress.succeeded >= n, 120, f"step {at_step} to succeed")
                time.sleep(rng.uniform(0, 0.2))
                seen_at_kill = progress.succeeded
                up.sigkill_all()
                last_kill = dt.datetime.now(dt.UTC)
                up.start()
        # The operator, unsure the start got through the crashes, starts the same plan again.
        again = up.cli("-o", "json", "saga", "start", str(plan_file))
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["saga_id"] == saga_id
        view = wait_for(
            lambda: (v := _saga(up, saga_id))["status"] in ("completed", "compensated", "failed") and v,
            300,
            "the saga to finish",
            interval=0.5,
        )
        assert view["status"] == "completed", {k: v for k, v in view.items() if k != "steps"}
        assert [st["status"] for st in view["steps"]] == ["succeeded"] * STEPS
        # Every kill landed while the saga was still running.
        assert seen_at_kill < STEPS and dt.datetime.fromisoformat(view["updated_at"]) > last_kill
        events = asyncio.run(_overlay_events(up))
        per_overlay = Counter(agg for agg, _ in events)
        assert len(per_overlay) == STEPS
        assert set(per_overlay.values()) == {1}, [k for k, n in per_overlay.items() if n != 1]
        assert {t for _, t in events} == {event_type("overlay", "created")}
        assert up.stop() == 0
    finally:
        up.sigkill_all()
