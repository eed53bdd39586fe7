"""Import and export of maps as YAML, JSON and XML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bus.mapio import (
    ErrorDetail,
    MapFormat,
    MapFormatError,
    MapValidationError,
    detect_format,
    dump_map,
    load_application_map,
    load_map,
    load_network_map,
)
from bus.models import SECRET_MASK, ApplicationMap, ModelError, NetworkMap

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"
FORMATS: list[MapFormat] = ["yaml", "json", "xml"]
SECRET = "s3cr3t <&> \"'"


@pytest.fixture
def sample_network() -> NetworkMap:
    return load_network_map((SAMPLES / "network-map.yaml").read_text())


@pytest.fixture
def sample_app() -> ApplicationMap:
    return load_application_map((SAMPLES / "app-3tier.yaml").read_text())


def rich_network_map() -> NetworkMap:
    creds = {"username": "admin", "secret": SECRET, "key_ref": "vault:x/y"}
    return NetworkMap.model_validate(
        {
            "overlays": [
                {
                    "id": "ovnet10",
                    "name": "OVNET 10 ✓",
                    "description": "multi\nline\r\nwith <markup> & 'quotes' \"too\"\tand tabs  ",
                    "vni": 16_777_215,
                    "optimisation_policy": "max-throughput",
                    "access_controls": [
                        {"principal": "*", "rights": ["read"]},
                        {"principal": "user:alice", "rights": ["control", "delete", "write", "read"]},
                    ],
                },
                {"id": "ovnet11", "name": "OVNET 11", "description": "", "optimisation_policy": "min-cost"},
            ],
            "domains": [
                {
                    "id": "dc1",
                    "name": "DC 1",
                    "description": "   ",
                    "vnas": [
                        {
                            "id": "vna1",
                            "type": "cloud-gateway",
                            "state": "degraded",
                            "external_address": "2001:db8::10",
                            "api_uri": "https://vna1.example.net:8443/api?v=1&x=%20",
                            "credentials": creds,
                        },
                        {"id": "vna1b"},
                    ],
                    "resource_domains": [
                        {
                            "id": "aws-eu",
                            "name": "AWS eu-west-1",
                            "vendor": "aws",
                            "kind": "public-cloud",
                            "api_uri": "https://ec2.eu-west-1.amazonaws.com",
                            "credentials": {"username": "AKIA", "secret": SECRET},
                            "vendor_attributes": {"region": "eu-west-1", "key with spaces": "", "no": "off"},
                            "access_controls": [{"principal": "group:cloud", "rights": ["write"]}],
                        }
                    ],
                    "local_overlay_networks": [
                        {
                            "overlay_id": "ovnet10",
                            "vlan_ids": [4094, 1, 10],
                            "provide_tunnel_server": True,
                            "peer_uris": ["udp://[2001:db8::20]:4789", "tcp://203.0.113.20:7000"],
                            "tunnel_mode": "vxlan",
                            "trusted": True,
                        },
                        {"overlay_id": "ovnet11", "tunnel_mode": "datagram"},
                    ],
                },
                {"id": "dc2", "name": "DC 2", "local_overlay_networks": [{"overlay_id": "ovnet10"}]},
            ],
        }
    )


def rich_application_map() -> ApplicationMap:
    return ApplicationMap.model_validate(
        {
            "application": {
                "id": "crm",
                "name": "CRM",
                "description": 'Customer <relationship> & "management"',
                "parent_id": "crm-template",
                "access_controls": [{"principal": "group:sales", "rights": ["read", "write"]}],
                "default_placement": "aws-eu",
                "state": "shutting-down",
                "status": {"level": "warning", "detail": "node web2: disk 91% full"},
                "capture_mode": "snapshot",
                "image_library": "lib",
            },
            "networks": [
                {
                    "id": "lan1",
                    "name": "LAN 1",
                    "production_overlay_id": "ovnet10",
                    "fence_overlay_id": "ovnet11",
                    "subnet": "10.1.1.0/24",
                },
                {"id": "v6", "name": "IPv6", "production_overlay_id": "ovnet12", "subnet": "2001:db8:1::/64"},
                {"id": "mgmt", "name": "Management", "production_overlay_id": "ovnet13"},
            ],
            "nodes": [
                {
                    "id": "web1",
                    "name": "Web 1",
                    "source_image": "img-web",
                    "image_sync_date": "2024-05-01T02:30:00.123456+02:00",
                    "node_pool_id": "web",
                    "placement": "aws-eu",
                    "deploy_priority": 0,
                    "capture_priority": 1000,
                    "deploy_profile": "",
                    "keep_image_after_migrate": True,
                    "interfaces": [
                        {
                            "name": "eth0",
                            "application_network": "lan1",
                            "address": "10.1.1.10",
                            "mask": "255.255.255.0",
                            "gateway": "10.1.1.1",
                            "mac": "52:54:00:AA:00:0A",
                        },
                        {
                            "name": "eth0.20",
                            "application_network": "v6",
                            "address": "2001:db8:1::10",
                            "prefix_len": 64,
                            "gateway": "2001:db8:1::1",
                        },
                        {"name": "eth1", "application_network": "mgmt", "boot_protocol": "dhcp"},
                    ],
                },
                {
                    "id": "db",
                    "name": "DB",
                    "server_id": "srv-db",
                    "deploy_profile": "<profile><lun>iqn.2024-05.example:db</lun></profile>",
                    "interfaces": [
                        {"name": "eth0", "application_network": "lan1", "address": "10.1.1.30", "prefix_len": 24}
                    ],
                },
            ],
            "node_pools": [
                {
                    "id": "web",
                    "name": "Web pool",
                    "prime_node": "web1",
                    "min_nodes": 0,
                    "max_nodes": 10,
                    "source_image": "img-web",
                    "image_sync_date": "2024-05-01T00:00:00Z",
                    "placement": "aws-eu",
                    "deploy_priority": 5,
                    "deploy_profile": "small",
                    "interfaces": [
                        {
                            "name": "eth0",
                            "application_network": "lan1",
                            "address_range": {"start": "10.1.1.100", "end": "10.1.1.200"},
                        },
                        {"name": "eth1", "application_network": "mgmt", "boot_protocol": "dhcp"},
                    ],
                }
            ],
            "databases": [
                {
                    "id": "orders",
                    "node_id": "db",
                    "migrate_mode": "external-mirror",
                    "target_location": "10.9.0.5:3260",
                },
                {"id": "cache", "node_id": "db", "migrate_mode": "sync"},
            ],
            "servers": [
                {
                    "id": "srv-db",
                    "name": "db01",
                    "resource_domain": "dc1-lab",
                    "size": "4 CPU, 16 GiB, 2x100 GB",
                    "source_image": "img-db-old",
                    "deploy_date": "2023-12-31T23:59:59-05:00",
                    "primary_mac": "52:54:00:00:00:1e",
                    "access_controls": [{"principal": "user:dba", "rights": ["control"]}],
                }
            ],
            "images": [
                {
                    "id": "img-web",
                    "name": "Web image",
                    "library_id": "lib",
                    "source_server": "srv-web-old",
                    "capture_date": "2024-05-01T00:00:00Z",
                    "capture_schedule": "0 2 * * MON-FRI",
                    "last_sync_date": "2024-05-01T06:00:00Z",
                    "sync_schedule": "*/30 * * * *",
                    "sync_options": {"exclude": "/var/tmp,/tmp", "checksum": "true"},
                    "access_controls": [{"principal": "group:sales", "rights": ["read"]}],
                }
            ],
            "image_libraries": [
                {
                    "id": "lib",
                    "name": "S3 library",
                    "location": "s3://skyferry-images/crm",
                    "credentials": {"key_ref": "aws:profile/crm", "secret": SECRET},
                    "access_controls": [{"principal": "*", "rights": ["read"]}],
                }
            ],
        }
    )


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_network_map_round_trip(sample_network: NetworkMap, fmt: MapFormat) -> None:
    text = dump_map(sample_network, fmt)
    again = load_network_map(text, fmt)
    assert again == sample_network
    assert dump_map(again, fmt) == text
    assert load_network_map(text) == sample_network  # format detected from the text


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_application_map_round_trip(sample_app: ApplicationMap, fmt: MapFormat) -> None:
    text = dump_map(sample_app, fmt)
    again = load_application_map(text, fmt)
    assert again == sample_app
    assert dump_map(again, fmt) == text


def test_samples_follow_the_reference(sample_network: NetworkMap, sample_app: ApplicationMap) -> None:
    overlay = sample_network.overlay("ovnet10")
    assert overlay.name == "OVNET 10"
    lons = [lon for d in sample_network.domains for lon in d.local_overlay_networks if lon.overlay_id == "ovnet10"]
    assert len(lons) == 2 and all(lon.vlan_ids == [10] for lon in lons)
    assert sum(lon.provide_tunnel_server for lon in lons) == 1
    assert all(len(d.vnas) == 1 and len(d.resource_domains) == 1 for d in sample_network.domains)
    addresses = {n.id: str(n.interfaces[-1].address) for n in sample_app.nodes}
    assert addresses["asw"] == "10.1.1.20" and addresses["wsw"] == "10.1.1.10"
    assert {"fw", "db"} <= set(addresses)


def test_samples_refer_to_each_other(sample_network: NetworkMap, sample_app: ApplicationMap) -> None:
    overlays = {o.id for o in sample_network.overlays}
    resource_domains = {r.id for d in sample_network.domains for r in d.resource_domains}
    for network in sample_app.networks:
        assert network.production_overlay_id in overlays
        assert network.fence_overlay_id is None or network.fence_overlay_id in overlays
    placements = [sample_app.application.default_placement] + [n.placement for n in sample_app.nodes]
    placements += [s.resource_domain for s in sample_app.servers]
    assert set(placements) <= resource_domains


@pytest.mark.parametrize("fmt", FORMATS)
def test_rich_maps_round_trip_exactly(fmt: MapFormat) -> None:
    for original in (rich_network_map(), rich_application_map()):
        text = dump_map(original, fmt, include_secrets=True)
        loaded = load_map(text, type(original), fmt)
        assert loaded == original
        assert dump_map(loaded, fmt, include_secrets=True) == text
        assert SECRET not in dump_map(original, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_secrets_are_masked_by_default(fmt: MapFormat) -> None:
    original = rich_network_map()
    text = dump_map(original, fmt)
    assert SECRET_MASK in text
    loaded = load_network_map(text, fmt)
    creds = loaded.domains[0].vnas[0].credentials
    assert creds is not None and creds.secret is None and creds.username == "admin"
    assert loaded != original
    assert dump_map(loaded, fmt) == dump_map(loaded, fmt, include_secrets=True)


def test_normalised_values_export_normalised() -> None:
    amap = rich_application_map()
    iface = amap.nodes[0].interfaces[0]
    assert iface.prefix_len == 24 and iface.mac == "52:54:00:aa:00:0a"
    data = json.loads(dump_map(amap, "json"))
    exported = data["nodes"][0]["interfaces"][0]
    assert exported["prefix_len"] == 24 and "mask" not in exported
    assert data["application"]["access_controls"][0]["rights"] == ["read", "write"]
    assert "parent_id" not in data["nodes"][0]  # None is omitted in every format


def test_xml_layout(sample_app: ApplicationMap) -> None:
    text = dump_map(sample_app, "xml")
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<application-map>')
    assert "<node-pools>\n    <node-pool>" in text
    assert "<vendor-attributes>" not in text
    assert '<entry key="exclude">/var/tmp</entry>' in text
    assert "<item>read</item>" in text
    net_text = dump_map(rich_network_map(), "xml")
    assert '<entry key="key with spaces" />' in net_text
    assert "<vna>" in net_text and "<network-domain>" in net_text


def test_xml_accepts_any_field_order() -> None:
    text = """<network-map><overlays><overlay-network>
        <name>One</name><optimisation-policy>min-cost</optimisation-policy><id>o1</id>
    </overlay-network></overlays></network-map>"""
    nmap = load_network_map(text, "xml")
    assert nmap.overlays[0].id == "o1" and nmap.overlays[0].optimisation_policy == "min-cost"


def test_yaml_reads_hand_written_values_as_strings() -> None:
    text = """
