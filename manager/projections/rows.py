"""Pure mapping from a root's folded state (JSON form) to relational rows.

Sans-IO: given the state of one root, return every row it owns, per table.
The projector deletes a root's rows and inserts these, so the mapping needs
no diffing and is trivially consistent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Table

from bus.kinds import Aggregate
from manager.projections import tables as t

Row = dict[str, Any]
Rows = dict[Table, list[Row]]

#: For each aggregate type, the tables holding its rows and the column naming the root.
OWNED: dict[Aggregate, tuple[tuple[Table, Column[Any]], ...]] = {
    Aggregate.OVERLAY: ((t.overlays, t.overlays.c.id),),
    Aggregate.DOMAIN: (
        (t.network_domains, t.network_domains.c.id),
        (t.vnas, t.vnas.c.domain_id),
        (t.resource_domains, t.resource_domains.c.domain_id),
        (t.local_overlay_networks, t.local_overlay_networks.c.domain_id),
    ),
    Aggregate.APP: (
        (t.applications, t.applications.c.id),
        (t.nodes, t.nodes.c.app_id),
        (t.node_interfaces, t.node_interfaces.c.app_id),
        (t.node_pools, t.node_pools.c.app_id),
        (t.application_networks, t.application_networks.c.app_id),
        (t.databases, t.databases.c.app_id),
    ),
    Aggregate.USER: ((t.users, t.users.c.id),),
    Aggregate.SAGA: ((t.sagas, t.sagas.c.id),),
}


def _overlay(s: dict[str, Any], version: int, _: dt.datetime) -> Rows:
    return {
        t.overlays: [
            {
                "id": s["id"],
                "name": s["name"],
                "description": s.get("description", ""),
                "vni": s.get("vni"),
                "optimisation_policy": s["optimisation_policy"],
                "version": version,
            }
        ]
    }


def _domain(s: dict[str, Any], version: int, _: dt.datetime) -> Rows:
    d = s["id"]
    return {
        t.network_domains: [{"id": d, "name": s["name"], "description": s.get("description", ""), "version": version}],
        t.vnas: [
            {
                "domain_id": d,
                "id": v["id"],
                "type": v["type"],
                "state": v["state"],
                "external_address": v.get("external_address"),
                "api_uri": v.get("api_uri"),
            }
            for v in s.get("vnas", [])
        ],
        t.resource_domains: [
            {
                "domain_id": d,
                "id": r["id"],
                "name": r["name"],
                "vendor": r["vendor"],
                "kind": r["kind"],
                "api_uri": r.get("api_uri"),
            }
            for r in s.get("resource_domains", [])
        ],
        t.local_overlay_networks: [
            {
                "domain_id": d,
                "overlay_id": lon["overlay_id"],
                "vlan_ids": list(lon.get("vlan_ids", [])),
                "provide_tunnel_server": bool(lon.get("provide_tunnel_server", False)),
                "tunnel_mode": lon["tunnel_mode"],
                "trusted": bool(lon.get("trusted", False)),
            }
            for lon in s.get("local_overlay_networks", [])
        ],
    }


def _node_row(app_id: str, n: dict[str, Any]) -> Row:
    return {
        "app_id": app_id,
        "id": n["id"],
        "name": n["name"],
        "server_id": n.get("server_id"),
        "source_image": n.get("source_image"),
        "node_pool_id": n.get("node_pool_id"),
        "placement": n.get("placement"),
        "deploy_priority": n["deploy_priority"],
        "capture_priority": n["capture_priority"],
    }


def _interface_rows(app_id: str, n: dict[str, Any]) -> list[Row]:
    return [
        {
            "app_id": app_id,
            "node_id": n["id"],
            "name": i["name"],
            "application_network": i["application_network"],
            "boot_protocol": i["boot_protocol"],
            "address": i.get("address"),
            "prefix_len": i.get("prefix_len"),
            "gateway": i.get("gateway"),
            "mac": i.get("mac"),
        }
        for i in n.get("interfaces", [])
    ]


def _app(s: dict[str, Any], version: int, _: dt.datetime) -> Rows:
    app = s["application"]
    a = app["id"]
    status = app.get("status") or {}
    return {
        t.applications: [
            {
                "id": a,
                "name": app["name"],
                "state": app["state"],
                "status_level": status.get("level", "ok"),
                "status_detail": status.get("detail", ""),
                "parent_id": app.get("parent_id"),
                "version": version,
            }
        ],
        t.nodes: [_node_row(a, n) for n in s.get("nodes", [])],
        t.node_interfaces: [row for n in s.get("nodes", []) for row in _interface_rows(a, n)],
        t.node_pools: [
            {
                "app_id": a,
                "id": p["id"],
                "name": p.get("name"),
                "prime_node": p["prime_node"],
                "min_nodes": p["min_nodes"],
                "max_nodes": p["max_nodes"],
                "source_image": p.get("source_image"),
                "placement": p.get("placement"),
                "deploy_priority": p["deploy_priority"],
            }
            for p in s.get("node_pools", [])
        ],
        t.application_networks: [
            {
                "app_id": a,
                "id": n["id"],
                "name": n["name"],
                "production_overlay_id": n["production_overlay_id"],
                "fence_overlay_id": n.get("fence_overlay_id"),
                "subnet": n.get("subnet"),
            }
            for n in s.get("networks", [])
        ],
        t.databases: [
            {
                "app_id": a,
                "id": db["id"],
                "node_id": db["node_id"],
                "migrate_mode": db["migrate_mode"],
                "target_location": db.get("target_location"),
            }
            for db in s.get("databases", [])
        ],
    }


def _user(s: dict[str, Any], version: int, _: dt.datetime) -> Rows:
    return {
        t.users: [
            {
                "id": s["id"],
                "display_name": s.get("display_name", ""),
                "groups": list(s.get("groups", [])),
                "authorisations": list(s.get("authorisations", [])),
                "disabled": bool(s.get("disabled", False)),
                "version": version,
            }
        ]
    }


def _saga(s: dict[str, Any], version: int, at: dt.datetime) -> Rows:
    return {
        t.sagas: [
            {
                "id": s["id"],
                "name": s.get("name"),
                "status": s["status"],
                "last_event_type": s["last_event_type"],
                "version": version,
                "updated_at": at,
            }
        ]
    }


_BUILDERS: dict[Aggregate, Callable[[dict[str, Any], int, dt.datetime], Rows]] = {
    Aggregate.OVERLAY: _overlay,
    Aggregate.DOMAIN: _domain,
    Aggregate.APP: _app,
    Aggregate.USER: _user,
    Aggregate.SAGA: _saga,
}


def rows_for(aggregate: Aggregate, state: dict[str, Any] | None, version: int, updated_at: dt.datetime) -> Rows:
    """Every relational row a root owns (none once it is deleted).

    Args:
        aggregate: the root's type.
        state: its folded state in JSON form (``None``: absent or deleted).
        version: position of its last event.
        updated_at: timestamp of its last event (not wall-clock time, so a rebuild gives identical rows).
    """
    if state is None:
        return {}
    return _BUILDERS[aggregate](state, version, updated_at)
