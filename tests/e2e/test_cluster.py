"""The deploy/ cluster config runs a real 3-node JetStream cluster; clients fail over between nodes."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import signing
from bus.connection import Bus, BusConfig, ensure_streams
from bus.nats_config import cluster_node, env_var, render
from bus.permissions import Role
from bus.server import _http_get, find_binary, free_port
from manager.store import JetStreamRecorder, NewEvent

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_configs_are_current(tmp_path: Path) -> None:
    from bus.nats_config import write_all

    for p in write_all(tmp_path, ["nats-1", "nats-2", "nats-3"]):
        rel = p.relative_to(tmp_path)
        assert (REPO / "deploy" / "nats" / rel).read_text() == p.read_text(), f"regenerate deploy/nats/{rel}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]], list[int], dict[Role, str]]]:
    seeds = {r: signing.generate_user_seed() for r in Role}
    env = {**os.environ, **{env_var(r).name: signing.public_key_of(s) for r, s in seeds.items()}}
    ports = [free_port() for _ in range(3)]
    cports = [free_port() for _ in range(3)]
    mports = [free_port() for _ in range(3)]
    hosts = [f"127.0.0.1:{c}" for c in cports]
    procs = []
    for i in range(3):
        conf = cluster_node(
            i + 1,
            hosts,
            port=ports[i],
            cluster_port=cports[i],
            monitor_port=mports[i],
            store_dir=str(tmp_path / f"n{i}"),
            host="127.0.0.1",
        )
        path = tmp_path / f"node-{i + 1}.conf"
        path.write_text(render(conf))
        procs.append(
            subprocess.Popen(
                [find_binary(), "-c", str(path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    try:
        yield [f"nats://127.0.0.1:{p}" for p in ports], procs, mports, seeds
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def _wait_js_healthy(mports: list[int]) -> None:
    for _ in range(200):
        ok = 0
        for m in mports:
            try:
                status, _ = await _http_get("127.0.0.1", m, "/healthz")
                ok += status == 200
            except OSError:
                pass
        if ok == len(mports):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("cluster not healthy")


async def _append_retrying(rec: JetStreamRecorder, i: int, last: int) -> int:
    """Append event ``i`` (same message id on every try, so a retry cannot write it twice)."""
    for _ in range(100):
        try:
            return await rec.append("app", "a1", NewEvent("t.e", {"i": i}, msg_id=f"m{i}"), expected=last)
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError(f"append {i} never succeeded")


async def test_three_node_cluster_survives_a_node_loss(cluster) -> None:  # type: ignore[no-untyped-def]
    urls, procs, mports, seeds = cluster
    await _wait_js_healthy(mports)
    bus = await Bus.connect(BusConfig(servers=urls, nkey_seed=seeds[Role.MANAGER], name="cluster-test"))
    try:
        for _ in range(50):  # the meta leader may still be electing
            try:
                await ensure_streams(bus, replicas=3)
                break
            except Exception:
                await asyncio.sleep(0.2)
        rec = JetStreamRecorder(bus, timeout=3.0)
        last = 0
        for i in range(20):  # the new stream may still be electing its leader: retried like the ones below
            last = await _append_retrying(rec, i, last)
        # Kill the node this client is connected to; the client fails over, writes continue.
        connected = bus.nc.connected_url
        assert connected is not None
        victim = next(i for i, u in enumerate(urls) if u.endswith(f":{connected.port}"))
        procs[victim].kill()
        for i in range(20, 40):
            last = await _append_retrying(rec, i, last)
        # The stream may still be electing a new leader: reads are retried like the appends.
        events = None
        for _ in range(100):
            try:
                events = await rec.read("app", "a1")
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert events is not None, "the stream never became readable again"
        assert [e.data["i"] for e in events] == list(range(40))
        assert bus.nc.connected_url is not None and bus.nc.connected_url.port != connected.port
    finally:
        await bus.close()
