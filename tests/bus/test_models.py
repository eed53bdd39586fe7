"""Validators of the Skyferry data model."""

from __future__ import annotations

import base64
import itertools
import json
import types
import typing
from datetime import UTC, datetime
from typing import Any

import nkeys
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

import bus.models as models
from bus.models import (
    ALLOWED_TRANSITIONS,
    VNA,
    AccessControlEntry,
    AddressRange,
    Application,
    ApplicationMap,
    ApplicationNetwork,
    ApplicationState,
    Authorisation,
    Cidr,
    Credentials,
    CronSchedule,
    Database,
    Id,
    Image,
    InvalidTransition,
    LocalOverlayNetwork,
    MacAddress,
    ModelError,
    Name,
    NetworkDomain,
    NetworkInterface,
    NetworkMap,
    Node,
    NodePool,
    NodePoolInterface,
    OverlayNetwork,
    ResourceDomain,
    Right,
    Server,
    Status,
    StatusLevel,
    Uri,
    UserAccount,
    can_transition,
    check_transition,
)

S = ApplicationState


def user_key(seed_byte: int = 7, prefix: int = nkeys.PREFIX_BYTE_USER) -> str:
    seed = nkeys.encode_seed(bytes([seed_byte]) * 32, prefix)
    return str(nkeys.from_seed(seed).public_key.decode())


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.value.errors())


# --- common types --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "ovnet10", "dc1-lab", "A_b-9", "x" * 64, "0"])
def test_id_valid(value: str) -> None:
    assert TypeAdapter(Id).validate_python(value) == value


@pytest.mark.parametrize("value", ["", "a.b", "a b", "a*", "a>", "-a", "_a", "x" * 65, "é", "a/b"])
def test_id_invalid(value: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Id).validate_python(value)


def test_name_is_stripped_and_bounded() -> None:
    adapter = TypeAdapter(Name)
    assert adapter.validate_python("  LAN 1 ") == "LAN 1"
    for bad in ["", "   ", "x" * 129]:
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("52:54:00:AB:cd:EF", "52:54:00:ab:cd:ef"),
        ("52-54-00-ab-cd-ef", "52:54:00:ab:cd:ef"),
        ("01:00:5e:00:00:01", "01:00:5e:00:00:01"),
    ],
)
def test_mac_normalised(raw: str, normal: str) -> None:
    assert TypeAdapter(MacAddress).validate_python(raw) == normal