domains:
  - id: dc1
    name: DC 1
    resource_domains:
      - id: rd
        name: rd
        vendor: lab
        kind: physical
        vendor_attributes: {autostart: no, mac: 52:54:00:00:01:0a, octal: 010}
"""
    attrs = load_network_map(text).domains[0].resource_domains[0].vendor_attributes
    assert attrs == {"autostart": "no", "mac": "52:54:00:00:01:0a", "octal": "010"}


TRICKY_STRINGS = [
    "no",
    "on",
    "Off",
    "1e3",
    "1.5e3",
    "010",
    "0x1f",
    "1_000",
    "1:30",
    "~",
    "null",
    "",
    "true",
    "3.",
    ".inf",
    "2024-01-01",
    "2024-01-01T00:00:00Z",
    "@x",
    "- a",
    "a: b",
    "#c",
    "'q'",
    " lead",
    "*ref",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_tricky_strings_stay_strings(fmt: MapFormat) -> None:
    attributes = {f"k{i}": value for i, value in enumerate(TRICKY_STRINGS)}
    nmap = NetworkMap.model_validate(
        {
            "domains": [
                {
                    "id": "d",
                    "name": "d",
                    "resource_domains": [
                        {"id": "r", "name": "r", "vendor": "lab", "kind": "physical", "vendor_attributes": attributes}
                    ],
                }
            ]
        }
    )
    text = dump_map(nmap, fmt)
    assert load_network_map(text, fmt) == nmap
    assert dump_map(load_network_map(text, fmt), fmt) == text


def test_load_sniffs_text_not_file_names() -> None:
    assert load_network_map("overlays: []  # see map.xml") == NetworkMap()


def test_yaml_unquoted_mac_in_application_map() -> None:
    text = """
