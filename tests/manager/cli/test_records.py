"""Overlays and domains through the CLI against a real stack."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.manager.cli.conftest import Sf
from tests.manager.cli.helpers import as_json, failed, ok


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_overlay_round_trip(sf: Sf) -> None:
    ov = _id("ov")
    ok(sf("overlay", "create", "--id", ov, "--name", f"Overlay {ov}", "--set", "vni=4000", "--set", "description=x"))
    shown = as_json(sf("-o", "json", "overlay", "show", ov))
    assert shown["record"] == {
        "id": ov,
        "name": f"Overlay {ov}",
        "description": "x",
        "vni": 4000,
        "optimisation_policy": "balanced",
        "access_controls": [],
    }
    # --set name=123 parses as JSON 123, is retried as text for a string field.
    ok(sf("overlay", "update", ov, "--set", "name=123", "--set", "optimisation_policy=min-cost"))
    listed = as_json(sf("-o", "json", "overlay", "list"))
    mine = [i["record"] for i in listed if i["aggregate_id"] == ov]
    assert mine[0]["name"] == "123" and mine[0]["optimisation_policy"] == "min-cost"
    deleted = as_json(sf("-o", "json", "overlay", "delete", ov))
    assert deleted["event_type"] == "skyferry.v1.evt.overlay.deleted"
    failed(sf("overlay", "show", ov), 4, "not_found")


def test_domain_with_vna_resource_and_join(sf: Sf, tmp_path: Path) -> None:
    ov, dom = _id("ov"), _id("dom")
    ok(sf("overlay", "create", "--id", ov, "--name", ov))
    spec = tmp_path / "domain.yaml"
    spec.write_text(f"id: {dom}\nname: Domain {dom}\ndescription: from a file\n")
    ok(sf("domain", "create", "-f", str(spec)))
    ok(sf("domain", "vna", "add", dom, "--id", f"{dom}-v1", "--set", "external_address=192.0.2.7"))
    ok(sf("domain", "vna", "update", dom, f"{dom}-v1", "--set", "state=running"))
    rd = ["--id", f"{dom}-r1", "--name", "lab", "--set", "vendor=lab", "--set", "kind=private-dc"]
    ok(sf("domain", "resource", "add", dom, *rd, "--set", "vendor_attributes.bridge=br0"))
    ok(sf("domain", "join", dom, ov, "--vlan", "10", "--vlan", "11", "--tunnel-server", "--trusted"))

    record = as_json(sf("-o", "json", "domain", "show", dom))["record"]
    assert record["description"] == "from a file"
    assert [(v["id"], v["state"], v["external_address"]) for v in record["vnas"]] == [
        (f"{dom}-v1", "running", "192.0.2.7")
    ]
    assert record["resource_domains"][0]["vendor_attributes"] == {"bridge": "br0"}
    assert record["local_overlay_networks"] == [
        {
            "overlay_id": ov,
            "vlan_ids": [10, 11],
            "provide_tunnel_server": True,
            "peer_uris": [],
            "tunnel_mode": "stream",
            "trusted": True,
        }
    ]
    ok(sf("domain", "update", dom, "--name", "Renamed"))  # children survive a root update
    assert len(as_json(sf("-o", "json", "domain", "vna", "list", dom))) == 1

    # An overlay still joined cannot be deleted; leave first.
    failed(sf("overlay", "delete", ov), 2, "validation")
    ok(sf("domain", "leave", dom, ov))
    ok(sf("domain", "vna", "remove", dom, f"{dom}-v1"))
    ok(sf("domain", "resource", "remove", dom, f"{dom}-r1"))
    ok(sf("domain", "delete", dom))
    ok(sf("overlay", "delete", ov))


def test_invalid_input_is_a_usage_error(sf: Sf, tmp_path: Path) -> None:
    line = failed(sf("overlay", "create", "--id", "bad id", "--name", "x"), 2, "validation")
    assert "id" in line
    failed(sf("overlay", "create", "--name", "x", "--set", "novalue"), 2, "bad_request")
    broken = tmp_path / "net.yaml"
    broken.write_text("overlays:\n  - id: a\n    name: A\n  - id: a\n    name: B\n")
    failed(sf("netmap", "import", str(broken)), 2, "validation")
    failed(sf("netmap", "import", str(tmp_path / "missing.yaml")), 2, "bad_request")
