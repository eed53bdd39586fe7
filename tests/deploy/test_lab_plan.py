"""The lab's spec, naming and plan as pure data (no root needed)."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from deploy.lab import LabSpecError, LabStateError, LanMode, Role, load_spec
from deploy.lab import naming as n
from deploy.lab.images import interfaces_file
from deploy.lab.probe import checksum, echo_request
from deploy.lab.statedir import StateDir
from deploy.lab.topology import plan

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"
NAMES = n.Names("sf0000")

MINI = """
sites:
  - name: dc
    lans: [{name: lan, subnet: 10.0.0.0/24, vlan: 7}]
    servers:
      - name: a
        nics: [{lan: lan, address: 10.0.0.2}]
  - name: cl
    kind: cloud
    subnet: 172.16.0.0/24
    servers: [{name: b}, {name: c, address: 172.16.0.10}]
    vnas: [{name: v}]
"""


def test_samples_load_and_plan() -> None:
    for sample in ("lab-reference.yaml", "lab-star.yaml"):
        spec = load_spec(SAMPLES / sample)
        topo = plan(spec, NAMES, LanMode.BRIDGE_PER_LAN)
        assert all(h.ns.startswith("sf0000-") for h in topo.hosts.values())
        for nic in topo.nics.values():
            assert len(nic.ifname) <= 15 and len(nic.port) <= 15
        for br in topo.bridges:
            assert len(br.ifname) <= 15
        # MACs never repeat on a LAN
        by_lan: dict[tuple[str, str], list[str]] = {}
        for nic in topo.nics.values():
            by_lan.setdefault((nic.home.sw_host, nic.home.bridge), []).append(nic.mac)
        assert all(len(set(macs)) == len(macs) for macs in by_lan.values())


def test_reference_plan() -> None:
    topo = plan(load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.BRIDGE_PER_LAN)
    assert topo.host("internet").role is Role.INTERNET
    assert topo.host("dc1-edge").forward
    wsw = topo.nic("wsw", "eth0")
    assert wsw.mac == "52:54:00:00:01:0a"  # YAML 1.1 would have read this as a base-60 number
    assert (wsw.home.sw_host, wsw.home.bridge, wsw.port) == ("dc2-sw", "br-lan1", "wsw-0")
    vna1 = topo.nic("vna1", "wan")
    assert vna1.address == IPv4Interface("198.51.100.10/24")
    assert topo.nic("vna1", "lan1").address is None
    routes = {(r.host, r.dst): r.gateway for r in topo.routes}
    assert str(routes[("dc1-edge", IPv4Network("203.0.113.0/24"))]) == "100.64.0.12"
    assert ("dc1-edge", IPv4Network("10.1.1.0/24")) not in routes  # LANs are never routed across sites
    moved = plan(
        load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.BRIDGE_PER_LAN, {("wsw", "eth0"): ("dc1", "lan1")}
    )
    assert moved.nic("wsw", "eth0").attach is not None
    assert moved.nic("wsw", "eth0").attach.sw_host == "dc1-sw"  # type: ignore[union-attr]
    unplugged = plan(load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.BRIDGE_PER_LAN, {("wsw", "eth0"): None})
    assert unplugged.nic("wsw", "eth0").attach is None


def test_defaults_are_assigned_deterministically() -> None:
    topo = plan(load_spec(MINI), NAMES, LanMode.BRIDGE_PER_LAN)
    assert topo.nic("a", "eth0").address == IPv4Interface("10.0.0.2/24")  # bare address gets the LAN prefix
    assert topo.nic("b", "eth0").address == IPv4Interface("172.16.0.11/24")  # .10 is taken by c
    assert topo.nic("v", "wan").address == IPv4Interface("172.16.0.12/24")
    assert topo.nic("dc-edge", "inet0").address == IPv4Interface("100.64.0.11/24")
    assert topo.nic("dc-edge", "wan").address == IPv4Interface("198.18.0.1/24")
    assert topo.nic("a", "eth0").mac == n.derived_mac("a", "eth0")


def test_vlan_trunk_plan() -> None:
    topo = plan(load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.VLAN_TRUNK)
    trunk = [b for b in topo.bridges if b.ifname == "br-trunk"]
    assert trunk and all(b.vlan_filtering for b in trunk)
    assert topo.nic("asw", "eth0").home.pvid == 10
    assert topo.nic("vna1", "trunk").home.tagged == (10,)
    assert [(v.host, v.ifname, v.vlan_id) for v in topo.vlans] == [("vna1", "lan1", 10), ("vna2", "lan1", 10)]
    with pytest.raises(LabSpecError):
        plan(load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.AUTO)


LAN = "lans: [{name: lan, subnet: 10.0.0.0/24}]\n    "


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ("lans: [{name: wan, subnet: 10.0.0.0/24}]", "reserved"),
        (LAN + "servers: [{name: a, nics: [{lan: nope}]}]", "unknown LAN"),
        (
            LAN + "servers: [{name: a, nics: [{lan: lan, address: 10.0.1.2/24}]}]",
            "not in",
        ),
        (LAN + "servers: [{name: cl-edge, nics: [{lan: lan}]}]", "reserved host id"),
        ("wan_subnet: 172.16.0.0/25", "overlap"),
        (
            LAN + "servers: [{name: averyveryverylongname, nics: [{lan: lan}]}]",
            "pattern",
        ),
        (
            LAN + "servers: [{name: a, nics: [{lan: lan, mac: '01:00:00:00:00:01'}]}]",
            "multicast",
        ),
    ],
)
def test_invalid_specs(patch: str, match: str) -> None:
    text = f"sites:\n  - name: dc\n    {patch}\n  - name: cl\n    kind: cloud\n    subnet: 172.16.0.0/24\n"
    with pytest.raises(LabSpecError, match=match):
        load_spec(text)


def test_duplicate_hosts_and_bad_prefix() -> None:
    with pytest.raises(LabSpecError, match="used twice"):
        load_spec("sites:\n  - {name: x, kind: cloud, subnet: 10.0.0.0/24, servers: [{name: a}, {name: a}]}\n")
    for bad in ("SF", "s", "sf-1", "sf123456789"):
        with pytest.raises(LabSpecError):
            n.Names(bad)
    assert n.Names("sf1").owns("sf1-asw") and not n.Names("sf1").owns("sf1a-asw")
    assert n.prefix_for("/x.yaml") == n.prefix_for("/x.yaml") != n.prefix_for("/y.yaml")


def test_icmp_echo_is_well_formed() -> None:
    packet = echo_request(0x1234, 7, b"abc")
    assert packet[0] == 8 and checksum(packet) == 0


def test_interfaces_file() -> None:
    topo = plan(load_spec(SAMPLES / "lab-reference.yaml"), NAMES, LanMode.BRIDGE_PER_LAN)
    text = interfaces_file(
        topo.nics_of("asw"), load_spec(SAMPLES / "lab-reference.yaml").site("dc1").servers[0].gateway
    )  # type: ignore[union-attr]
    assert "iface eth0 inet static" in text and "gateway 10.1.1.1" in text and "52:54:00:00:01:14" in text


def test_state_dir_ownership(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(LabStateError):
        StateDir(foreign, "sf1").claim("lab", {})
    assert not StateDir(foreign, "sf1").remove()
    assert (foreign / "precious.txt").exists()
    mine = StateDir(tmp_path / "lab", "sf1")
    mine.claim("lab", {("wsw", "eth0"): ("dc1", "lan1"), ("asw", "eth0"): None})
    assert mine.overrides() == {("wsw", "eth0"): ("dc1", "lan1"), ("asw", "eth0"): None}
    with pytest.raises(LabStateError):
        StateDir(tmp_path / "lab", "sf2").claim("lab", {})
    assert mine.remove() and not (tmp_path / "lab").exists()