@pytest.mark.parametrize(
    "raw", ["52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "52:54-00:ab:cd:ef", "5254.00ab.cdef", "zz:54:00:ab:cd:ef", ""]
)
def test_mac_invalid(raw: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(MacAddress).validate_python(raw)


def test_unicast_mac_rejects_multicast() -> None:
    with pytest.raises(ValidationError, match="multicast"):
        Server(id="s", resource_domain="rd", size="small", primary_mac="01:00:5e:00:00:01")
    assert Server(id="s", resource_domain="rd", size="small", primary_mac="02:00:00:00:00:01").primary_mac


def test_cidr_host_bits_error_is_clear() -> None:
    with pytest.raises(ValidationError, match=r"host bits set; did you mean 10\.1\.1\.0/24"):
        TypeAdapter(Cidr).validate_python("10.1.1.5/24")
    assert str(TypeAdapter(Cidr).validate_python("10.1.1.0/24")) == "10.1.1.0/24"
    assert str(TypeAdapter(Cidr).validate_python("2001:db8::/64")) == "2001:db8::/64"
    for bad in ["10.1.1.0/33", "banana", "10.1.1/24x"]:
        with pytest.raises(ValidationError):
            TypeAdapter(Cidr).validate_python(bad)


@pytest.mark.parametrize(
    "uri",
    [
        "nats://vna1.example.net:4222",
        "https://vcenter.example.com/sdk?x=1#frag",
        "tcp://203.0.113.20:7000",
        "udp://[2001:db8::1]:4789",
        "ssh://root@10.0.0.5:22/",
        "s3://images/library-1",
        "file:///var/lib/skyferry/images",
        "NATS://Host:4222",
    ],
)
def test_uri_valid_and_exact(uri: str) -> None:
    assert TypeAdapter(Uri).validate_python(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com",
        "nats:/host",
        "nats://",
        "tcp://host:99999",
        "tcp://host:port",
        "file://",
        "nats://host name",
        "vna1:4222",
        "",
    ],
)
def test_uri_invalid(uri: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Uri).validate_python(uri)


@pytest.mark.parametrize(
    "cron", ["30 2 * * 1-5", "*/15 * * * *", "0 0 1 JAN,jul SUN", "0-59/5 0-23 1-31 1-12 0-7", "5 4 * * sun"]
)
def test_cron_valid(cron: str) -> None:
    assert TypeAdapter(CronSchedule).validate_python(cron) == cron


@pytest.mark.parametrize(
    "cron",
    ["60 * * * *", "* * * *", "* * * * * *", "5-1 * * * *", "*/0 * * * *", "0 0 0 * *", "x * * * *", "0 0 * 13 *", ""],
)
def test_cron_invalid(cron: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(CronSchedule).validate_python(cron)


@pytest.mark.parametrize("principal", ["user:bob", "group:net-ops", "*"])
def test_access_control_principals(principal: str) -> None:
    entry = AccessControlEntry(principal=principal, rights={Right.READ})
    assert entry.principal == principal


@pytest.mark.parametrize("principal", ["bob", "user:", "role:x", "user:a.b", "**", "group:*"])
def test_access_control_bad_principal(principal: str) -> None:
    with pytest.raises(ValidationError):
        AccessControlEntry(principal=principal, rights={Right.READ})


def test_access_control_rights() -> None:
    with pytest.raises(ValidationError):
        AccessControlEntry(principal="*", rights=set())
    with pytest.raises(ValidationError):
        AccessControlEntry.model_validate({"principal": "*", "rights": ["read", "fly"]})
    entry = AccessControlEntry.model_validate({"principal": "*", "rights": ["control", "read", "read"]})
    assert entry.rights == {Right.READ, Right.CONTROL}
    assert entry.model_dump(mode="json")["rights"] == ["read", "control"]


def test_access_controls_unique_principals() -> None:
    entry = {"principal": "user:bob", "rights": ["read"]}
    with pytest.raises(ValidationError, match="duplicate access control principal"):
        OverlayNetwork.model_validate({"id": "o", "name": "o", "access_controls": [entry, entry]})


def test_credentials_secret_masking() -> None:
    creds = Credentials(username="admin", secret="hunter2", key_ref="vault:x")
    assert "hunter2" not in repr(creds)
    assert creds.model_dump(mode="json")["secret"] == "**********"
    assert creds.model_dump(mode="json", context={"include_secrets": True})["secret"] == "hunter2"
    assert Credentials.model_validate({"secret": "**********"}).secret is None


def test_status_defaults_and_levels() -> None:
    assert Status().level is StatusLevel.OK
    assert Status(level="error", detail="disk full").detail == "disk full"
    with pytest.raises(ValidationError):
        Status(level="fatal")


def test_records_forbid_extra_fields_and_validate_assignment() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        OverlayNetwork.model_validate({"id": "o", "name": "o", "colour": "blue"})
    lon = LocalOverlayNetwork(overlay_id="o", vlan_ids=[10])
    with pytest.raises(ValidationError):
        lon.vlan_ids = [4095]
    with pytest.raises(ValidationError):
        lon.overlay_id = "bad.id"


def test_model_error_hierarchy() -> None:
    assert issubclass(ModelError, ValueError)
    assert issubclass(InvalidTransition, ModelError)


# --- network map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vlan", [0, 4095, -1])
def test_vlan_out_of_range(vlan: int) -> None:
    with pytest.raises(ValidationError):
        LocalOverlayNetwork(overlay_id="o", vlan_ids=[vlan])


def test_vlan_bounds_accepted() -> None:
    assert LocalOverlayNetwork(overlay_id="o", vlan_ids=[1, 4094]).vlan_ids == [1, 4094]


def test_local_overlay_unique_vlans_and_peers() -> None:
    with pytest.raises(ValidationError, match="duplicate VLAN id"):
        LocalOverlayNetwork(overlay_id="o", vlan_ids=[10, 10])
    with pytest.raises(ValidationError, match="duplicate peer URI"):
        LocalOverlayNetwork(overlay_id="o", peer_uris=["tcp://a:1", "tcp://a:1"])
    with pytest.raises(ValidationError):
        LocalOverlayNetwork(overlay_id="o", tunnel_mode="carrier-pigeon")
    assert LocalOverlayNetwork(overlay_id="o").tunnel_mode == "stream"


def test_overlay_vni_bounds() -> None:
    assert OverlayNetwork(id="o", name="o", vni=16_777_215).vni == 16_777_215
    for vni in (0, 16_777_216):
        with pytest.raises(ValidationError):
            OverlayNetwork(id="o", name="o", vni=vni)


def test_vna_fields() -> None:
    vna = VNA(id="vna1", external_address="198.51.100.10", api_uri="nats://10.0.0.1:4222")
    assert vna.state == "planned"
    with pytest.raises(ValidationError):
        VNA(id="vna1", external_address="198.51.100.300")
    with pytest.raises(ValidationError):
        VNA(id="vna1", state="exploded")


def test_resource_domain_enums() -> None:
    rd = ResourceDomain(id="rd", name="rd", vendor="aws", kind="public-cloud", vendor_attributes={"region": "x"})
    assert rd.vendor == "aws"
    with pytest.raises(ValidationError):
        ResourceDomain(id="rd", name="rd", vendor="ibm", kind="public-cloud")


def domain(did: str = "dc1", **extra: Any) -> dict[str, Any]:
    return {"id": did, "name": f"Domain {did}", **extra}


def test_network_domain_duplicates() -> None:
    rd = {"id": "rd1", "name": "pool", "vendor": "lab", "kind": "physical"}
    cases: list[tuple[dict[str, Any], str]] = [
        (domain(vnas=[{"id": "v"}, {"id": "v"}]), "duplicate VNA id"),
        (domain(resource_domains=[rd, {**rd, "name": "other"}]), "duplicate resource domain id"),
        (domain(resource_domains=[rd, {**rd, "id": "rd2"}]), "duplicate resource domain name"),
        (
            domain(local_overlay_networks=[{"overlay_id": "o"}, {"overlay_id": "o"}]),
            "duplicate local overlay network",
        ),
        (
            domain(
                local_overlay_networks=[{"overlay_id": "o", "vlan_ids": [10]}, {"overlay_id": "p", "vlan_ids": [10]}]
            ),
            "VLAN joined to more than one overlay",
        ),
    ]
    for data, message in cases:
        with pytest.raises(ValidationError, match=message):
            NetworkDomain.model_validate(data)


def network_map(**extra: Any) -> dict[str, Any]:
    return {
        "overlays": [{"id": "o1", "name": "One", "vni": 1}, {"id": "o2", "name": "Two", "vni": 2}],
        "domains": [
            domain("dc1", local_overlay_networks=[{"overlay_id": "o1"}], vnas=[{"id": "v1"}]),
            domain("dc2", local_overlay_networks=[{"overlay_id": "o2"}], vnas=[{"id": "v2"}]),
        ],
        **extra,
    }


def test_network_map_valid_and_lookups() -> None:
    nmap = NetworkMap.model_validate(network_map())
    assert nmap.overlay("o2").name == "Two"
    assert nmap.domain("dc1").vnas[0].id == "v1"
    with pytest.raises(KeyError):
        nmap.overlay("nope")
    with pytest.raises(KeyError):
        nmap.domain("nope")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"overlays": [{"id": "o1", "name": "One"}, {"id": "o1", "name": "Uno"}]}, "duplicate overlay id"),
        ({"overlays": [{"id": "o1", "name": "One"}, {"id": "o2", "name": "One"}]}, "duplicate overlay name"),
        (
            {"overlays": [{"id": "o1", "name": "1", "vni": 5}, {"id": "o2", "name": "2", "vni": 5}]},
            "duplicate overlay VNI",
        ),
        ({"domains": [domain("dc1"), domain("dc1")]}, "duplicate network domain id"),
        ({"domains": [domain("dc1", name="X"), domain("dc2", name="X")]}, "duplicate network domain name"),
        ({"domains": [domain("dc1", vnas=[{"id": "v"}]), domain("dc2", vnas=[{"id": "v"}])]}, "duplicate VNA id"),
        (
            {
                "domains": [
                    domain("dc1", resource_domains=[{"id": "r", "name": "a", "vendor": "lab", "kind": "physical"}]),
                    domain("dc2", resource_domains=[{"id": "r", "name": "b", "vendor": "lab", "kind": "physical"}]),
                ]
            },
            "duplicate resource domain id",
        ),
        ({"domains": [domain("dc1", local_overlay_networks=[{"overlay_id": "ghost"}])]}, "unknown overlays: dc1/ghost"),
    ],
)
def test_network_map_invalid(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NetworkMap.model_validate(network_map(**change))


def test_network_map_assignment_revalidates() -> None:
    nmap = NetworkMap.model_validate(network_map())
    with pytest.raises(ValidationError, match="unknown overlays"):
        nmap.overlays = []


# --- application life cycle ----------------------------------------------------------------------

ALLOWED = sorted((old, new) for old, targets in ALLOWED_TRANSITIONS.items() for new in targets)
FORBIDDEN = sorted(set(itertools.product(S, S)) - set(ALLOWED))


def test_transition_table_covers_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)


