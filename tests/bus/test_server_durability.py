"""The NATS configs Skyferry renders fsync JetStream before every ack unless the operator says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from bus.nats_config import cluster_node, render, single_node
from bus.server import EmbeddedNatsServer, ServerConfig, _http_get

REPO = Path(__file__).resolve().parents[2]


async def _jetstream_config(server: EmbeddedNatsServer) -> dict[str, object]:
    status, body = await _http_get(server.config.host, server.config.monitor_port, "/varz")
    assert status == 200
    config: dict[str, object] = json.loads(body)["jetstream"]["config"]
    return config


async def test_embedded_server_syncs_always_by_default() -> None:
    async with EmbeddedNatsServer() as server:
        config = await _jetstream_config(server)
    assert config["sync_always"] is True


async def test_embedded_server_takes_an_operator_interval(tmp_path: Path) -> None:
    async with EmbeddedNatsServer(ServerConfig(store_dir=tmp_path / "js", sync_interval="30s")) as server:
        config = await _jetstream_config(server)
    assert not config.get("sync_always")
    assert config["sync_interval"] == 30 * 10**9


def test_deploy_configs_sync_always() -> None:
    assert 'sync_interval: "always"' in render(single_node())
    assert 'sync_interval: "2m"' in render(cluster_node(1, ["a", "b", "c"], sync_interval="2m"))
    for rel in ["single.conf", "cluster/node-1.conf", "cluster/node-2.conf", "cluster/node-3.conf"]:
        assert 'sync_interval: "always"' in (REPO / "deploy" / "nats" / rel).read_text(), rel