application: {id: a, name: A}
servers:
  - {id: s, resource_domain: rd, size: small, primary_mac: 52:54:00:00:01:0a}
"""
    assert load_application_map(text).servers[0].primary_mac == "52:54:00:00:01:0a"


# --- format detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fmt"),
    [
        ("map.yaml", "yaml"),
        ("MAP.YML", "yaml"),
        ("/etc/skyferry/app.json", "json"),
        ("app.xml", "xml"),
        (Path("maps/app-3tier.yaml"), "yaml"),
        ('{"overlays": []}', "json"),
        ("\ufeff  <network-map/>", "xml"),
        ("<?xml version='1.0'?>\n<network-map/>", "xml"),
        ("overlays: []\n", "yaml"),
        ("[]", "json"),
    ],
)
def test_detect_format(value: str | Path, fmt: MapFormat) -> None:
    assert detect_format(value) == fmt


def test_detect_format_unknown_path() -> None:
    with pytest.raises(MapFormatError, match="cannot tell"):
        detect_format(Path("map.txt"))


# --- malformed text ------------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<network-map><overlays>&lol2;</overlays></network-map>"""


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("overlays: [1, 2\n", "yaml", "invalid YAML at line"),
        ("overlays:\n\t- id: x\n", "yaml", "invalid YAML"),
        ("a: &x [1]\nb: *x\n", "yaml", "aliases are not allowed"),
        ("overlays: []\noverlays: []\n", "yaml", "duplicate key 'overlays'"),
        ("---\na: 1\n---\nb: 2\n", "yaml", "invalid YAML"),
        ('{"overlays": [],}', "json", "invalid JSON at line 1"),
        ('{"overlays": [], "overlays": []}', "json", "duplicate key"),
        ("<network-map><overlays></network-map>", "xml", "invalid XML at line 1"),
        ("<network-map>", "xml", "invalid XML"),
        (BILLION_LAUGHS, "xml", "DOCTYPE"),
        ('<!DOCTYPE network-map SYSTEM "file:///etc/passwd"><network-map/>', "xml", "DOCTYPE"),
        ("", "yaml", "empty"),
        ("  \n", "json", "empty"),
        ("overlays: []", "json", "invalid JSON"),
        ('{"overlays": []}', "xml", "invalid XML"),
    ],
)
def test_malformed_text(text: str, fmt: MapFormat, message: str) -> None:
    with pytest.raises(MapFormatError, match=message) as exc:
        load_network_map(text, fmt)
    assert isinstance(exc.value, ModelError) and isinstance(exc.value, ValueError)


