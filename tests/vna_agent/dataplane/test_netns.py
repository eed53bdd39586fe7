"""End-to-end data plane in throw-away network namespaces (root only).

Two sites, each a bridge with a "server" namespace on it (same subnet,
different MACs), joined by an underlay veth; tunnel endpoints run as
``python -m vna_agent.dataplane`` processes inside the site namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vna_agent.dataplane.keys import StaticKeyPair
from vna_agent.dataplane.switch import Switch

from .nslab import NsLab, has_root, read_status, run, wait_for, wait_status
from .sanity_bench import endpoint_configs

pytestmark = [pytest.mark.root, pytest.mark.skipif(not has_root(), reason="needs root and /dev/net/tun")]

MAC_A, MAC_B = "02:77:00:00:00:01", "02:77:00:00:00:02"
TRANSFER = 4 << 20


@pytest.fixture(scope="module")
def lab() -> Iterator[NsLab]:
    lab = NsLab()
    lab.build()
    try:
        yield lab
    finally:
        lab.destroy()


@contextlib.contextmanager
def endpoints(
    lab: NsLab, tag: str, cli: dict[str, Any], srv: dict[str, Any], *, up: bool = True
) -> Iterator[tuple[Path, Path]]:
    """Start server (site B) and client (site A) endpoints named after ``tag``; stop them afterwards."""
    pb, st_b = lab.endpoint(lab.b, f"{tag}-b", srv)
    pa, st_a = lab.endpoint(lab.a, f"{tag}-a", cli)
    try:
        for st, proc in ((st_a, pa), (st_b, pb)):
            status = wait_status(st, lambda s: s["state"] == "up" or not up, 15)
            assert proc.poll() is None, (status, _log(lab, st))
            assert status.get("state") == "up" or not up, (status, _log(lab, st))
        yield st_a, st_b
    except BaseException:
        lab.stop(pa)
        lab.stop(pb)
        for st in (st_a, st_b):  # the lab (and these logs) is removed after the module
            print(f"--- {st.name}\n{_log(lab, st)}")
        raise
    finally:
        lab.stop(pa)
        lab.stop(pb)


def _log(lab: NsLab, status: Path) -> str:
    log = lab.tmp / status.name.replace(".status.json", ".log")
    return log.read_text()[-3000:] if log.exists() else ""


def _ping(lab: NsLab, count: int = 3, timeout: float = 1.0, dst: str = "10.77.0.2", src: str | None = None) -> bool:
    return lab.tool(src or lab.sa, "ping", dst, str(count), str(timeout)).returncode == 0


def _transfer(lab: NsLab, nbytes: int = TRANSFER, secs: float = 0.0, during: Any = None) -> tuple[str, str]:
    """TCP from server A to server B across the overlay; return (sent, received) "<bytes> <sha256>"."""
    sink = lab.tool_bg(lab.sb, "sink", "5001")
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "listening"
    src = lab.tool_bg(lab.sa, "source", "10.77.0.2", "5001", str(nbytes), str(secs))
    if during is not None:
        during()
    sent, err = src.communicate(timeout=30)
    received, _ = sink.communicate(timeout=10)
    assert src.returncode == 0, err
    return sent.strip(), received.strip()


def _quiet_counters(st_a: Path, st_b: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Status of both ends once the counters stop moving."""
    last: tuple[Any, ...] = ()

    def stable() -> bool:
        nonlocal last
        a, b = read_status(st_a), read_status(st_b)
        if a is None or b is None:
            return False
        now = (a["records_out"], a["records_in"], b["records_out"], b["records_in"])
        same = now == last[:4] if last else False
        last = (*now, a, b)
        return same

    time.sleep(0.15)
    wait_for(stable, 5, interval=0.15)
    return last[4], last[5]


def _assert_counters_match(a: dict[str, Any], b: dict[str, Any], min_bytes: int) -> None:
    assert a["records_out"] == b["records_in"] and b["records_out"] == a["records_in"], (a, b)
    assert a["bytes_out"] == b["bytes_in"] and b["bytes_out"] == a["bytes_in"]
    assert a["frames_out"] == b["frames_in"] and b["frames_out"] == a["frames_in"]
    assert a["bytes_out"] >= min_bytes
    for side in (a, b):
        # the TAP's own host stack may send an IGMP report before the session exists
        early = {k: v for k, v in side["drops"].items() if k in ("link_down", "no_session")}
        bad = {k: v for k, v in side["drops"].items() if k not in early}
        assert not bad and sum(early.values()) <= 4, json.dumps(side)


def _arp_resolved(lab: NsLab) -> bool:
    out = lab.ns(lab.sa, "ip", "neigh", "show", "10.77.0.2").stdout
    return MAC_B in out


def _check_tunnel(lab: NsLab, st_a: Path, st_b: Path, *, encrypted: bool, superpackets: bool) -> None:
    """ARP and ping across, a byte-identical TCP transfer, counters that match on both ends."""
    lab.ns(lab.sa, "ip", "neigh", "flush", "all")
    assert _ping(lab), _log(lab, st_a)
    assert _arp_resolved(lab)
    sent, received = _transfer(lab)
    assert sent == received and sent.startswith(str(TRANSFER))
    a, b = _quiet_counters(st_a, st_b)
    _assert_counters_match(a, b, TRANSFER)
    if superpackets:
        assert a["frames_out"] > 2 * a["records_out"], "expected TSO superpackets from the TAP"
    if encrypted:
        assert a["handshakes"] >= 1 and a["session"]["ready"] and a["last_handshake"]