@pytest.mark.parametrize(("old", "new"), ALLOWED)
def test_allowed_transitions(old: ApplicationState, new: ApplicationState) -> None:
    check_transition(old, new)
    assert can_transition(old, new)
    app = Application(id="a", name="a", state=old)
    app.transition_to(new)
    assert app.state is new


@pytest.mark.parametrize(("old", "new"), FORBIDDEN)
def test_forbidden_transitions(old: ApplicationState, new: ApplicationState) -> None:
    assert not can_transition(old, new)
    with pytest.raises(InvalidTransition) as exc:
        check_transition(old, new)
    assert (exc.value.old, exc.value.new) == (old, new)
    app = Application(id="a", name="a", state=old)
    with pytest.raises(InvalidTransition):
        app.transition_to(new)
    assert app.state is old


def test_life_cycle_examples() -> None:
    assert not can_transition(S.TEMPLATE, S.RUNNING)
    assert not can_transition(S.OFF, S.RUNNING)
    assert not can_transition(S.RUNNING, S.DELETING)
    assert not can_transition(S.RUNNING, S.RUNNING)
    assert ALLOWED_TRANSITIONS[S.DELETING] == frozenset()
    # A migration of a running application passes through these states in order.
    app = Application(id="a", name="a", state=S.RUNNING)
    for state in (S.CAPTURING, S.DEPLOYING, S.BOOTING, S.FENCED, S.RUNNING):
        app.transition_to(state)