def test_unrepresentable_xml_characters() -> None:
    nmap = NetworkMap.model_validate({"overlays": [{"id": "o", "name": "o", "description": "bell\x07"}]})
    with pytest.raises(MapFormatError, match="XML cannot represent"):
        dump_map(nmap, "xml")
    assert load_network_map(dump_map(nmap, "json")) == nmap


# --- schema violations ---------------------------------------------------------------------------


def paths(exc: pytest.ExceptionInfo[MapValidationError]) -> list[str]:
    return [error.path for error in exc.value.errors]


BAD_VLAN_YAML = """
overlays: [{id: o, name: o}]
domains:
  - id: dc1
    name: DC 1
    local_overlay_networks:
      - overlay_id: o
        vlan_ids: [10, 4095]
"""


def test_yaml_schema_violation_has_locations() -> None:
    with pytest.raises(MapValidationError) as exc:
        load_network_map(BAD_VLAN_YAML)
    assert paths(exc) == ["domains.0.local_overlay_networks.0.vlan_ids.1"]
    assert exc.value.errors[0].location == ("domains", 0, "local_overlay_networks", 0, "vlan_ids", 1)
    assert "4094" in exc.value.errors[0].message
    assert "domains.0.local_overlay_networks.0.vlan_ids.1" in str(exc.value)
    assert isinstance(exc.value, ModelError)


