"""The lab on a real kernel: namespaces, veths, bridges (root only, every probe bounded)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab import CapabilityMissing, Lab, LabCommandTimeout, LabNotFound, LanMode, load_spec
from deploy.lab.spec import CloudServerSpec

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"


def _can_build() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=5).returncode == 0


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not _can_build(), reason="needs root and 'ip netns'"),
    pytest.mark.timeout(60),
]


def _leftovers(prefix: str) -> tuple[list[str], list[str]]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=5).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=5).stdout
    return [x for x in ns.splitlines() if prefix in x], [x for x in links.splitlines() if prefix in x]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The reference lab, built once for the read-only tests of this module."""
    lab = Lab(load_spec(SAMPLES / "lab-reference.yaml"), state_dir=tmp_path_factory.mktemp("ref") / "state")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Lab]:
    """A reference lab of its own, for tests that change it."""
    lab = Lab(SAMPLES / "lab-reference.yaml", state_dir=tmp_path / "state")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def test_servers_on_one_lan_reach_each_other(ref: Lab) -> None:
    assert ref.ping("asw", "10.1.1.30", count=2).received == 2
    assert ref.arp("asw", "eth0", "10.1.1.30") == "52:54:00:00:01:1e"


def test_no_layer2_between_sites_without_an_overlay(ref: Lab) -> None:
    # ASW and WSW share 10.1.1.0/24 but sit on different sites' LANs: not even ARP gets through
    assert ref.arp("asw", "eth0", "10.1.1.10", count=1, timeout=0.3) is None
    assert not ref.ping("asw", "10.1.1.10", count=1, timeout=0.3).ok
    # the VNA's LAN leg is on ASW's segment (unnumbered, but it hears ARP there)
    assert ref.arp("vna1", "lan1", "10.1.1.20") == "52:54:00:00:01:14"


def test_vnas_reach_each_other_over_the_underlay(ref: Lab) -> None:
    ns, port = ref.underlay_port("dc2")
    assert ns == ref.ns("internet")
    before = ref.link_stats("internet", port)
    result = ref.ping("vna1", str(ref.addr("vna2", "wan").ip), count=3)  # type: ignore[union-attr]
    assert result.received == 3
    after = ref.link_stats("internet", port)
    # at least the 3 requests went out of the internet bridge towards dc2, and 3 replies came back
    assert after["tx_packets"] - before["tx_packets"] >= 3
    assert after["rx_packets"] - before["rx_packets"] >= 3
    assert ref.ping("vna3", "198.51.100.10", count=1).ok  # cloud VNA to dc1's VNA


def test_edge_routers_route(ref: Lab) -> None:
    assert ref.exec("dc1-edge", ["sysctl", "-n", "net.ipv4.ip_forward"], check=True).stdout.strip() == "1"
    assert ref.ping("vna1", "100.64.0.12", count=1).ok  # dc2's edge, through dc1's edge
    assert ref.ping("wswc", "198.51.100.10", count=1).ok  # cloud server -> cloud edge -> internet -> dc1 edge -> VNA1
    assert ref.ping("asw", "10.1.1.1", count=1).ok  # its gateway, the edge router's LAN leg
    assert ref.ping("asw", "100.64.0.11", count=1).ok  # routed by dc1-edge to its own uplink
    # LAN subnets are private to their site: dc2 has no route back to 10.1.1.0/24
    assert not ref.ping("asw", "203.0.113.20", count=1, timeout=0.3).ok
    assert "default via 198.51.100.1 dev wan" in ref.exec("vna1", ["ip", "route"]).stdout


def test_names_addresses_and_images(ref: Lab) -> None:
    assert ref.ns("asw") == f"{ref.prefix}-asw"
    assert str(ref.addr("asw", "eth0")) == "10.1.1.20/24"
    assert ref.mac("wsw", "eth0") == "52:54:00:00:01:0a"
    assert ref.link("vna1", "lan1") == "lan1"
    assert ref.addr("vna1", "lan1") is None
    br = ref.bridge("dc1", "lan1")
    assert (br.ns, br.name) == (f"{ref.prefix}-dc1-sw", "br-lan1")
    shown = ref.exec("wsw", ["ip", "-o", "link", "show", "eth0"], check=True).stdout
    assert "52:54:00:00:01:0a" in shown
    ports = ref.exec("dc1-sw", ["ip", "-o", "link", "show", "master", "br-lan1"], check=True).stdout
    assert "asw-0" in ports and "vna1-1" in ports and "wsw-0" not in ports
    etc = ref.root("asw") / "etc"
    assert (etc / "hostname").read_text() == "asw\n"
    assert "address 10.1.1.20/24" in (etc / "network" / "interfaces").read_text()
    assert (etc / "skyferry" / "services").read_text() == "app-server\n"
    with pytest.raises(LabNotFound):
        ref.ns("nosuch")
    with pytest.raises(LabNotFound):
        ref.addr("asw", "eth9")


def test_up_twice_is_a_noop(ref: Lab) -> None:
    assert ref.up() == 0


def test_exec_is_bounded(ref: Lab) -> None:
    with pytest.raises(LabCommandTimeout):
        ref.exec("asw", ["sleep", "5"], timeout=0.2)


