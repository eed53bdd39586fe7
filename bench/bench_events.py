"""Benchmark of the event store and the SQL projections (issue 3; issue 8 part 5).

Figures, for each JetStream fsync policy (``--sync``: ``always``, the embedded
server's default, and nats-server's own ``2m``) and each database (SQLite and, if
reachable, PostgreSQL): appends per second with optimistic concurrency checks next
to raw JetStream publishes of the same payloads at the same concurrency (the
store's overhead as a ratio), the projection runner's catch-up rate, projection lag
(from each append's ack to the commit that makes its rows visible) at paced rates,
the highest rate the store sustains under ``always`` and the lag there, the time to
rebuild the projections from the stream, and signed commands per second through the
real manager. Targets: p99 lag < 100 ms at 5,000 appends/s, rebuild of 100k events
< 10 s.

Run (never two benchmarks at once; see ``bench/README.md``)::

    flock /tmp/skyferry-bench.lock python -m bench.bench_events --repeat 3 --out docs/benchmarks.md
    python -m bench.bench_events --events 5000 --repeat 1 --paced-seconds 5         # quick

Each repeat, fsync policy and database starts a fresh embedded nats-server on a
temporary store. The projection runner runs in its own process (as a projection
worker would), so it does not share the writers' event loop; the manager of the
command figure runs in its own process too.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import fcntl
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import asyncpg
from nats.js.api import StreamConfig

from bus import codec, signing
from bus.client import Identity, command
from bus.connection import Bus, BusConfig, ensure_streams
from bus.errors import ConcurrencyConflict, ErrorCode, SkyferryError
from bus.kinds import Aggregate
from bus.logs import configure_logging
from bus.messages import MESSAGES, WriteResult, event_type
from bus.models import OverlayNetwork
from bus.server import DEFAULT_SYNC_INTERVAL, EmbeddedNatsServer, ServerConfig, find_binary
from bus.subjects import EVENTS_STREAM
from manager.domain import apply_event
from manager.projections import Committed, ProjectionRunner, Projector, StreamReader
from manager.projections import tables as t
from manager.store import JetStreamRecorder, NewEvent
from manager.store.repository import fold

MARK_START = "<!-- bench_events:start -->"
MARK_END = "<!-- bench_events:end -->"
OUT_HEADER = (
    "# Skyferry benchmarks\n\n"
    "Each section below is written by one benchmark of `bench/` (see `bench/README.md`); "
    "re-running a benchmark replaces its own section only.\n"
)
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

TARGET_APPENDS_PER_S = 5_000.0
TARGET_LAG_P99_MS = 100.0
TARGET_LAG_RATE = 5_000
"""The paced rate the lag target is checked at."""
TARGET_REBUILD_S_PER_100K = 10.0
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECTS = "bench.raw.>"
#: A paced rate counts as sustained when the writers achieve this share of it.
SUSTAINED_SHARE = 0.97
#: The search for the highest sustained rate (``always``) offers this share of the max-rate
#: throughput first, then of what the writers achieved at the previous offer (at most 80 % of it).
SUSTAIN_START = 0.9
SUSTAIN_TRIES = 5

# Read-model tables compared between the live projection and the rebuilt one (the 100k-row
# audit table is compared by count only).
_COMPARED = tuple(tbl for tbl in t.READ_MODEL_TABLES if tbl is not t.events)


# --- configuration ------------------------------------------------------------------------------


@dataclass
class Config:
    """What to run; every field has a command-line flag."""

    events: int = 100_000
    """Events of the max-rate phase (and so of the rebuild) per run with a duration sync policy."""
    events_always: int = 20_000
    """The same with ``sync_interval: always`` (fsync-bound: a few thousand per second at most)."""
    repeat: int = 3
    aggregates: int = 2_000
    app_share: float = 0.25
    """Share of the aggregates that are applications (the rest are overlays)."""
    writers: int = 4
    inflight: int = 16
    """Appends in flight per writer, each on a different aggregate."""
    paced_rates: tuple[int, ...] = (1_000, 2_000, 5_000)
    paced_seconds: float = 20.0
    sync: tuple[str, ...] = (DEFAULT_SYNC_INTERVAL, "2m")
    """JetStream ``sync_interval`` policies, one run each (``always``: fsync before every ack)."""
    sustain: bool = True
    """With ``always``: look for the highest paced rate the store sustains (see :data:`SUSTAIN_STEPS`)."""
    backends: tuple[str, ...] = ("sqlite", "postgres")
    pg_url: str = DEFAULT_PG
    runner_batch: int | None = None
    """ProjectionRunner batch_size (None: the runner's default)."""
    runner_fetch_timeout: float | None = None
    gc_tune: bool = False
    """Tune the garbage collector of the projection runner process (see :data:`GC_THRESHOLD`)."""
    commands: int = 3_000
    """Signed overlay_update commands through the manager (0: skip)."""
    clients: int = 8
    sample: int = 20
    note: str = ""
    """Free text added to the report (e.g. what else ran on the machine)."""
    out: Path | None = None
    results_dir: Path | None = RESULTS_DIR
    catch_up_timeout: float = 600.0

    def events_for(self, sync: str) -> int:
        return self.events_always if sync == "always" else self.events


def parse_args(argv: Sequence[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m bench.bench_events", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=d.events, help="events of the max-rate phase (duration sync)")
    p.add_argument("--events-always", type=int, default=d.events_always, help="the same with sync always")
    p.add_argument("--repeat", type=int, default=d.repeat)
    p.add_argument("--aggregates", type=int, default=d.aggregates)
    p.add_argument("--app-share", type=float, default=d.app_share)
    p.add_argument("--writers", type=int, default=d.writers)
    p.add_argument("--inflight", type=int, default=d.inflight, help="appends in flight per writer")
    p.add_argument("--paced-rates", default=",".join(map(str, d.paced_rates)), help="comma-separated events/s")
    p.add_argument("--paced-seconds", type=float, default=d.paced_seconds)
    p.add_argument("--sync", default=",".join(d.sync), help="JetStream sync_interval policies: always,2m")
    p.add_argument("--no-sustain", action="store_true", help="skip the search for the highest sustained rate")
    p.add_argument("--backends", default=",".join(d.backends), help="sqlite,postgres")
    p.add_argument("--pg-url", default=d.pg_url)
    p.add_argument("--runner-batch", type=int, default=None)
    p.add_argument("--runner-fetch-timeout", type=float, default=None)
    p.add_argument(
        "--gc-tune", action="store_true", help="gc.freeze() and a higher gen-0 threshold in the runner process"
    )
    p.add_argument("--commands", type=int, default=d.commands, help="signed manager commands (0: skip)")
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--sample", type=int, default=d.sample, help="aggregates whose fold is checked")
    p.add_argument("--note", default="", help="free text added to the report (e.g. what else ran meanwhile)")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose bench_events section is replaced")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    return Config(
        events=a.events,
        events_always=a.events_always,
        repeat=a.repeat,
        aggregates=min(a.aggregates, a.events, a.events_always),
        app_share=a.app_share,
        writers=a.writers,
        inflight=a.inflight,
        paced_rates=tuple(int(r) for r in a.paced_rates.split(",") if r.strip()),
        paced_seconds=a.paced_seconds,
        sync=tuple(x.strip() for x in a.sync.split(",") if x.strip()),
        sustain=not a.no_sustain,
        backends=tuple(b.strip() for b in a.backends.split(",") if b.strip()),
        pg_url=a.pg_url,
        runner_batch=a.runner_batch,
        runner_fetch_timeout=a.runner_fetch_timeout,
        gc_tune=a.gc_tune,
        commands=a.commands,
        clients=a.clients,
        sample=a.sample,
        note=a.note,
        out=a.out,
        results_dir=a.results_dir,
    )


# --- statistics and machine facts ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted values; NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    return xs[max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))]


def dist_ms(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of durations in seconds, as milliseconds."""
    xs = sorted(values)
    if not xs:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}

    def at(q: float) -> float:
        return xs[max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))] * 1000

    return {"p50_ms": at(50), "p99_ms": at(99), "max_ms": xs[-1] * 1000}


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in %."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        nats_version = subprocess.run(
            [find_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, SkyferryError, subprocess.SubprocessError) as exc:
        nats_version = f"unknown ({exc})"
    versions: dict[str, str] = {}
    for pkg in ("nats-py", "sqlalchemy", "aiosqlite", "asyncpg", "pydantic"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "nats_server": nats_version,
        "platform": platform.platform(),
        "packages": versions,
    }


# --- the workload: aggregates shaped like the manager's ------------------------------------------


@dataclass
class Target:
    """One aggregate the benchmark writes: an overlay or an application."""

    kind: str
    """``overlay`` or ``app`` (the aggregate type of its subject)."""
    id: str
    index: int
    written: int = 0
    """Events appended so far (the next event's number)."""
    first: int = 0
    """Stream position of its first event."""
    last: int = 0
    """Stream position of its last event: the ``expected`` of its next append."""
    quota: int = 0
    """Events still to append in the current phase."""


_POLICIES = ("balanced", "min-latency", "max-throughput", "min-cost")
_ACL = [{"principal": "group:netops", "rights": ["read", "write"]}, {"principal": "*", "rights": ["read"]}]
_APP_NODES = 4


def make_targets(count: int, app_share: float) -> list[Target]:
    """``count`` aggregates, every ``1/app_share``-th an application, interleaved."""
    apps = round(count * app_share)
    every = count / apps if apps else math.inf
    out: list[Target] = []
    n_app = 0
    for i in range(count):
        if apps and n_app < apps and i >= n_app * every:
            out.append(Target("app", f"bench-app-{i:05d}", i))
            n_app += 1
        else:
            out.append(Target("overlay", f"bench-ov-{i:05d}", i))
    return out


def _overlay_record(tg: Target, k: int) -> dict[str, Any]:
    return {
        "id": tg.id,
        "name": f"Overlay {tg.index}",
        "description": f"Overlay {tg.index} between the data centers, revision {k}",
        "vni": 1000 + tg.index,
        "optimisation_policy": _POLICIES[k % len(_POLICIES)],
        "access_controls": _ACL,
    }


def _node_record(tg: Target, n: int, k: int) -> dict[str, Any]:
    return {
        "id": f"node{n}",
        "name": f"Node {n} of app {tg.index}",
        "server_id": f"srv{n}",
        "placement": "rd-cloud" if k % 2 else "rd-dc1",
        "deploy_priority": (10 * n + k) % 1000,
        "capture_priority": 100,
        "interfaces": [
            {
                "name": "eth0",
                "application_network": "lan",
                "address": f"10.{tg.index % 250}.{n}.10",
                "prefix_len": 16,
                "gateway": f"10.{tg.index % 250}.0.1",
                "mac": f"52:54:00:{tg.index % 256:02x}:{n:02x}:10",
            }
        ],
    }


def _app_map(tg: Target) -> dict[str, Any]:
    nodes = range(1, _APP_NODES + 1)
    return {
        "application": {
            "id": tg.id,
            "name": f"Application {tg.index}",
            "description": "Three-tier web shop",
            "state": "running",
            "access_controls": _ACL,
        },
        "networks": [
            {
                "id": "lan",
                "name": "Application LAN",
                "production_overlay_id": f"bench-ov-{tg.index:05d}",
                "subnet": f"10.{tg.index % 250}.0.0/16",
            }
        ],
        "servers": [{"id": f"srv{n}", "resource_domain": "rd-dc1", "size": "medium"} for n in nodes],
        "nodes": [_node_record(tg, n, 0) for n in nodes],
        "databases": [{"id": "orders", "node_id": f"node{_APP_NODES}", "migrate_mode": "sync"}],
    }


def event_for(tg: Target, k: int, tag: str) -> NewEvent:
    """Event number ``k`` of an aggregate (deterministic, so that its fold can be checked)."""
    msg_id = f"{tag}-{tg.id}-{k}"
    if tg.kind == "overlay":
        verb = "created" if k == 0 else "updated"
        return NewEvent(event_type("overlay", verb), {"record": _overlay_record(tg, k)}, actor="bench", msg_id=msg_id)
    if k == 0:
        return NewEvent(event_type("app", "imported"), {"map": _app_map(tg)}, actor="bench", msg_id=msg_id)
    record = _node_record(tg, 1 + k % _APP_NODES, k)
    return NewEvent(event_type("node", "updated"), {"record": record}, actor="bench", msg_id=msg_id)


def expected_state(tg: Target, tag: str) -> dict[str, Any] | None:
    """The aggregate's state folded from the events the benchmark generated (no stream involved)."""
    state = None
    agg = Aggregate(tg.kind)
    for k in range(tg.written):
        ev = event_for(tg, k, tag)
        state = apply_event(agg, state, ev.event_type, ev.data)
    return None if state is None else state.model_dump(mode="json")


# --- appending ----------------------------------------------------------------------------------


class Pacer:
    """Token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int = 20) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self._next: float | None = None

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next is None or self._next < now - self.burst * self.interval:
            self._next = now - self.burst * self.interval if self._next is not None else now
        at = self._next
        self._next += self.interval
        if at > now:
            await asyncio.sleep(at - now)


@dataclass
class AppendPhase:
    """What one phase of appends did."""

    events: int
    seconds: float
    per_s: float
    latency: dict[str, float]
    first_position: int
    last_position: int
    rate: float | None = None
    mode: str = "store"
    acks: list[tuple[int, float]] = field(default_factory=list, repr=False)
    """(stream position, wall-clock time of its ack) of every append (store mode)."""


def assign_quota(targets: Sequence[Target], total: int) -> None:
    base, extra = divmod(total, len(targets))
    for i, tg in enumerate(targets):
        tg.quota = base + (1 if i < extra else 0)


async def ensure_raw_stream(bus: Bus) -> None:
    """A stream configured like ``SF_EVENTS`` (file storage, same limits) for raw publishes."""
    cfg = (await bus.js.stream_info(EVENTS_STREAM)).config
    raw = StreamConfig.from_response(cfg.as_dict())
    raw.name, raw.subjects, raw.description = RAW_STREAM, [RAW_SUBJECTS], "bench: raw JetStream publishes"
    await bus.js.add_stream(raw)


async def append_phase(
    buses: Sequence[Bus],
    targets: Sequence[Target],
    total: int,
    *,
    inflight: int,
    tag: str,
    rate: float | None = None,
    duration: float | None = None,
    mode: str = "store",
) -> AppendPhase:
    """Append ``total`` events spread over ``targets`` (or as many as fit in ``duration`` seconds).

    ``store``: through :class:`JetStreamRecorder`, each with ``expected`` = its aggregate's
    last position. ``raw``: the same payloads (same sizes, same order) published to
    :data:`RAW_STREAM` with a plain ``js.publish``: no headers, no concurrency check,
    no de-duplication, the aggregates' state left as it was.

    Writer ``w`` (one bus connection each) owns ``targets[w::len(buses)]`` and keeps up to
    ``inflight`` appends in flight, never two on the same aggregate (the check is per aggregate).
    """
    assign_quota(targets, total)
    pacer = Pacer(rate) if rate else None
    latencies: list[float] = []
    positions: list[int] = []
    acks: list[tuple[int, float]] = []
    raw_next: dict[str, int] = {tg.id: tg.written for tg in targets}
    deadline = math.inf if duration is None else time.perf_counter() + duration

    async def lane(recorder: JetStreamRecorder, ready: deque[Target]) -> None:
        while ready and time.perf_counter() < deadline:
            tg = ready.popleft()
            if pacer is not None:
                await pacer.take()
            if mode == "raw":
                k = raw_next[tg.id]
                payload = codec.encode(event_for(tg, k, tag).data)
                t0 = time.perf_counter()
                ack = await recorder.bus.js.publish(f"bench.raw.{tg.kind}.{tg.id}", payload, timeout=10)
                latencies.append(time.perf_counter() - t0)
                positions.append(int(ack.seq))
                raw_next[tg.id], tg.quota = k + 1, tg.quota - 1
            else:
                ev = event_for(tg, tg.written, tag)
                t0 = time.perf_counter()
                pos = await recorder.append(tg.kind, tg.id, ev, expected=tg.last)
                acked = time.time()
                latencies.append(time.perf_counter() - t0)
                positions.append(pos)
                acks.append((pos, acked))
                tg.first = tg.first or pos
                tg.last, tg.written, tg.quota = pos, tg.written + 1, tg.quota - 1
            if tg.quota > 0:
                ready.append(tg)

    async def writer(w: int) -> None:
        recorder = JetStreamRecorder(buses[w], timeout=30)
        ready = deque(tg for tg in targets[w :: len(buses)] if tg.quota > 0)
        async with asyncio.TaskGroup() as tg_:
            for _ in range(inflight):
                tg_.create_task(lane(recorder, ready))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for w in range(len(buses)):
            group.create_task(writer(w))
    seconds = time.perf_counter() - start
    return AppendPhase(
        events=len(positions),
        seconds=seconds,
        per_s=len(positions) / seconds if seconds else math.nan,
        latency=dist_ms(latencies),
        first_position=min(positions, default=0),
        last_position=max(positions, default=0),
        rate=rate,
        mode=mode,
        acks=acks,
    )


# --- the projection runner, in its own process ---------------------------------------------------


@dataclass(frozen=True)
class ProjectorSpec:
    nats_url: str
    db_url: str
    schema: str | None
    durable: str
    batch_size: int | None = None
    fetch_timeout: float | None = None
    gc_tune: bool = False


#: What ``--gc-tune`` does in the runner process once it has started: move everything loaded so far
#: out of the collector's reach and collect the young generation less often (most garbage is freed by
#: reference counting; full collections of the heap stall the runner for ~100 ms on the 2-core box).
GC_THRESHOLD = (50_000, 50, 50)


class GcClock:
    """Time this process spends in garbage collection, per generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.count[info["generation"]] += 1

    def report(self) -> dict[str, Any]:
        return {"seconds": [round(s, 3) for s in self.seconds], "collections": self.count}


def _projector_entry(spec: ProjectorSpec, ready: MpEvent, stop: MpEvent, out: MpQueue[dict[str, Any]]) -> None:
    configure_logging("ERROR")
    try:
        result = asyncio.run(_projector_main(spec, ready, stop))
    except BaseException as exc:  # report, never hang the parent
        result = {"error": repr(exc), "commits": [], "apply_s": 0.0, "batches": 0}
    out.put(result)


async def _projector_main(spec: ProjectorSpec, ready: MpEvent, stop: MpEvent) -> dict[str, Any]:
    bus = await Bus.connect(BusConfig(servers=[spec.nats_url], name="bench-projector"))
    projector = Projector(spec.db_url, schema=spec.schema, name="bench")
    if spec.gc_tune:  # what a projection worker process may do once started: see bench/README.md
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)
    clock = GcClock()
    gc.callbacks.append(clock)
    cpu0 = time.process_time()
    commits: list[tuple[int, int, float]] = []
    busy = {"apply_s": 0.0, "batches": 0}
    apply = projector.apply

    async def timed_apply(events: Any, *, allow_gap: bool = False) -> Any:
        t0 = time.perf_counter()
        try:
            return await apply(events, allow_gap=allow_gap)
        finally:
            busy["apply_s"] += time.perf_counter() - t0
            busy["batches"] += 1

    projector.apply = timed_apply  # type: ignore[method-assign]

    def on_commit(c: Committed) -> None:
        commits.append((c.first, c.last, c.committed_at.timestamp()))

    kwargs: dict[str, Any] = {}
    if spec.batch_size:
        kwargs["batch_size"] = spec.batch_size
    if spec.fetch_timeout:
        kwargs["fetch_timeout"] = spec.fetch_timeout
    runner = ProjectionRunner(bus, projector, spec.durable, on_commit=on_commit, **kwargs)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.started.wait(), 60)
        started_at = time.time()
        ready.set()
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.05)
        runner.stop()
        await task
    finally:
        await projector.close()
        await bus.close()
    gc.callbacks.remove(clock)
    return {
        "commits": commits,
        **busy,
        "started_at": started_at,
        "cpu_s": time.process_time() - cpu0,
        "gc": clock.report(),
    }


class ProjectorProcess:
    """A ProjectionRunner in a child process; :meth:`stop` returns every commit it made."""

    def __init__(self, spec: ProjectorSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._out: MpQueue[dict[str, Any]] = ctx.Queue()
        self._proc: SpawnProcess = ctx.Process(
            target=_projector_entry, args=(spec, self._ready, self._stop, self._out), daemon=True
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def start(self) -> None:
        self._proc.start()
        await _wait_child(self._proc, self._ready, "projection runner")

    async def stop(self) -> dict[str, Any]:
        self._stop.set()
        result: dict[str, Any] = await asyncio.to_thread(self._out.get, True, 120)
        await asyncio.to_thread(self._proc.join, 30)
        if result.get("error"):
            raise RuntimeError(f"projection runner failed: {result['error']}")
        return result


async def _wait_child(proc: SpawnProcess, ready: MpEvent, what: str, timeout: float = 120.0) -> None:
    """Wait until a child process says it is ready; fail at once if it dies."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(ready.wait, 0.2):
        if not proc.is_alive():
            raise RuntimeError(f"{what} process exited with {proc.exitcode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} process not ready after {timeout:.0f}s")


async def wait_projected(bus: Bus, durable: str, position: int, timeout: float) -> float:
    """Seconds until the runner's consumer has acknowledged (so committed) ``position``."""
    start = time.perf_counter()
    while True:
        info = await bus.js.consumer_info(EVENTS_STREAM, durable)
        if info.ack_floor is not None and int(info.ack_floor.stream_seq) >= position:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"projection did not reach {position} within {timeout}s")
        await asyncio.sleep(0.02)


def ack_to_commit(acks: Iterable[tuple[int, float]], commits: Sequence[tuple[int, int, float]]) -> list[float]:
    """Per appended event: seconds from its ack (seen by the writer) to the commit that projected it."""
    ordered = sorted(commits)
    firsts = [c[0] for c in ordered]
    out: list[float] = []
    for pos, acked in acks:
        i = bisect.bisect_right(firsts, pos) - 1
        if i >= 0 and ordered[i][1] >= pos:
            out.append(ordered[i][2] - acked)
    return out


def lag_figures(acks: Sequence[tuple[int, float]], commits: Sequence[tuple[int, int, float]]) -> dict[str, Any]:
    lags = ack_to_commit(acks, commits)
    return dist_ms(lags) | {
        "events": len(lags),
        "unmatched": len(acks) - len(lags),
        "min_ms": min(lags) * 1000 if lags else math.nan,
    }


# --- databases ----------------------------------------------------------------------------------


@dataclass
class Database:
    backend: str
    url: str
    schema: str | None = None

    def projector(self) -> Projector:
        return Projector(self.url, schema=self.schema, name="bench")


async def pg_reachable(url: str) -> str | None:
    """PostgreSQL's version, or None if it cannot be reached."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None
    try:
        return str(await conn.fetchval("show server_version"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def database(backend: str, cfg: Config, tmp: Path, name: str) -> AsyncIterator[Database]:
    """A fresh, empty database: a SQLite file, or a throw-away PostgreSQL schema."""
    if backend == "sqlite":
        yield Database("sqlite", f"sqlite+aiosqlite:///{tmp / name}.db")
        return
    schema = f"sf_bench_{name}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(cfg.pg_url, timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        yield Database("postgres", cfg.pg_url, schema)
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


# --- checks -------------------------------------------------------------------------------------


async def stream_count(bus: Bus) -> tuple[int, int]:
    state = (await bus.js.stream_info(EVENTS_STREAM)).state
    return int(state.messages), int(state.last_seq)


def pick_sample(targets: Sequence[Target], n: int) -> list[Target]:
    apps = [tg for tg in targets if tg.kind == "app"]
    overlays = [tg for tg in targets if tg.kind == "overlay"]
    n_apps = min(len(apps), max(1, n // 2)) if apps else 0
    step_a = max(1, len(apps) // max(1, n_apps))
    step_o = max(1, len(overlays) // max(1, n - n_apps))
    return apps[::step_a][:n_apps] + overlays[::step_o][: n - n_apps]


async def check_folds(bus: Bus, sample: Sequence[Target], tag: str, live: Projector | None) -> dict[str, Any]:
    """Each sampled aggregate folds, from the stream and in the projection, to the generated state."""
    recorder = JetStreamRecorder(bus)
    bad: list[str] = []
    for tg in sample:
        want = expected_state(tg, tag)
        events = await recorder.read(tg.kind, tg.id)
        loaded = fold(Aggregate(tg.kind), tg.id, events)
        got = None if loaded.state is None else loaded.state.model_dump(mode="json")
        if len(events) != tg.written or loaded.version != tg.last or got != want:
            bad.append(f"stream:{tg.id}")
        if live is not None:
            view = await live.get_state(tg.kind, tg.id)
            if view is None or view.version != tg.last or view.state != want:
                bad.append(f"projection:{tg.id}")
    return {"checked": len(sample), "ok": not bad, "mismatches": bad[:10]}


async def check_conflict(bus: Bus, targets: Sequence[Target], tag: str) -> dict[str, Any]:
    """A stale ``expected`` (the aggregate's first position, or 0) must be refused and add nothing."""
    tg = next(x for x in targets if x.written >= 2)
    recorder = JetStreamRecorder(bus)
    before, _ = await stream_count(bus)
    refused: dict[str, bool] = {}
    for name, stale in (("first_position", tg.first), ("zero", 0)):
        ev = event_for(tg, tg.written, f"{tag}-stale-{name}")
        try:
            await recorder.append(tg.kind, tg.id, ev, expected=stale)
            refused[name] = False
        except ConcurrencyConflict:
            refused[name] = True
    after, _ = await stream_count(bus)
    ok = all(refused.values()) and after == before
    return {"aggregate": tg.id, "refused": refused, "stream_unchanged": after == before, "ok": ok}


async def compare_projections(a: Projector, b: Projector) -> dict[str, Any]:
    snap_a, snap_b = await a.snapshot(_COMPARED), await b.snapshot(_COMPARED)
    differing = [name for name in snap_a if snap_a[name] != snap_b.get(name)]
    events_a, events_b = await a.count(t.events), await b.count(t.events)
    errors = len(await a.errors()) + len(await b.errors())
    return {
        "tables_differing": differing,
        "events_rows": [events_a, events_b],
        "projection_errors": errors,
        "ok": not differing and events_a == events_b and errors == 0,
    }


# --- one database and fsync policy --------------------------------------------------------------


def _phase(ph: AppendPhase) -> dict[str, Any]:
    return {k: v for k, v in asdict(ph).items() if k != "acks"}


async def run_backend(cfg: Config, backend: str, sync: str, repeat: int, tmp: Path) -> dict[str, Any]:
    """One fresh server (``sync_interval: sync``) and database: throughput, catch-up, checks, rebuild, paced lag."""
    tag = f"r{repeat}-{backend}-{uuid.uuid4().hex[:6]}"
    durable = "bench-projector"
    n = cfg.events_for(sync)
    out: dict[str, Any] = {
        "backend": backend,
        "sync": sync,
        "loadavg_before": loadavg(),
        "cpu_pressure_before": cpu_pressure(),
    }
    paced: list[tuple[str, AppendPhase, dict[str, Any]]] = []
    name = f"{backend}{repeat}{sync.replace('always', 'a')}"
    async with (
        EmbeddedNatsServer(ServerConfig(sync_interval=sync)) as server,
        database(backend, cfg, tmp, f"live{name}") as live_db,
        database(backend, cfg, tmp, f"rebuilt{name}") as rebuilt_db,
    ):
        buses = [
            await Bus.connect(BusConfig(servers=[server.url], name=f"bench-writer-{w}")) for w in range(cfg.writers)
        ]
        bus = buses[0]
        proc: ProjectorProcess | None = None
        try:
            await ensure_streams(bus)
            await ensure_raw_stream(bus)
            targets = make_targets(cfg.aggregates, cfg.app_share)
            # (1) Throughput, no projector yet: raw JetStream publishes, then the store, same payloads.
            raw = await append_phase(buses, targets, n, inflight=cfg.inflight, tag=tag, mode="raw")
            main = await append_phase(buses, targets, n, inflight=cfg.inflight, tag=tag)
            out["raw"] = _phase(raw)
            out["append"] = _phase(main) | {"writers": cfg.writers, "inflight_per_writer": cfg.inflight}
            out["store_to_raw"] = main.per_s / raw.per_s if raw.per_s else math.nan
            # (2) The runner starts on the backlog: its catch-up rate, nothing else running.
            spec = ProjectorSpec(
                server.url,
                live_db.url,
                live_db.schema,
                durable,
                cfg.runner_batch,
                cfg.runner_fetch_timeout,
                cfg.gc_tune,
            )
            proc = ProjectorProcess(spec)
            await proc.start()
            await wait_projected(bus, durable, main.last_position, cfg.catch_up_timeout)
            # (3) Checks.
            messages, last_seq = await stream_count(bus)
            out["checks"] = {
                "stream": {"messages": messages, "last_seq": last_seq, "ok": messages == last_seq == n},
                "conflict": await check_conflict(bus, targets, tag),
            }
            async with contextlib.AsyncExitStack() as stack:
                live = live_db.projector()
                stack.push_async_callback(live.close)
                out["checks"]["folds"] = await check_folds(bus, pick_sample(targets, cfg.sample), tag, live)
                # (4) Rebuild a fresh database from the stream (the runner is idle meanwhile).
                rebuilt = rebuilt_db.projector()
                stack.push_async_callback(rebuilt.close)
                res = await rebuilt.rebuild(StreamReader(bus))
                out["rebuild"] = {
                    "events": res.count,
                    "seconds": res.elapsed,
                    "per_s": res.count / res.elapsed if res.elapsed else math.nan,
                    "position": res.position,
                    "errors": res.errors,
                }
                out["checks"]["rebuild"] = await compare_projections(live, rebuilt) | {
                    "count_ok": res.count == n and res.position == n
                }
            # (5) Paced appends, the runner live: lag from each append's ack to its commit.
            rates = [r for r in cfg.paced_rates if sync != "always" or r < main.per_s]
            pids = {"runner": proc.pid, "nats": server.pid, "writers": os.getpid()}
            for rate in rates:
                paced.append(("fixed", *await _paced(cfg, buses, targets, tag, rate, bus, durable, pids)))
            if sync == "always" and cfg.sustain:
                rate = _round_rate(SUSTAIN_START * main.per_s)
                for _ in range(SUSTAIN_TRIES):
                    ph, usage = await _paced(cfg, buses, targets, tag, rate, bus, durable, pids)
                    paced.append(("sustain", ph, usage))
                    if ph.per_s >= SUSTAINED_SHARE * rate or rate <= 50:
                        break
                    rate = _round_rate(min(SUSTAIN_START * ph.per_s, 0.8 * rate))
            result = await proc.stop()
            proc = None
        finally:
            if proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.stop(), 30)
            for b in buses:
                await b.close()
    commits = result["commits"]
    done = [ts for first, last, ts in commits if first <= main.last_position <= last]
    catch_up = (done[0] - result["started_at"]) if done else math.nan
    out["catch_up"] = {"seconds": catch_up, "per_s": main.events / catch_up if catch_up > 0 else math.nan}
    out["paced"] = [
        {
            "kind": kind,
            "rate": ph.rate,
            "events": ph.events,
            "seconds": ph.seconds,
            "achieved_per_s": ph.per_s,
            "sustained": bool(ph.rate) and ph.per_s >= SUSTAINED_SHARE * float(ph.rate or 0),
            "append_latency": ph.latency,
            "lag": lag_figures(ph.acks, commits),
            "usage": usage,
        }
        for kind, ph, usage in paced
    ]
    sustained = [p for p in out["paced"] if p["sustained"]]
    if sync == "always" and sustained:
        out["sustained"] = max(sustained, key=lambda p: p["rate"])
    projected = sum(last - first + 1 for first, last, _ in commits)
    out["projector"] = {k: result[k] for k in ("apply_s", "batches", "cpu_s", "gc")} | {
        "events": projected,
        "cpu_us_per_event": result["cpu_s"] / projected * 1e6 if projected else math.nan,
    }
    out["loadavg_after"] = loadavg()
    checks = out["checks"]
    checks["lag_matched"] = all(p["lag"]["unmatched"] == 0 for p in out["paced"])
    checks["ok"] = all(
        [
            checks["stream"]["ok"],
            checks["conflict"]["ok"],
            checks["folds"]["ok"],
            checks["rebuild"]["ok"],
            checks["rebuild"]["count_ok"],
            checks["lag_matched"],
        ]
    )
    return out


def _round_rate(rate: float) -> int:
    return max(50, int(rate / 50) * 50)


async def _paced(
    cfg: Config,
    buses: Sequence[Bus],
    targets: Sequence[Target],
    tag: str,
    rate: int,
    bus: Bus,
    durable: str,
    pids: dict[str, int | None],
) -> tuple[AppendPhase, dict[str, Any]]:
    """Appends at ``rate`` for ``paced_seconds``, then wait until the runner has projected them.

    Also returns the CPU share (% of one CPU) the runner, nats-server and the writers got
    during the appends, and the machine's CPU pressure at the end of them.
    """
    n = max(len(targets), int(rate * cfg.paced_seconds))
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    t0 = time.perf_counter()
    ph = await append_phase(buses, targets, n, inflight=cfg.inflight, tag=tag, rate=rate, duration=cfg.paced_seconds)
    wall = time.perf_counter() - t0
    usage: dict[str, Any] = {
        f"{k}_cpu_pct": (cpu_seconds(pid) - before[k]) / wall * 100 if wall else math.nan for k, pid in pids.items()
    }
    usage["cpu_pressure_pct"] = cpu_pressure()
    await wait_projected(bus, durable, ph.last_position, cfg.catch_up_timeout)
    log(
        f"    paced {rate}/s: achieved {ph.per_s:.0f}/s over {ph.seconds:.1f} s; "
        + ", ".join(f"{k} {v:.0f}%" for k, v in usage.items() if v is not None)
    )
    return ph, usage


# --- (d) signed commands through the real manager ------------------------------------------------


def _manager_entry(nats_url: str, admin_public_key: str, ready: MpEvent, stop: MpEvent) -> None:
    configure_logging("ERROR")
    asyncio.run(_manager_main(nats_url, admin_public_key, ready, stop))


async def _manager_main(nats_url: str, admin_public_key: str, ready: MpEvent, stop: MpEvent) -> None:
    from manager.app import ManagerApp, ManagerConfig

    app = ManagerApp(
        ManagerConfig(
            bus=BusConfig(servers=[nats_url], name="bench-manager"), admin_public_key=admin_public_key, heartbeat_s=5.0
        )
    )
    await app.start()
    try:
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
    finally:
        await app.stop()


async def run_commands(cfg: Config) -> dict[str, Any]:
    """``overlay_update`` with ``expected_version``, signed, from ``cfg.clients`` concurrent clients."""
    seed = signing.generate_user_seed()
    who = Identity("admin", seed)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out: dict[str, Any] = {"clients": cfg.clients, "loadavg_before": loadavg()}
    async with EmbeddedNatsServer() as server:
        proc = ctx.Process(
            target=_manager_entry, args=(server.url, signing.public_key_of(seed), ready, stop), daemon=True
        )
        proc.start()
        buses: list[Bus] = []
        try:
            await _wait_child(proc, ready, "manager")
            buses = [
                await Bus.connect(BusConfig(servers=[server.url], name=f"bench-client-{c}")) for c in range(cfg.clients)
            ]
            m = MESSAGES["overlay"]
            per_client = 4
            overlays = [f"cmd-ov-{c}-{i}" for c in range(cfg.clients) for i in range(per_client)]
            versions: dict[str, int] = {}

            def record(oid: str, k: int) -> OverlayNetwork:
                i = overlays.index(oid)
                return OverlayNetwork.model_validate(
                    {**_overlay_record(Target("overlay", oid, i), k), "id": oid, "name": f"Cmd overlay {i}"}
                )

            for oid in overlays:
                res = await command(
                    buses[0], "manager", "overlay_create", m.create(record=record(oid, 0)), WriteResult, identity=who
                )
                versions[oid] = res.version
            latencies: list[float] = []
            remaining = [cfg.commands]

            async def client(c: int) -> None:
                mine = overlays[c * per_client : (c + 1) * per_client]
                k = 0
                while remaining[0] > 0:
                    remaining[0] -= 1
                    oid = mine[k % len(mine)]
                    k += 1
                    req = m.update(record=record(oid, k), expected_version=versions[oid])
                    t0 = time.perf_counter()
                    res = await command(buses[c], "manager", "overlay_update", req, WriteResult, identity=who)
                    latencies.append(time.perf_counter() - t0)
                    versions[oid] = res.version

            start = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for c in range(cfg.clients):
                    group.create_task(client(c))
            seconds = time.perf_counter() - start
            # A stale expected_version is refused by the manager.
            oid = overlays[0]
            try:
                stale = m.update(record=record(oid, 10**6), expected_version=versions[oid] - 1)
                await command(buses[0], "manager", "overlay_update", stale, WriteResult, identity=who)
                stale_refused = False
            except SkyferryError as exc:
                stale_refused = exc.code == ErrorCode.CONFLICT
            messages, _ = await stream_count(buses[0])
            expected_messages = 1 + len(overlays) + len(latencies)  # the admin user, creates, updates
            out |= {
                "commands": len(latencies),
                "seconds": seconds,
                "per_s": len(latencies) / seconds if seconds else math.nan,
                "latency": dist_ms(latencies),
                "checks": {
                    "stale_refused": stale_refused,
                    "stream_messages": messages,
                    "expected_messages": expected_messages,
                    "ok": stale_refused and messages == expected_messages,
                },
            }
        finally:
            for b in buses:
                await b.close()
            stop.set()
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
    out["loadavg_after"] = loadavg()
    return out


# --- the whole benchmark ------------------------------------------------------------------------


async def run_benchmark(cfg: Config) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    facts = machine_facts()
    backends = list(cfg.backends)
    notes: list[str] = []
    if "postgres" in backends:
        version = await pg_reachable(cfg.pg_url)
        if version is None:
            backends.remove("postgres")
            notes.append(f"PostgreSQL unreachable at {cfg.pg_url}: skipped")
        else:
            facts["postgresql"] = version
    repeats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sf-bench-events-") as tmp:
        for r in range(cfg.repeat):
            rep: dict[str, Any] = {"repeat": r + 1}
            for sync in cfg.sync:
                for backend in backends:
                    key = run_key(backend, sync)
                    log(f"repeat {r + 1}/{cfg.repeat}: {backend}, sync {sync}: {cfg.events_for(sync)} events")
                    rep[key] = await run_backend(cfg, backend, sync, r, Path(tmp))
                    log(f"  {_brief(rep[key])}")
            if cfg.commands > 0:
                log(f"repeat {r + 1}/{cfg.repeat}: {cfg.commands} signed commands")
                rep["commands"] = await run_commands(cfg)
                log(f"  {rep['commands']['per_s']:.0f} commands/s")
            repeats.append(rep)
    result = {
        "benchmark": "bench_events",
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": facts,
        "notes": notes,
        "repeats": repeats,
    }
    result["summary"] = summarise(result, backends)
    return result


def run_key(backend: str, sync: str) -> str:
    """Key of one run in a repeat's results: ``sqlite@always``."""
    return f"{backend}@{sync}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(b: dict[str, Any]) -> str:
    paced = ", ".join(
        f"{p['rate']}/s (got {p['achieved_per_s']:.0f}) p99 {p['lag']['p99_ms']:.0f} ms" for p in b["paced"]
    )
    return (
        f"{b['append']['per_s']:.0f} appends/s = {b['store_to_raw']:.2f} x raw {b['raw']['per_s']:.0f}/s; "
        f"catch-up {b['catch_up']['per_s']:.0f}/s; rebuild {b['rebuild']['seconds']:.1f} s; paced: {paced}; "
        f"checks {'ok' if b['checks']['ok'] else 'FAILED'}"
    )


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    get: Callable[[dict[str, Any]], float | None]
    target: str = ""
    met: Callable[[float], bool] | None = None


_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _getter(run: str, *path: Any) -> Callable[[dict[str, Any]], float | None]:
    """Value at ``path`` in one repeat's run ``run`` (a callable step picks from a list)."""

    def get(rep: dict[str, Any]) -> float | None:
        cur: Any = rep.get(run)
        for p in path:
            if cur is None:
                return None
            cur = p(cur) if callable(p) else cur.get(p) if isinstance(cur, dict) else None
        return None if cur is None else float(cur)

    return get


def _below(limit: float) -> Callable[[float], bool]:
    return lambda v: v < limit


def _paced_at(rate: int) -> Callable[[list[dict[str, Any]]], dict[str, Any] | None]:
    return lambda ps: next((p for p in ps if p["kind"] == "fixed" and p["rate"] == rate), None)


def _metrics(backends: Sequence[str], cfg: dict[str, Any]) -> list[Metric]:
    out: list[Metric] = []
    for sync in cfg["sync"]:
        events = cfg["events_always"] if sync == "always" else cfg["events"]
        for b in backends:
            run = run_key(b, sync)
            n = f"{_NAMES.get(b, b)}, sync {sync}"
            out += [
                Metric(f"{run}.raw_per_s", f"{n}: raw JetStream publishes/s", "events/s", _getter(run, "raw", "per_s")),
                Metric(
                    f"{run}.append_per_s",
                    f"{n}: store appends/s (concurrency checks)",
                    "events/s",
                    _getter(run, "append", "per_s"),
                ),
                Metric(f"{run}.store_to_raw", f"{n}: store / raw", "ratio", _getter(run, "store_to_raw")),
                Metric(
                    f"{run}.append_p50_ms",
                    f"{n}: append latency p50",
                    "ms",
                    _getter(run, "append", "latency", "p50_ms"),
                ),
                Metric(
                    f"{run}.append_p99_ms",
                    f"{n}: append latency p99",
                    "ms",
                    _getter(run, "append", "latency", "p99_ms"),
                ),
                Metric(
                    f"{run}.raw_p99_ms", f"{n}: raw publish latency p99", "ms", _getter(run, "raw", "latency", "p99_ms")
                ),
                Metric(f"{run}.catch_up_per_s", f"{n}: runner catch-up", "events/s", _getter(run, "catch_up", "per_s")),
                Metric(
                    f"{run}.runner_cpu_us",
                    f"{n}: runner CPU per projected event",
                    "us",
                    _getter(run, "projector", "cpu_us_per_event"),
                ),
            ]
            for rate in cfg["paced_rates"]:
                at = _paced_at(rate)
                target = rate == TARGET_LAG_RATE
                out += [
                    Metric(
                        f"{run}.paced{rate}.achieved",
                        f"{n}: paced {rate:,}/s achieved",
                        "events/s",
                        _getter(run, "paced", at, "achieved_per_s"),
                    ),
                    Metric(
                        f"{run}.paced{rate}.lag_p50_ms",
                        f"{n}: lag p50 at {rate:,}/s",
                        "ms",
                        _getter(run, "paced", at, "lag", "p50_ms"),
                    ),
                    Metric(
                        f"{run}.paced{rate}.lag_p99_ms",
                        f"{n}: lag p99 at {rate:,}/s",
                        "ms",
                        _getter(run, "paced", at, "lag", "p99_ms"),
                        f"< {TARGET_LAG_P99_MS:.0f}" if target else "",
                        (lambda v: v < TARGET_LAG_P99_MS) if target else None,
                    ),
                    Metric(
                        f"{run}.paced{rate}.lag_max_ms",
                        f"{n}: lag max at {rate:,}/s",
                        "ms",
                        _getter(run, "paced", at, "lag", "max_ms"),
                    ),
                    Metric(
                        f"{run}.paced{rate}.runner_cpu_pct",
                        f"{n}: runner CPU at {rate:,}/s",
                        "%",
                        _getter(run, "paced", at, "usage", "runner_cpu_pct"),
                    ),
                    Metric(
                        f"{run}.paced{rate}.pressure_pct",
                        f"{n}: CPU pressure at {rate:,}/s",
                        "%",
                        _getter(run, "paced", at, "usage", "cpu_pressure_pct"),
                    ),
                ]
            if sync == "always":
                out += [
                    Metric(
                        f"{run}.sustained.rate",
                        f"{n}: highest sustained rate",
                        "events/s",
                        _getter(run, "sustained", "rate"),
                    ),
                    Metric(
                        f"{run}.sustained.achieved",
                        f"{n}: achieved there",
                        "events/s",
                        _getter(run, "sustained", "achieved_per_s"),
                    ),
                    Metric(
                        f"{run}.sustained.lag_p50_ms",
                        f"{n}: lag p50 there",
                        "ms",
                        _getter(run, "sustained", "lag", "p50_ms"),
                    ),
                    Metric(
                        f"{run}.sustained.lag_p99_ms",
                        f"{n}: lag p99 there",
                        "ms",
                        _getter(run, "sustained", "lag", "p99_ms"),
                    ),
                    Metric(
                        f"{run}.sustained.lag_max_ms",
                        f"{n}: lag max there",
                        "ms",
                        _getter(run, "sustained", "lag", "max_ms"),
                    ),
                    Metric(
                        f"{run}.sustained.runner_cpu_pct",
                        f"{n}: runner CPU there",
                        "%",
                        _getter(run, "sustained", "usage", "runner_cpu_pct"),
                    ),
                    Metric(
                        f"{run}.sustained.pressure_pct",
                        f"{n}: CPU pressure there",
                        "%",
                        _getter(run, "sustained", "usage", "cpu_pressure_pct"),
                    ),
                ]
            limit = TARGET_REBUILD_S_PER_100K * events / 100_000
            out += [
                Metric(
                    f"{run}.rebuild_s",
                    f"{n}: rebuild of {events:,} events",
                    "s",
                    _getter(run, "rebuild", "seconds"),
                    f"< {limit:.1f}" if events >= 100_000 else "",
                    _below(limit) if events >= 100_000 else None,
                ),
                Metric(f"{run}.rebuild_per_s", f"{n}: rebuild rate", "events/s", _getter(run, "rebuild", "per_s")),
            ]
    if cfg["commands"] > 0:
        out += [
            Metric(
                "commands.per_s",
                f"Signed overlay_update commands/s via the manager ({cfg['clients']} clients)",
                "commands/s",
                _getter("commands", "per_s"),
            ),
            Metric("commands.p50_ms", "command latency p50", "ms", _getter("commands", "latency", "p50_ms")),
            Metric("commands.p99_ms", "command latency p99", "ms", _getter("commands", "latency", "p99_ms")),
        ]
    return out


def summarise(result: dict[str, Any], backends: Sequence[str]) -> dict[str, Any]:
    """Median, min and max over the repeats of every figure, with its target."""
    summary: dict[str, Any] = {}
    for m in _metrics(backends, result["config"]):
        vals = [v for v in (m.get(rep) for rep in result["repeats"]) if v is not None and not math.isnan(v)]
        if not vals:
            continue
        med = statistics.median(vals)
        summary[m.key] = {
            "label": m.label,
            "unit": m.unit,
            "median": med,
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "target": m.target or None,
            "met": m.met(med) if m.met else None,
        }
    checks = []
    for rep in result["repeats"]:
        checks += [v["checks"]["ok"] for k, v in rep.items() if "@" in k]
        if "commands" in rep:
            checks.append(rep["commands"]["checks"]["ok"])
    summary["checks_ok"] = bool(checks) and all(checks)
    summary["repeats"] = len(result["repeats"])
    return summary


# --- output -------------------------------------------------------------------------------------


def _fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "n/a"
    if unit in ("events/s", "commands/s"):
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "ratio":
        return f"{v:.2f}"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _cell(summary: dict[str, Any], key: str, *, target: bool = False) -> str:
    s = summary.get(key)
    if not isinstance(s, dict):
        return "-"
    unit = s["unit"]
    text = f"{_fmt(s['median'], unit)} ({_fmt(s['min'], unit)}…{_fmt(s['max'], unit)})"
    if s["n"] == 1 or s["min"] == s["max"]:
        text = _fmt(s["median"], unit)
    if s["n"] < summary.get("repeats", s["n"]):
        text += f" [{s['n']} of {summary['repeats']}]"
    if target and s["met"] is not None:
        text += " yes" if s["met"] else " **no**"
    return text


def render_markdown(result: dict[str, Any]) -> str:
    cfg, facts, summary = result["config"], result["machine"], result["summary"]
    backends = [
        b for b in cfg["backends"] if any(run_key(b, y) in rep for rep in result["repeats"] for y in cfg["sync"])
    ]
    runs = [(y, b) for y in cfg["sync"] for b in backends]
    names = {b: _NAMES.get(b, b) for b in backends}
    lines = [
        MARK_START,
        "## Event store and projections (`bench/bench_events.py`, issues 3 and 8)",
        "",
        f"Run {result['started_at'][:16].replace('T', ' ')} UTC: `python -m bench.bench_events --events {cfg['events']}"
        f" --events-always {cfg['events_always']} --repeat {cfg['repeat']} --sync {','.join(cfg['sync'])}"
        f" --paced-seconds {cfg['paced_seconds']:g}`; every figure is the median of {cfg['repeat']} repeat(s),"
        " (min…max) beside it; [k of n]: a figure only k repeats had (e.g. a rate offered only when the"
        " measured throughput was above it)."
        + (f" Raw results: `{_relative(result['raw_results'])}`." if result.get("raw_results") else ""),
        "",
        "**Appends**: raw JetStream publishes vs the store, same payloads, same concurrency"
        f" ({cfg['writers']} writers x {cfg['inflight']} in flight), no projector running:",
        "",
        "| sync_interval | run | raw JetStream publishes/s | store appends/s | store / raw | append p50 ms"
        " | append p99 ms | raw p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for y, b in runs:
        r = run_key(b, y)
        lines.append(
            f"| {y} | {names[b]} | {_cell(summary, r + '.raw_per_s')} | {_cell(summary, r + '.append_per_s')}"
            f" | {_cell(summary, r + '.store_to_raw')} | {_cell(summary, r + '.append_p50_ms')}"
            f" | {_cell(summary, r + '.append_p99_ms')} | {_cell(summary, r + '.raw_p99_ms')} |"
        )
    lines += [
        "",
        "**Projection lag** from each append's ack (seen by the writer) to the commit that made its rows"
        f" visible, appends paced for {cfg['paced_seconds']:g} s per rate, the runner live; target p99 <"
        f" {TARGET_LAG_P99_MS:.0f} ms at {TARGET_LAG_RATE:,}/s:",
        "",
        "| sync_interval | database | offered /s | achieved /s | lag p50 ms | lag p99 ms | lag max ms"
        " | runner CPU % | CPU pressure % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for y, b in runs:
        r = run_key(b, y)
        for rate in cfg["paced_rates"]:
            key = f"{r}.paced{rate}"
            if f"{key}.achieved" not in summary:
                continue
            lines.append(
                f"| {y} | {names[b]} | {rate:,} | {_cell(summary, key + '.achieved')}"
                f" | {_cell(summary, key + '.lag_p50_ms')} | {_cell(summary, key + '.lag_p99_ms', target=True)}"
                f" | {_cell(summary, key + '.lag_max_ms')} | {_cell(summary, key + '.runner_cpu_pct')}"
                f" | {_cell(summary, key + '.pressure_pct')} |"
            )
        if f"{r}.sustained.rate" in summary:
            key = f"{r}.sustained"
            lines.append(
                f"| {y} | {names[b]} | **highest sustained**: {_cell(summary, key + '.rate')}"
                f" | {_cell(summary, key + '.achieved')} | {_cell(summary, key + '.lag_p50_ms')}"
                f" | {_cell(summary, key + '.lag_p99_ms')} | {_cell(summary, key + '.lag_max_ms')}"
                f" | {_cell(summary, key + '.runner_cpu_pct')} | {_cell(summary, key + '.pressure_pct')} |"
            )
    lines += [
        "",
        "**Runner and rebuild**:",
        "",
        "| sync_interval | database | rebuild s | rebuild events/s | runner catch-up events/s | runner CPU µs/event |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for y, b in runs:
        r = run_key(b, y)
        lines.append(
            f"| {y} | {names[b]} | {_cell(summary, r + '.rebuild_s', target=True)}"
            f" | {_cell(summary, r + '.rebuild_per_s')} | {_cell(summary, r + '.catch_up_per_s')}"
            f" | {_cell(summary, r + '.runner_cpu_us')} |"
        )
    if "commands.per_s" in summary:
        lines += [
            "",
            f"**Commands**: {_cell(summary, 'commands.per_s')} signed `overlay_update` commands/s through the"
            f" manager ({cfg['clients']} clients; latency p50 {_cell(summary, 'commands.p50_ms')} ms, p99"
            f" {_cell(summary, 'commands.p99_ms')} ms; server default sync).",
        ]
    lines += [
        "",
        "Correctness checks (every repeat and run): "
        + ("all passed" if summary["checks_ok"] else "**FAILED** (see raw results)")
        + " - the stream holds exactly the appended events, a sample of aggregates folds (from the stream and in"
        " the projection) to the generated state, a stale `expected` is refused as a conflict and appends nothing,"
        " the rebuilt projection equals the live one, every paced append's commit was seen, and the manager"
        " refuses a stale `expected_version`.",
        "",
        "How it is measured:",
        "",
        f"- **Workload**: events over {cfg['aggregates']:,} aggregates ({1 - cfg['app_share']:.0%} overlays:"
        f" `overlay.created` then `overlay.updated`; {cfg['app_share']:.0%} applications: `app.imported` with a"
        " 4-node map then `node.updated`). Store appends go through `JetStreamRecorder.append` with `expected=`"
        " the aggregate's last position (Nats-Expected-Last-Subject-Sequence, plus Nats-Msg-Id and the Sf-*"
        " headers); raw publishes are `js.publish` of the same msgpack payloads, in the same order, to a stream"
        " configured like SF_EVENTS, without headers. Writers own disjoint aggregates, never two appends in flight"
        f" on one aggregate. {cfg['events']:,} events per run with a duration sync_interval,"
        f" {cfg['events_always']:,} with `always` (fsync-bound).",
        "- **Catch-up**: the `ProjectionRunner` (own process, default settings"
        + (f", batch {cfg['runner_batch']}" if cfg["runner_batch"] else "")
        + ") started on that backlog, nothing else running: events / seconds to its commit of the last one.",
        "- **Lag**: appends paced by a token bucket; each append's ack time (wall clock, in the writer) against the"
        " wall-clock time the runner's transaction holding it committed (its `on_commit` hook); same machine, same"
        " clock. A rate counts as sustained when the writers achieve"
        f" {SUSTAINED_SHARE:.0%} of it. With `always`, rates above the max-rate throughput are not offered; the"
        f" highest sustained rate is searched from {SUSTAIN_START:.0%} of that throughput down, each next offer"
        f" {SUSTAIN_START:.0%} of what the writers achieved at the previous one (at most 80 % of it), until one is"
        " sustained.",
        "- **Rebuild**: `Projector.rebuild` of an empty database from the stream (`StreamReader`): tables dropped"
        " and recreated, every event replayed.",
        "- **Runner CPU**: the runner process's CPU seconds over every event it projected (all phases); in the"
        " lag table, the share of one CPU it got while the appends were paced (`/proc/<pid>/stat`). **CPU"
        " pressure**: Linux PSI `some avg10` of `/proc/pressure/cpu` at the end of the paced appends, the share of"
        " time in which at least one runnable task waited for a CPU (0: idle machine; ours and other users' work"
        " alike).",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}, {facts['nats_server']}"
        + (f", PostgreSQL {facts['postgresql']}" if facts.get("postgresql") else "")
        + "; nats-server, writers, projection runner and PostgreSQL share these CPUs."
        + f" Load average (1 min) before each run: {_loads(result)}.",
    ]
    for note in [*result.get("notes", []), result["config"].get("note", "")]:
        if note:
            lines.append(f"\nNote: {note.rstrip('.')}.")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _loads(result: dict[str, Any]) -> str:
    loads = []
    for rep in result["repeats"]:
        for v in rep.values():
            if isinstance(v, dict) and v.get("loadavg_before"):
                loads.append(f"{v['loadavg_before'][0]:.1f}")
    return ", ".join(loads) or "n/a"


def write_section(path: Path, section: str) -> None:
    """Replace (or add) this benchmark's section, keeping every other section of the file."""
    text = path.read_text() if path.exists() else OUT_HEADER
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end != -1 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(MARK_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def write_results(result: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"events-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


LOCK_FILE = Path("/tmp/skyferry-bench.lock")
"""Held (flock) for the whole run, as by ``flock /tmp/skyferry-bench.lock <command>``: never two benchmarks at once."""


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    configure_logging("ERROR")
    if (os.cpu_count() or 1) <= 2:
        log("note: 2 CPUs; run no other benchmark meanwhile (figures are noisy on a busy machine)")
    with LOCK_FILE.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _lock_held_by_ancestor(LOCK_FILE):  # else: started under flock(1) already
                log(f"waiting for {LOCK_FILE} (another benchmark is running)")
                fcntl.flock(lock, fcntl.LOCK_EX)
        return _main(cfg)


def _lock_held_by_ancestor(path: Path) -> bool:
    """Whether a process this one descends from holds the flock on ``path`` (``flock FILE command``)."""
    try:
        inode = path.stat().st_ino
        holders = set()
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                holders.add(int(fields[4]))
        pid = os.getppid()
        while pid > 1:
            if pid in holders:
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return False


def _main(cfg: Config) -> int:
    result = asyncio.run(run_benchmark(cfg))
    if cfg.results_dir is not None:
        result["raw_results"] = str(write_results(result, cfg.results_dir))
    if cfg.out is not None:
        write_section(cfg.out, render_markdown(result))
    print(json.dumps({"summary": result["summary"], "raw_results": result.get("raw_results")}, indent=1))
    return 0 if result["summary"]["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