@pytest.mark.parametrize(
    ("mode", "transport", "offload"),
    [("datagram", "datagram", True), ("plain", "stream", True), ("plain", "datagram", False)],
)
def test_tunnel_carries_arp_ping_and_tcp(lab: NsLab, mode: str, transport: str, offload: bool) -> None:
    cli, srv = endpoint_configs(lab, mode, offload=offload, transport=transport)
    with endpoints(lab, f"{mode}-{transport}", cli, srv) as (st_a, st_b):
        _check_tunnel(lab, st_a, st_b, encrypted=mode != "plain", superpackets=False)


def test_peer_with_wrong_key_is_refused(lab: NsLab) -> None:
    cli, srv = endpoint_configs(lab, "stream", offload=True)
    srv["peer_public_key"] = StaticKeyPair.generate().public.b64()  # not the client's key
    with endpoints(lab, "wrongkey", cli, srv, up=False) as (st_a, st_b):
        b = wait_status(st_b, lambda s: s["handshakes_refused"] >= 1)
        assert b["handshakes_refused"] >= 1 and b["state"] != "up"
        assert not _ping(lab, count=1, timeout=0.5)
        a = read_status(st_a)
        assert a is not None and a["state"] != "up" and a["handshakes"] == 0


def test_kernel_vxlan(lab: NsLab) -> None:
    cli, srv = endpoint_configs(lab, "vxlan", offload=False)
    with endpoints(lab, "vxlan", cli, srv) as (st_a, _):
        assert _ping(lab)
        sent, received = _transfer(lab, nbytes=1 << 20)
        assert sent == received
        k = wait_status(st_a, lambda s: s.get("kernel", {}).get("tx_bytes", 0) > 1 << 20)["kernel"]
        assert k["tx_bytes"] > 1 << 20 and k["rx_packets"] > 10  # GSO: packets count superpackets


# The stream tests share one tunnel; they come last so it is torn down with the module.


@pytest.fixture(scope="module")
def stream_tunnel(lab: NsLab) -> Iterator[tuple[Path, Path]]:
    """One encrypted stream tunnel shared by the stream tests (endpoints take about a second to start)."""
    cli, srv = endpoint_configs(lab, "stream", offload=True)
    with endpoints(lab, "stream", cli, srv) as paths:
        yield paths


def test_stream_tunnel_carries_arp_ping_and_tcp(lab: NsLab, stream_tunnel: tuple[Path, Path]) -> None:
    _check_tunnel(lab, *stream_tunnel, encrypted=True, superpackets=True)


def test_moved_mac_is_relearned_at_once(lab: NsLab, stream_tunnel: tuple[Path, Path]) -> None:
    """A workload moves from site B to site A; its gratuitous ARP redirects B's traffic within a second."""
    p = lab.p
    mac, ip = "02:77:00:00:00:09", "10.77.0.9"
    m1, m2 = f"{p}m1", f"{p}m2"
    lab.namespaces += [m1, m2]
    for ns, site in ((m1, lab.b), (m2, lab.a)):
        run("ip", "netns", "add", ns)
        run("ip", "-n", site, "link", "add", f"{p}p", "type", "veth", "peer", "name", f"{p}q", "netns", ns)
        run("ip", "-n", site, "link", "set", f"{p}p", "master", lab.br, "up")
        run("ip", "-n", ns, "link", "set", f"{p}q", "address", mac)
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", f"{p}q")
    run("ip", "-n", m1, "link", "set", f"{p}q", "up")
    switch_b = Switch(lab.br, netns=lab.b)
    assert _ping(lab, dst=ip, src=lab.sb, count=1)  # local on site B
    assert asyncio.run(switch_b.lookup(mac)) == f"{p}p"
    # move: the old place goes dark, the new one comes up and announces itself
    run("ip", "-n", m1, "link", "set", f"{p}q", "down")
    run("ip", "-n", m2, "link", "set", f"{p}q", "up")
    t0 = time.monotonic()
    lab.tool(m2, "garp", f"{p}q", ip, check=True)
    assert wait_for(lambda: asyncio.run(switch_b.lookup(mac)) == f"{p}t", 1.0)
    assert _ping(lab, dst=ip, src=lab.sb, count=1, timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    # on-demand flush for hosts that move silently (quiet it first so nothing re-teaches the MAC)
    run("ip", "-n", m2, "link", "set", f"{p}q", "down")
    time.sleep(0.1)  # frames already in the tunnel
    assert asyncio.run(switch_b.flush_mac(mac)) >= 1
    assert asyncio.run(switch_b.lookup(mac)) is None


def test_cut_tcp_connection_recovers_and_inner_flow_survives(lab: NsLab, stream_tunnel: tuple[Path, Path]) -> None:
    st_a = stream_tunnel[0]
    before = wait_status(st_a, lambda s: s["state"] == "up")

    def cut() -> None:
        time.sleep(0.4)
        res = lab.ns(lab.a, "ss", "-K", "-n", "dst", "10.78.0.2", "dport", "=", "7000", check=False)
        assert "10.78.0.2:7000" in res.stdout, res

    sent, received = _transfer(lab, secs=1.2, during=cut)
    assert sent == received
    a = wait_status(st_a, lambda s: s["state"] == "up" and s["disconnects"] > before["disconnects"])
    assert a["disconnects"] > before["disconnects"] and a["connects"] > before["connects"]
    assert a["handshakes"] > before["handshakes"]
    assert _ping(lab, count=1)