def test_json_schema_violations_list_every_error() -> None:
    data: dict[str, Any] = {
        "overlays": [{"id": "bad id", "name": "o", "colour": "red"}],
        "domains": [{"id": "dc1"}],
    }
    with pytest.raises(MapValidationError) as exc:
        load_network_map(json.dumps(data), "json")
    assert sorted(paths(exc)) == ["domains.0.name", "overlays.0.colour", "overlays.0.id"]
    assert {e.type for e in exc.value.errors} == {"missing", "extra_forbidden", "string_pattern_mismatch"}


def test_cross_record_violation_is_reported() -> None:
    text = json.dumps({"domains": [{"id": "dc1", "name": "x", "local_overlay_networks": [{"overlay_id": "ghost"}]}]})
    with pytest.raises(MapValidationError, match="unknown overlays: dc1/ghost") as exc:
        load_network_map(text)
    assert paths(exc) == ["(root)"]


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(MapValidationError):
        load_network_map("- a\n- b\n", "yaml")
    with pytest.raises(MapValidationError):
        load_application_map("just text", "yaml")


@pytest.mark.parametrize(
    ("xml", "path", "message"),
    [
        ("<network-map><colour>red</colour></network-map>", "colour", "Extra inputs"),
        (
            "<network-map><overlays><overlay><id>o</id><name>o</name></overlay></overlays></network-map>",
            "overlays.0",
            "expected <overlay-network>, found <overlay>",
        ),
        ("<network-map><overlays/><overlays/></network-map>", "overlays", "more than once"),
        (
            '<network-map><overlays><overlay-network id="x"><id>o</id><name>o</name></overlay-network>'
            "</overlays></network-map>",
            "overlays.0",
            "unexpected attributes",
        ),
        (
            "<network-map><overlays><overlay-network><id>o</id><name>o<b/></name></overlay-network>"
            "</overlays></network-map>",
            "overlays.0.name",
            "expected a plain value",
        ),
        ("<network-map>stray text<overlays/></network-map>", "(root)", "unexpected text"),
        (
            "<network-map><overlays><overlay-network><id>o</id><name>o</name><vni>ten</vni>"
            "</overlay-network></overlays></network-map>",
            "overlays.0.vni",
            "valid integer",
        ),
        ("<application-map/>", "(root)", "expected <network-map>"),
    ],
)
def test_xml_schema_violations(xml: str, path: str, message: str) -> None:
    with pytest.raises(MapValidationError) as exc:
        load_network_map(xml, "xml")
    assert path in paths(exc)
    assert message in str(exc.value)


def test_xml_dict_entries_are_checked() -> None:
    def domain_xml(attributes: str) -> str:
        return (
            "<network-map><domains><network-domain><id>d</id><name>d</name><resource-domains>"
            "<resource-domain><id>r</id><name>r</name><vendor>lab</vendor><kind>physical</kind>"
            f"<vendor-attributes>{attributes}</vendor-attributes></resource-domain>"
            "</resource-domains></network-domain></domains></network-map>"
        )

    ok = load_network_map(domain_xml('<entry key="a">1</entry><entry key="b"/>'), "xml")
    assert ok.domains[0].resource_domains[0].vendor_attributes == {"a": "1", "b": ""}
    where = "domains.0.resource_domains.0.vendor_attributes"
    with pytest.raises(MapValidationError) as exc:
        load_network_map(domain_xml('<entry key="a">1</entry><entry key="a">2</entry>'), "xml")
    assert paths(exc) == [f"{where}.a"]
    with pytest.raises(MapValidationError) as exc:
        load_network_map(domain_xml("<entry>1</entry>"), "xml")
    assert paths(exc) == [where]
    with pytest.raises(MapValidationError) as exc:
        load_network_map(domain_xml('<item key="a">1</item>'), "xml")
    assert paths(exc) == [where]


def test_map_validation_error_from_details() -> None:
    error = MapValidationError([ErrorDetail(("a", 0, "b"), "broken")], what="network-map")
    assert error.errors[0].path == "a.0.b"
    assert str(error).startswith("network-map is invalid (1 error(s))")