def test_capabilities(ref: Lab) -> None:
    caps = ref.capabilities()
    assert caps.features.veth and caps.features.bridge and caps.features.netns
    if not caps.features.vlan_trunk:
        assert caps.lan_mode is LanMode.BRIDGE_PER_LAN
        assert any("one bridge per LAN" in note for note in caps.notes)
    flat = caps.as_dict()
    for key in ("vlan_8021q", "vlan_filtering", "vxlan", "tap", "wireguard", "lan_mode"):
        assert key in flat


def test_vlan_trunk_needs_the_kernel(ref: Lab, tmp_path: Path) -> None:
    if ref.capabilities().features.vlan_trunk:
        pytest.skip("this kernel has VLAN trunks")
    trunk = ref.spec.model_copy(update={"lan_mode": LanMode.VLAN_TRUNK})
    lab = Lab(trunk, state_dir=tmp_path / "t")
    try:
        with pytest.raises(CapabilityMissing):
            lab.up()
    finally:
        lab.down()
    auto = Lab(ref.spec.model_copy(update={"lan_mode": LanMode.AUTO}), state_dir=tmp_path / "a")
    assert auto.lan_mode() is LanMode.BRIDGE_PER_LAN


def test_replug_a_server_into_another_site(fresh: Lab) -> None:
    assert fresh.arp("asw", "eth0", "10.1.1.10", count=1, timeout=0.3) is None
    fresh.plug("wsw", "dc1", "lan1")  # WSW "moved" to the primary data center, same IP and MAC
    assert fresh.where("wsw") == ("dc1", "lan1")
    assert fresh.arp("asw", "eth0", "10.1.1.10") == "52:54:00:00:01:0a"
    assert fresh.ping("asw", "10.1.1.10", count=2).ok
    assert fresh.up() == 0  # the re-plug is part of the desired state now
    assert Lab(fresh.spec, prefix=fresh.prefix, state_dir=fresh.state_dir).where("wsw") == ("dc1", "lan1")
    fresh.unplug("wsw")
    assert "NO-CARRIER" in fresh.exec("wsw", ["ip", "-o", "link", "show", "eth0"]).stdout
    assert fresh.where("wsw") is None
    fresh.plug("wsw", "cloud1", "vpc")
    assert fresh.ping("wswc", "172.31.5.1", count=1).ok
    fresh.plug("wsw", "dc2", "lan1")
    assert fresh.arp("asw", "eth0", "10.1.1.10", count=1, timeout=0.3) is None
    assert "10.1.1.10/24" in fresh.exec("wsw", ["ip", "-o", "addr", "show", "eth0"]).stdout


def test_ports_servers_and_down_leaves_nothing(fresh: Lab) -> None:
    port = fresh.add_veth_port("dc1", "lan1", "tapx", into="vna1", peer_name="extra0")
    assert port.peer_ns == fresh.ns("vna1")
    assert fresh.add_veth_port("dc1", "lan1", "tapx", into="vna1", peer_name="extra0") == port
    fresh.add_server("cloud1", CloudServerSpec(name="wsw2", services=["web-server"]))
    assert str(fresh.addr("wsw2", "eth0")) == "172.31.5.11/24"
    assert fresh.ping("wsw2", "172.31.5.10", count=1).ok
    sleeper = fresh.spawn("wsw2", ["sleep", "30"])
    state = fresh.state_dir
    assert (state / "wsw2" / "root" / "etc" / "hostname").exists()
    assert fresh.down() >= 15
    assert sleeper.poll() is not None
    assert _leftovers(fresh.prefix) == ([], [])
    assert not state.exists()
    assert fresh.down() == 0  # idempotent


async def test_async_context_manager_and_star_lab(tmp_path: Path) -> None:
    async with Lab(SAMPLES / "lab-star.yaml", state_dir=tmp_path / "star") as lab:
        prefix = lab.prefix
        assert lab.ping("huba1", "10.9.0.12", count=1).ok
        # the same address on the two overlays' LANs: each LAN answers with its own server
        assert lab.arp("huba2", "eth0", "10.9.0.11") == lab.mac("huba1", "eth0")
        assert lab.arp("s1b", "eth0", "10.9.0.11", count=1, timeout=0.3) is None
        assert lab.ping("hubmgmt", "100.64.0.11", count=1).ok  # via its gateway on mgmt
        assert lab.ping("vnas1", "198.18.12.10", count=1).ok  # spoke VNA to spoke VNA, over the underlay
        assert len(lab.hosts()) == 18
    assert _leftovers(prefix) == ([], [])


def test_a_failed_up_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.lab.apply import Applier
    from deploy.lab.errors import NetlinkFailure

    def broken(self: Applier, route: object) -> int:
        raise NetlinkFailure("injected", details={})

    monkeypatch.setattr(Applier, "ensure_route", broken)
    lab = Lab(SAMPLES / "lab-reference.yaml", state_dir=tmp_path / "state")
    with pytest.raises(NetlinkFailure), lab:
        pass
    assert _leftovers(lab.prefix) == ([], [])
    assert not (tmp_path / "state").exists()