def reachable(start: ApplicationState) -> set[ApplicationState]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in ALLOWED_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_reachable_and_can_end() -> None:
    assert reachable(S.DISCOVERING) | reachable(S.TEMPLATE) == set(S)
    for state in S:
        assert S.DELETING in reachable(state)


def test_state_values_use_hyphens() -> None:
    assert S.SHUTTING_DOWN == "shutting-down"
    assert Application.model_validate({"id": "a", "name": "a", "state": "shutting-down"}).state is S.SHUTTING_DOWN
    with pytest.raises(ValidationError):
        Application.model_validate({"id": "a", "name": "a", "state": "shutting_down"})


def test_application_not_its_own_parent() -> None:
    with pytest.raises(ValidationError, match="own parent"):
        Application(id="a", name="a", parent_id="a")
    assert Application(id="b", name="b", parent_id="a").parent_id == "a"


# --- application records -------------------------------------------------------------------------


def iface(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "eth0", "application_network": "lan1", "address": "10.1.1.20", "prefix_len": 24}
    return {**base, **extra}


@pytest.mark.parametrize("mask", ["255.255.255.0", 24, "24", "/24"])
def test_interface_mask_or_prefix(mask: object) -> None:
    data = iface()
    del data["prefix_len"]
    assert NetworkInterface.model_validate({**data, "mask": mask}).prefix_len == 24
    assert NetworkInterface.model_validate({**data, "prefix_len": mask}).prefix_len == 24


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prefix_len": "255.0.255.0"}, "not contiguous"),
        ({"prefix_len": "0.0.0.255"}, "not contiguous"),
        ({"prefix_len": "banana"}, "neither a prefix length"),
        ({"prefix_len": 33}, "too long"),
        ({"prefix_len": 129}, "less than or equal"),
        ({"address": None}, "static addressing needs"),
        ({"prefix_len": None}, "static addressing needs"),
        ({"gateway": "10.1.2.1"}, "outside 10.1.1.0/24"),
        ({"gateway": "2001:db8::1"}, "outside"),
        ({"gateway": "10.1.1.20"}, "equals the interface address"),
        ({"address": "10.1.1.0"}, "not a host address"),
        ({"address": "10.1.1.255"}, "not a host address"),
        ({"boot_protocol": "dhcp", "address": None, "gateway": "10.1.1.1"}, "gateway needs an address"),
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"mac": "nope"}, "not a MAC address"),
        ({"name": "this-name-is-too-long"}, "pattern"),
        ({"boot_protocol": "bootp"}, "Input should be"),
    ],
)
def test_interface_invalid(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NetworkInterface.model_validate(iface(**extra))
    assert message in errors_of(exc)


def test_interface_valid_variants() -> None:
    assert NetworkInterface.model_validate(iface(gateway="10.1.1.1", mac="52-54-00-AA-BB-CC")).mac == (
        "52:54:00:aa:bb:cc"
    )
    assert NetworkInterface.model_validate(iface(address="10.1.1.1", prefix_len=32)).prefix_len == 32
    dhcp = NetworkInterface(name="eth1", application_network="lan1", boot_protocol="dhcp")
    assert dhcp.address is None and dhcp.subnet() is None
    v6 = NetworkInterface.model_validate(iface(address="2001:db8::20", prefix_len=64, gateway="2001:db8::1"))
    assert str(v6.subnet()) == "2001:db8::/64"
    assert str(NetworkInterface.model_validate(iface(name="eth0.10")).subnet()) == "10.1.1.0/24"


def test_node_server_or_image() -> None:
    with pytest.raises(ValidationError, match="exactly one of server_id and source_image"):
        Node(id="n", name="n")
    with pytest.raises(ValidationError, match="exactly one of server_id and source_image"):
        Node(id="n", name="n", server_id="s", source_image="i")
    with pytest.raises(ValidationError, match="image_sync_date needs source_image"):
        Node(id="n", name="n", server_id="s", image_sync_date=datetime(2024, 1, 1, tzinfo=UTC))
    assert Node(id="n", name="n", source_image="i", image_sync_date="2024-01-01T00:00:00Z").source_image == "i"


def test_node_priorities_and_interfaces() -> None:
    for priority in (-1, 1001):
        with pytest.raises(ValidationError):
            Node(id="n", name="n", server_id="s", deploy_priority=priority)
        with pytest.raises(ValidationError):
            Node(id="n", name="n", server_id="s", capture_priority=priority)
    assert Node(id="n", name="n", server_id="s", deploy_priority=0, capture_priority=1000).deploy_priority == 0
    with pytest.raises(ValidationError, match="duplicate interface name"):
        Node.model_validate({"id": "n", "name": "n", "server_id": "s", "interfaces": [iface(), iface()]})


def test_address_range() -> None:
    assert AddressRange(start="10.0.0.5", end="10.0.0.5").start == AddressRange(start="10.0.0.5", end="10.0.0.9").start
    with pytest.raises(ValidationError, match="after end"):
        AddressRange(start="10.0.0.9", end="10.0.0.5")
    with pytest.raises(ValidationError, match="mixes IPv4 and IPv6"):
        AddressRange(start="10.0.0.1", end="2001:db8::1")


def test_node_pool() -> None:
    assert NodePool(id="p", prime_node="n", min_nodes=2, max_nodes=2).max_nodes == 2
    with pytest.raises(ValidationError, match="max_nodes 1 < min_nodes 3"):
        NodePool(id="p", prime_node="n", min_nodes=3, max_nodes=1)
    with pytest.raises(ValidationError):
        NodePool(id="p", prime_node="n", min_nodes=-1)
    with pytest.raises(ValidationError, match="static addressing needs an address range"):
        NodePoolInterface(name="eth0", application_network="lan1")
    assert NodePoolInterface(name="eth0", application_network="lan1", boot_protocol="dhcp").address_range is None


def test_application_network() -> None:
    with pytest.raises(ValidationError, match="fence overlay must differ"):
        ApplicationNetwork(id="n", name="n", production_overlay_id="o", fence_overlay_id="o")
    with pytest.raises(ValidationError, match="host bits"):
        ApplicationNetwork(id="n", name="n", production_overlay_id="o", subnet="10.1.1.1/24")
    net = ApplicationNetwork(id="n", name="n", production_overlay_id="o", fence_overlay_id="f", subnet="10.1.1.0/24")
    assert str(net.subnet) == "10.1.1.0/24"


def test_database_modes() -> None:
    assert Database(id="d", node_id="n").migrate_mode == "leave-behind"
    with pytest.raises(ValidationError, match="external-mirror needs target_location"):
        Database(id="d", node_id="n", migrate_mode="external-mirror")
    assert Database(id="d", node_id="n", migrate_mode="external-mirror", target_location="iqn.x:lun1").target_location
    with pytest.raises(ValidationError):
        Database(id="d", node_id="n", migrate_mode="leave_behind")


def test_image() -> None:
    image = Image(
        id="i",
        library_id="lib",
        source_server="s",
        capture_date="2024-05-01T02:30:00+02:00",
        capture_schedule="30 2 * * *",
        last_sync_date="2024-05-01T03:00:00Z",
        sync_schedule="0 * * * *",
        sync_options={"exclude": "/tmp"},
    )
    assert image.capture_date is not None and image.capture_date.utcoffset() is not None
    with pytest.raises(ValidationError, match="last_sync_date is before capture_date"):
        Image(
            id="i",
            library_id="l",
            source_server="s",
            capture_date="2024-05-02T00:00:00Z",
            last_sync_date="2024-05-01T00:00:00Z",
        )
    with pytest.raises(ValidationError, match="timezone"):
        Image(id="i", library_id="l", source_server="s", capture_date=datetime(2024, 5, 1))
    with pytest.raises(ValidationError, match="cron"):
        Image(id="i", library_id="l", source_server="s", capture_schedule="every day")


def test_server() -> None:
    with pytest.raises(ValidationError):
        Server(id="s", resource_domain="rd", size="")
    with pytest.raises(ValidationError):
        Server(id="s", resource_domain="not.an.id", size="small")


def application_map(**extra: Any) -> dict[str, Any]:
    return {
        "application": {"id": "app", "name": "App", "state": "running"},
        "networks": [{"id": "lan1", "name": "LAN 1", "production_overlay_id": "o1", "subnet": "10.1.1.0/24"}],
        "nodes": [
            {
                "id": "web",
                "name": "Web",
                "server_id": "s-web",
                "node_pool_id": "pool",
                "interfaces": [iface(address="10.1.1.10", mac="52:54:00:00:00:0a")],
            },
            {
                "id": "app",
                "name": "App",
                "server_id": "s-app",
                "interfaces": [iface(address="10.1.1.20", mac="52:54:00:00:00:14")],
            },
        ],
        "node_pools": [
            {
                "id": "pool",
                "prime_node": "web",
                "max_nodes": 3,
                "interfaces": [
                    {
                        "name": "eth0",
                        "application_network": "lan1",
                        "address_range": {"start": "10.1.1.100", "end": "10.1.1.110"},
                    }
                ],
            }
        ],
        "databases": [{"id": "db", "node_id": "app"}],
        "servers": [
            {"id": "s-web", "resource_domain": "rd", "size": "small", "primary_mac": "52:54:00:00:00:0a"},
            {"id": "s-app", "resource_domain": "rd", "size": "small", "primary_mac": "52:54:00:00:00:14"},
        ],
        **extra,
    }


def test_application_map_valid() -> None:
    amap = ApplicationMap.model_validate(application_map())
    assert [n.id for n in amap.nodes] == ["web", "app"]


def test_application_map_same_address_on_different_networks() -> None:
    data = application_map()
    data["networks"].append({"id": "lan2", "name": "LAN 2", "production_overlay_id": "o2"})
    data["nodes"][1]["interfaces"].append(iface(name="eth1", application_network="lan2", address="10.1.1.10"))
    amap = ApplicationMap.model_validate(data)
    # The same address is allowed once per application network: both interfaces are kept as given.
    on_addr = [
        (n.id, i.name, i.application_network) for n in amap.nodes for i in n.interfaces if str(i.address) == "10.1.1.10"
    ]
    assert on_addr == [("web", "eth0", "lan1"), ("app", "eth1", "lan2")]


def break_map(path: str, value: Any) -> dict[str, Any]:
    data = application_map()
    *parents, last = path.split(".")
    target: Any = data
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("nodes.1.id", "web", "duplicate node id"),
        ("servers.1.id", "s-web", "duplicate server id"),
        (
            "networks",
            [{"id": "lan1", "name": "a", "production_overlay_id": "o"}] * 2,
            "duplicate application network id",
        ),
        ("databases", [{"id": "db", "node_id": "app"}] * 2, "duplicate database id"),
        ("node_pools.0.prime_node", "ghost", "prime node ghost"),
        ("nodes.0.node_pool_id", "ghost", "node pool ghost"),
        ("node_pools.0.source_image", "ghost", "node pool pool -> image ghost"),
        ("nodes.0.server_id", "ghost", "server ghost"),
        ("databases.0.node_id", "ghost", "node ghost"),
        ("nodes.0.interfaces.0.application_network", "ghost", "network ghost"),
        ("node_pools.0.interfaces.0.application_network", "ghost", "network ghost"),
        ("nodes.0.interfaces.0.address", "10.1.2.10", "outside 10.1.1.0/24"),
        ("node_pools.0.interfaces.0.address_range", {"start": "10.1.1.250", "end": "10.1.2.5"}, "range"),
        ("nodes.1.interfaces.0.address", "10.1.1.10", "address 10.1.1.10 used twice on network lan1"),
        ("nodes.1.interfaces.0.mac", "52:54:00:00:00:0a", "MAC 52:54:00:00:00:0a used by more than one"),
        ("servers.1.primary_mac", "52-54-00-00-00-0A", "primary MAC of more than one server"),
    ],
)
def test_application_map_invalid(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ApplicationMap.model_validate(break_map(path, value))


def test_application_map_template_images_and_duplicates() -> None:
    data = application_map()
    data["nodes"][1] = {"id": "app", "name": "App", "source_image": "img"}
    with pytest.raises(ValidationError, match="image img"):
        ApplicationMap.model_validate(data)
    data["images"] = [{"id": "img", "library_id": "lib", "source_server": "s-app"}]
    data["image_libraries"] = [{"id": "lib", "name": "Library", "location": "s3://bucket/lib"}]
    amap = ApplicationMap.model_validate(data)
    assert amap.images[0].id == "img"
    data["images"].append(data["images"][0])
    with pytest.raises(ValidationError, match="duplicate image id"):
        ApplicationMap.model_validate(data)
    data["images"].pop()
    data["image_libraries"].append(data["image_libraries"][0])
    with pytest.raises(ValidationError, match="duplicate image library id"):
        ApplicationMap.model_validate(data)


def test_application_map_assignment_revalidates() -> None:
    amap = ApplicationMap.model_validate(application_map())
    with pytest.raises(ValidationError, match="dangling references"):
        amap.networks = []


# --- users ---------------------------------------------------------------------------------------


def test_user_account_valid() -> None:
    key = user_key()
    user = UserAccount(
        id="alice",
        display_name="Alice",
        public_key=key,
        groups=["netops", "appops"],
        authorisations={"saga-operate", "network-read", "admin"},
        defaults={"image_library": "lib1", "resource_domain": "dc1-lab"},
    )
    assert user.public_key == key and not user.disabled
    assert user.model_dump(mode="json")["authorisations"] == ["admin", "network-read", "saga-operate"]
    assert UserAccount(id="bob").authorisations == set()


def corrupt(key: str) -> str:
    raw = bytearray(base64.b32decode(key))
    raw[10] ^= 0xFF
    return base64.b32encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("U" + "A" * 54, "pattern"),
        ("U" + "A" * 56, "pattern"),
        (user_key().lower(), "pattern"),
        (user_key(prefix=nkeys.PREFIX_BYTE_ACCOUNT), "pattern"),
        ("U" + "1" * 55, "pattern"),
        (corrupt(user_key()), "checksum"),
    ],
)
def test_user_account_bad_public_key(key: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        UserAccount(id="alice", public_key=key)
    assert message in errors_of(exc)


def test_user_account_invalid_fields() -> None:
    with pytest.raises(ValidationError, match="duplicate group"):
        UserAccount(id="alice", groups=["a", "a"])
    with pytest.raises(ValidationError):
        UserAccount(id="alice", groups=["bad group"])
    with pytest.raises(ValidationError):
        UserAccount.model_validate({"id": "alice", "authorisations": ["root"]})
    with pytest.raises(ValidationError):
        UserAccount(id="alice.smith")
    assert Authorisation.USER_ADMIN == "user-admin"


# --- schema --------------------------------------------------------------------------------------


def public_models() -> list[type[BaseModel]]:
    return [
        value
        for name in models.__all__
        if isinstance(value := getattr(models, name), type) and issubclass(value, BaseModel)
    ]


@pytest.mark.parametrize("model", public_models(), ids=lambda m: m.__name__)
def test_json_schema(model: type[BaseModel]) -> None:
    for mode in ("validation", "serialization"):
        schema = model.model_json_schema(mode=mode)
        json.dumps(schema)
        assert schema["type"] == "object"
        assert "properties" in schema


def test_json_schema_details() -> None:
    schema = NetworkMap.model_json_schema()
    lon = schema["$defs"]["LocalOverlayNetwork"]["properties"]
    assert lon["vlan_ids"]["items"] == {"maximum": 4094, "minimum": 1, "type": "integer"}
    assert ApplicationMap.model_json_schema()["$defs"]["ApplicationState"]["enum"][-2] == "shutting-down"


def admits_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


@pytest.mark.parametrize("model", public_models(), ids=lambda m: m.__name__)
def test_optional_fields_default_to_none(model: type[BaseModel]) -> None:
    # XML export omits None, so an optional field must read back as None when absent.
    for name, field in model.model_fields.items():
        if admits_none(field.annotation):
            assert field.default is None, f"{model.__name__}.{name}"
