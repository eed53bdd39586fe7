"""Application maps through the CLI: import, export (XML equals the input), life cycle, sub-records."""

from __future__ import annotations

from pathlib import Path

from bus.mapio import load_application_map
from manager.cli.stack import APP_SAMPLE, NETWORK_SAMPLE, samples_dir
from tests.manager.cli.conftest import Sf
from tests.manager.cli.helpers import as_json, failed, ok


def test_app_import_export_and_life_cycle(sf: Sf, tmp_path: Path) -> None:
    samples = samples_dir()
    ok(sf("netmap", "import", str(samples / NETWORK_SAMPLE)))  # the app's networks refer to its overlays
    ok(sf("app", "import", str(samples / APP_SAMPLE), "--replace"))
    failed(sf("app", "import", str(samples / APP_SAMPLE)), 4, "already_exists")

    xml = tmp_path / "app.xml"
    ok(sf("app", "export", "app-3tier", "--out", str(xml)))
    assert xml.read_text().startswith("<?xml")
    original = load_application_map((samples / APP_SAMPLE).read_text())
    assert load_application_map(xml.read_text()) == original
    as_yaml = ok(sf("app", "export", "app-3tier", "-f", "yaml")).stdout
    assert load_application_map(as_yaml) == original

    imported_at = as_json(sf("-o", "json", "app", "show", "app-3tier"))["version"]
    ok(sf("app", "state", "app-3tier", "shutting-down"))
    failed(sf("app", "state", "app-3tier", "running"), 4, "invalid_state")
    ok(sf("app", "state", "app-3tier", "off", "--level", "warning", "--detail", "maintenance"))
    app = as_json(sf("-o", "json", "app", "show", "app-3tier"))["map"]["application"]
    assert app["state"] == "off" and app["status"] == {"level": "warning", "detail": "maintenance"}
    then = as_json(sf("-o", "json", "app", "show", "app-3tier", "--as-of-position", str(imported_at)))
    assert then["map"]["application"]["state"] == "running"

    net = ["--id", "lan9", "--name", "LAN 9", "--set", "production_overlay_id=ovnet11"]
    ok(sf("app", "network", "add", "app-3tier", *net))
    node = ["--id", "web9", "--name", "Web 9", "--set", "source_image=img-db"]
    iface = '[{"name":"eth0","application_network":"lan9","boot_protocol":"dhcp"}]'
    ok(sf("app", "node", "add", "app-3tier", *node, "--set", f"interfaces={iface}"))
    nodes = as_json(sf("-o", "json", "app", "node", "list", "app-3tier"))
    assert "web9" in [n["record"]["id"] for n in nodes]
    failed(sf("app", "network", "remove", "app-3tier", "lan9"), 2, "validation")  # node web9 still uses it
    ok(sf("app", "node", "remove", "app-3tier", "web9"))
    ok(sf("app", "network", "remove", "app-3tier", "lan9"))
    listed = as_json(sf("-o", "json", "app", "list"))
    assert [a["record"]["state"] for a in listed if a["aggregate_id"] == "app-3tier"] == ["off"]
    table = ok(sf("app", "show", "app-3tier")).stdout
    assert "Nodes and interfaces" in table and "10.1.1.20/24" in table
