"""Event histories shaped like the manager's, for the projection tests."""

from __future__ import annotations

from typing import Any

from bus.messages import event_type
from manager.store import EventRecorder, NewEvent

Step = tuple[str, str, str, dict[str, Any]]
"""(aggregate type, aggregate id, event type, data)."""


def overlay(oid: str, name: str, vni: int | None = None) -> dict[str, Any]:
    return {"record": {"id": oid, "name": name, "vni": vni}}


APP_MAP: dict[str, Any] = {
    "application": {"id": "web", "name": "Web shop", "state": "running"},
    "networks": [
        {"id": "lan1", "name": "LAN 1", "production_overlay_id": "ovnet10", "subnet": "10.1.1.0/24"},
        {"id": "dmz", "name": "DMZ", "production_overlay_id": "ovnet11", "fence_overlay_id": "ovnet10"},
    ],
    "servers": [
        {"id": "srv1", "resource_domain": "rd1", "size": "small"},
        {"id": "srv2", "resource_domain": "rd1", "size": "large"},
    ],
    "nodes": [
        {
            "id": "web1",
            "name": "Web 1",
            "server_id": "srv1",
            "placement": "rd1",
            "deploy_priority": 10,
            "interfaces": [
                {"name": "eth0", "application_network": "lan1", "address": "10.1.1.10", "prefix_len": 24},
                {"name": "eth1", "application_network": "dmz", "boot_protocol": "dhcp", "mac": "52:54:00:00:01:10"},
            ],
        },
        {
            "id": "db1",
            "name": "Database",
            "server_id": "srv2",
            "capture_priority": 5,
            "interfaces": [{"name": "eth0", "application_network": "lan1", "address": "10.1.1.20", "mask": "24"}],
        },
    ],
    "node_pools": [{"id": "pool1", "prime_node": "web1", "min_nodes": 1, "max_nodes": 4}],
    "databases": [{"id": "orders", "node_id": "db1", "migrate_mode": "sync"}],
}

#: A history touching every aggregate type, child kinds, deletes and a saga.
HISTORY: list[Step] = [
    ("overlay", "ovnet10", event_type("overlay", "created"), overlay("ovnet10", "OVNET 10", 10)),
    ("overlay", "ovnet11", event_type("overlay", "created"), overlay("ovnet11", "OVNET 11", 11)),
    ("overlay", "ovnet12", event_type("overlay", "created"), overlay("ovnet12", "Scratch")),
    (
        "overlay",
        "ovnet10",
        event_type("overlay", "updated"),
        {"record": {**overlay("ovnet10", "OVNET ten", 10)["record"], "optimisation_policy": "min-latency"}},
    ),
    ("overlay", "ovnet12", event_type("overlay", "deleted"), {"id": "ovnet12"}),
    ("domain", "dc1", event_type("domain", "created"), {"record": {"id": "dc1", "name": "Primary DC"}}),
    (
        "domain",
        "dc1",
        event_type("vna", "created"),
        {"record": {"id": "vna1", "external_address": "192.0.2.1", "api_uri": "https://vna1.example:8443/"}},
    ),
    ("domain", "dc1", event_type("vna", "created"), {"record": {"id": "vna2", "type": "cloud-gateway"}}),
    (
        "domain",
        "dc1",
        event_type("vna", "updated"),
        {"record": {"id": "vna1", "state": "running", "external_address": "192.0.2.1"}},
    ),
    ("domain", "dc1", event_type("vna", "deleted"), {"id": "vna2"}),
    (
        "domain",
        "dc1",
        event_type("resource_domain", "created"),
        {"record": {"id": "rd1", "name": "Lab", "vendor": "lab", "kind": "private-dc"}},
    ),
    (
        "domain",
        "dc1",
        event_type("local_overlay", "created"),
        {"record": {"overlay_id": "ovnet10", "vlan_ids": [10, 20], "provide_tunnel_server": True}},
    ),
    ("domain", "dc1", event_type("domain", "updated"), {"record": {"id": "dc1", "name": "Primary data center"}}),
    ("domain", "dc2", event_type("domain", "created"), {"record": {"id": "dc2", "name": "Cloud"}}),
    ("domain", "dc2", event_type("domain", "deleted"), {"id": "dc2"}),
    ("app", "web", event_type("app", "imported"), {"map": APP_MAP}),
    ("app", "web", event_type("node", "updated"), {"record": {**APP_MAP["nodes"][1], "name": "Database server"}}),
    (
        "app",
        "web",
        event_type("app", "state_changed"),
        {"from_state": "running", "to_state": "shutting-down", "status": {"level": "warning", "detail": "maintenance"}},
    ),
    ("app", "tmp", event_type("app", "created"), {"record": {"id": "tmp", "name": "Temporary", "parent_id": "web"}}),
    ("app", "tmp", event_type("app", "deleted"), {"id": "tmp"}),
    (
        "user",
        "alice",
        event_type("user", "created"),
        {
            "record": {
                "id": "alice",
                "display_name": "Alice",
                "groups": ["ops"],
                "authorisations": ["network-read", "admin"],
            }
        },
    ),
    (
        "user",
        "alice",
        event_type("user", "updated"),
        {
            "record": {
                "id": "alice",
                "display_name": "Alice A.",
                "groups": ["ops"],
                "authorisations": ["network-read"],
                "disabled": True,
            }
        },
    ),
    ("saga", "mig1", "skyferry.v1.saga.started", {"name": "migrate-web", "plan": ["capture", "deploy"]}),
    ("saga", "mig1", "skyferry.v1.saga.step_started", {"step": "capture"}),
    ("saga", "mig1", "skyferry.v1.saga.step_completed", {"step": "capture"}),
    ("saga", "mig1", "skyferry.v1.saga.completed", {}),
    ("saga", "mig2", "skyferry.v1.saga.started", {"name": "migrate-db"}),
    ("saga", "mig2", "skyferry.v1.saga.step_compensated", {"step": "capture"}),
]


async def record(recorder: EventRecorder, steps: list[Step], actor: str = "admin") -> list[int]:
    """Append every step; returns the positions."""
    return [
        await recorder.append(agg, agg_id, NewEvent(ev_type, data, actor=actor, correlation_id=f"c-{i}"), expected=None)
        for i, (agg, agg_id, ev_type, data) in enumerate(steps)
    ]
