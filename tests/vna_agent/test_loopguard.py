"""Loop protection's decisions (sans-IO :class:`LoopCore`) on simulated bridged networks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bus.vna import ConflictKind, LoopDetector, LoopState
from vna_agent.loopguard import (
    PROBE_DST,
    PROBE_ETHERTYPE,
    Alert,
    Block,
    Flush,
    LoopCore,
    LoopTiming,
    PortKind,
    Unblock,
    decode_probe,
    encode_probe,
)

STEP = 0.005


@dataclass
class Bridge:
    """A simulated bridge: a core, its ports, which are blocked."""

    core: LoopCore
    blocked: set[str] = field(default_factory=set)
    flushes: int = 0
    alerts: list[Alert] = field(default_factory=list)


class Net:
    """Bridges joined by links; frames flood like broadcasts (hop-limited, instant)."""

    def __init__(self, timing: LoopTiming | None = None) -> None:
        self.timing = timing or LoopTiming()
        self.bridges: dict[str, Bridge] = {}
        self.links: dict[tuple[str, str], tuple[str, str]] = {}
        self.now = 100.0

    def bridge(self, vna: str) -> Bridge:
        if vna not in self.bridges:
            self.bridges[vna] = Bridge(LoopCore(vna, "ov", self.timing))
        return self.bridges[vna]

    def port(self, vna: str, port: str, kind: PortKind = PortKind.TUNNEL, peer: str | None = None) -> None:
        self.apply(vna, self.bridge(vna).core.add_port(port, kind, port, self.now, peer=peer))

    def link(self, a: str, pa: str, b: str, pb: str) -> None:
        """A tunnel between two VNAs (a port at each end, each knowing the VNA at the other)."""
        self.port(a, pa, peer=b)
        self.port(b, pb, peer=a)
        self.links[(a, pa)] = (b, pb)
        self.links[(b, pb)] = (a, pa)

    def unlink(self, a: str, pa: str) -> None:
        b, pb = self.links.pop((a, pa))
        del self.links[(b, pb)]
        for vna, port in ((a, pa), (b, pb)):
            self.apply(vna, self.bridges[vna].core.remove_port(port, self.now))
            self.bridges[vna].blocked.discard(port)

    def apply(self, vna: str, actions: list[Block | Unblock | Flush | Alert]) -> None:
        br = self.bridges[vna]
        for a in actions:
            if isinstance(a, Block):
                br.blocked.add(a.port)
            elif isinstance(a, Unblock):
                br.blocked.discard(a.port)
            elif isinstance(a, Flush):
                br.flushes += 1
            else:
                br.alerts.append(a)

    def send(self, vna: str, port: str, frame: bytes) -> None:
        """A frame leaves ``vna`` by ``port`` (below the bridge, like the packet socket); flood it on."""
        queue: deque[tuple[str, str, int]] = deque([(vna, port, 8)])
        while queue:
            src, sport, ttl = queue.popleft()
            dst = self.links.get((src, sport))
            if dst is None or ttl == 0:
                continue
            vna_in, port_in = dst
            br = self.bridges[vna_in]
            self.apply(vna_in, br.core.receive(frame, port_in, self.now))  # seen even on a blocked port
            if port_in in br.blocked:
                continue  # the bridge drops it
            for out in br.core.ports:
                if out != port_in and out not in br.blocked:
                    queue.append((vna_in, out, ttl - 1))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            for vna, br in self.bridges.items():
                self.apply(vna, br.core.tick(self.now))
                if br.core.round_due(self.now):
                    for port, frame in br.core.make_round(self.now):
                        self.send(vna, port, frame)

    def kinds(self, vna: str) -> list[ConflictKind]:
        return [a.kind for a in self.bridges[vna].alerts]


def test_probe_round_trip_and_rejects() -> None:
    frame = encode_probe(b"k" * 32, b"\x02SF\x00\x00\x01", "vna7", b"12345678", 9, 3, 1, 2)
    assert len(frame) >= 60 and frame[:6] == PROBE_DST and int.from_bytes(frame[12:14]) == PROBE_ETHERTYPE
    p = decode_probe(frame)
    assert p is not None and (p.vna_id, p.instance, p.seq, p.port_no, p.flags, p.tc) == (
        "vna7",
        b"12345678",
        9,
        3,
        1,
        2,
    )
    assert decode_probe(b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(46)) is None  # an ARP
    assert decode_probe(frame[:30]) is None


def test_a_forged_own_probe_is_not_a_loop() -> None:
    core = LoopCore("vna1", "ov")
    core.add_port("a", PortKind.TUNNEL, "a", 0.0)
    core.add_port("b", PortKind.TUNNEL, "b", 0.0)
    core.make_round(0.0)  # probes 1 (on a) and 2 (on b) are out
    forged = encode_probe(b"x" * 32, core.src, "vna1", core.instance, 1, 1, 0, 0)  # right header, wrong key
    assert core.receive(forged, "b", 0.01) == [] and core.status(0.01).state is LoopState.OK
    assert core.counters.bad_probes == 1


def test_no_loop_no_block() -> None:
    net = Net()
    net.link("vna1", "t12", "vna2", "t21")
    net.link("vna2", "t23", "vna3", "t32")
    net.port("vna1", "lan", PortKind.SEGMENT)
    net.run(2.0)
    assert all(not b.blocked and not b.alerts for b in net.bridges.values())
    assert net.bridges["vna1"].core.status(net.now).peers == ["vna2", "vna3"]


def test_two_tunnels_between_two_vnas_one_block_at_the_higher_id_on_the_newest_tunnel() -> None:
    net = Net()
    net.link("vna1", "first1", "vna2", "first2")
    net.run(1.0)  # they know each other
    net.link("vna1", "second1", "vna2", "second2")
    net.run(1.0)
    assert net.bridges["vna2"].blocked == {"second2"}
    assert net.bridges["vna1"].blocked == set()
    assert ConflictKind.LOOP in net.kinds("vna1") and ConflictKind.LOOP in net.kinds("vna2")
    assert net.kinds("vna2").count(ConflictKind.LOOP_BLOCKED) == 1
    assert net.bridges["vna1"].flushes >= 1  # vna2's topology change reached it
    st = net.bridges["vna2"].core.status(net.now)
    assert st.state is LoopState.BLOCKING and st.blocked[0].port == "second2" and "first2" in st.blocked[0].reason
    net.run(3.0)  # stable: probes keep crossing the blocked port, it stays blocked
    assert net.bridges["vna2"].blocked == {"second2"} and net.kinds("vna2").count(ConflictKind.LOOP_BLOCKED) == 1
    assert net.bridges["vna1"].core.status(net.now).state is LoopState.OK


def test_the_blocked_port_forwards_again_when_the_other_path_goes() -> None:
    net = Net()
    net.link("vna1", "first1", "vna2", "first2")
    net.run(1.0)
    net.link("vna1", "second1", "vna2", "second2")
    net.run(1.0)
    assert net.bridges["vna2"].blocked == {"second2"}
    net.unlink("vna1", "first1")
    net.run(net.timing.clear_s * 1.5)
    assert net.bridges["vna2"].blocked == {"second2"}  # the higher end waits twice clear_s of quiet (and a bit)
    net.run(net.timing.clear_s * 1.2)
    assert net.bridges["vna2"].blocked == set()
    assert net.kinds("vna2")[-1] is ConflictKind.LOOP_CLEARED
    net.run(2.0)
    assert net.bridges["vna2"].blocked == set()  # no loop left: no new block


def test_removing_the_blocked_tunnel_clears_it() -> None:
    net = Net()
    net.link("vna1", "first1", "vna2", "first2")
    net.run(1.0)
    net.link("vna1", "second1", "vna2", "second2")
    net.run(1.0)
    net.unlink("vna1", "second1")
    assert net.kinds("vna2")[-1] is ConflictKind.LOOP_CLEARED
    net.run(2.0)
    assert all(not b.blocked for b in net.bridges.values())


def test_a_ring_of_three_is_broken_once_by_the_highest_id() -> None:
    net = Net()
    net.link("vna1", "t12", "vna2", "t21")
    net.link("vna2", "t23", "vna3", "t32")
    net.run(1.0)
    net.link("vna3", "t31", "vna1", "t13")  # closes the ring
    net.run(2.0)
    blocked = {v: b.blocked for v, b in net.bridges.items() if b.blocked}
    assert blocked == {"vna3": {"t31"}}, blocked  # vna3's newest tunnel
    for vna in ("vna1", "vna2"):
        assert ConflictKind.LOOP_BLOCKED not in net.kinds(vna)


def test_a_loop_through_a_lan_blocks_a_tunnel_not_the_segment() -> None:
    """Two VNAs on the same LAN, both tunnelled to a third: the LAN closes the loop."""
    net = Net()
    net.link("vnb", "t-b-c", "vnc", "t-c-b")
    net.run(1.0)
    net.bridge("vna")
    net.port("vna", "lan-a", PortKind.SEGMENT)
    net.port("vnb", "lan-b", PortKind.SEGMENT)
    net.links[("vna", "lan-a")] = ("vnb", "lan-b")  # the LAN between them
    net.links[("vnb", "lan-b")] = ("vna", "lan-a")
    net.run(1.0)
    net.link("vna", "t-a-c", "vnc", "t-c-a")
    net.run(2.0)
    blocked = {v: b.blocked for v, b in net.bridges.items() if b.blocked}
    assert blocked == {"vnc": {"t-c-a"}}, blocked


def test_a_flap_is_reported_once_and_triggers_a_probe_round() -> None:
    core = LoopCore("vna1", "ov")
    core.add_port("a", PortKind.TUNNEL, "a", 0.0)
    core.make_round(0.0)
    assert not core.round_due(0.05)
    out = core.on_flap("52:54:00:00:01:14", ["a", "b"], 0.05)
    assert [(x.kind, x.detector) for x in out if isinstance(x, Alert)] == [(ConflictKind.LOOP, LoopDetector.MAC_FLAP)]
    assert core.round_due(0.05) and core.in_episode(0.06)
    assert core.on_flap("52:54:00:00:01:15", ["a", "b"], 0.07) == []  # one alert per episode
    core.tick(0.07 + core.t.clear_s + 0.01)
    assert not core.in_episode(0.07 + core.t.clear_s + 0.01)


def test_a_loop_there_from_the_start_is_broken_once() -> None:
    """Neither VNA has heard the other when the loop appears: the new-port hold keeps them from both blocking."""
    net = Net()
    net.link("vna1", "first1", "vna2", "first2")
    net.link("vna1", "second1", "vna2", "second2")
    net.run(3.0)
    blocked = {v: b.blocked for v, b in net.bridges.items() if b.blocked}
    assert blocked == {"vna2": {"second2"}}, blocked
    assert net.kinds("vna2").count(ConflictKind.LOOP_BLOCKED) == 1


def test_a_ring_of_four_with_two_local_maxima_is_broken_once() -> None:
    """vna3 and vna4 both have only lower neighbours; only the highest of the ring blocks."""
    net = Net()
    net.link("vna1", "t13", "vna3", "t31")
    net.link("vna3", "t32", "vna2", "t23")
    net.link("vna2", "t24", "vna4", "t42")
    net.run(1.0)
    net.link("vna4", "t41", "vna1", "t14")
    net.run(3.0)
    blocked = {v: b.blocked for v, b in net.bridges.items() if b.blocked}
    assert blocked == {"vna4": {"t41"}}, blocked


def test_a_lower_vna_blocks_when_the_higher_one_does_not_protect() -> None:
    """A loop through a VNA that sends no probes (an old agent, a plain bridge): the other one acts."""
    net = Net()
    net.link("vna1", "a1", "vna9", "a9")
    net.link("vna1", "b1", "vna9", "b9")
    silent = net.bridges["vna9"].core
    silent.make_round = lambda now: []  # type: ignore[method-assign]
    silent.round_due = lambda now: False  # type: ignore[method-assign]
    net.run(2.0)
    assert net.bridges["vna1"].blocked == {"b1"}


def test_both_ends_of_one_link_blocked_the_lower_lets_go_and_the_higher_keeps_it() -> None:
    """Neither heard the other in time (a starved CPU, probes queued in a storm): both blocked the same link."""
    net = Net()
    net.link("vna1", "first1", "vna2", "first2")
    net.run(1.0)
    net.link("vna1", "second1", "vna2", "second2")
    for vna, port in (("vna1", "second1"), ("vna2", "second2")):  # as if each had decided alone
        core = net.bridges[vna].core
        pair = next(iter(core._pairs.values()), None)
        net.apply(vna, core._block([pair] if pair else [_pair("first" + vna[-1], port, net.now)], net.now))
    assert net.bridges["vna1"].blocked == {"second1"} and net.bridges["vna2"].blocked == {"second2"}
    net.run(4.0)
    assert net.bridges["vna1"].blocked == set() and net.bridges["vna2"].blocked == {"second2"}
    assert net.kinds("vna1")[-1] is ConflictKind.LOOP_CLEARED


def test_a_mac_flapping_between_two_tunnels_to_a_lower_vna_blocks_at_once() -> None:
    """The probes may be stuck behind a storm in the tunnels; parallel tunnels flapping is enough."""
    core = LoopCore("vna2", "ov")
    for name in ("first2", "second2"):
        core.add_port(name, PortKind.TUNNEL, name, 0.0, peer="vna1")
    peer_probe = LoopCore("vna1", "ov")
    peer_probe.add_port("x", PortKind.TUNNEL, "x", 0.0)
    ((_, frame),) = peer_probe.make_round(0.0)
    core.receive(frame, "first2", 0.01)  # vna1 is heard
    out = core.on_flap("52:54:00:00:01:14", ["first2", "second2"], 2.0)
    assert [a.port for a in out if isinstance(a, Block)] == ["second2"]
    lower = LoopCore("vna1", "ov")
    for name in ("first1", "second1"):
        lower.add_port(name, PortKind.TUNNEL, name, 0.0, peer="vna2")
    assert not [a for a in lower.on_flap("52:54:00:00:01:14", ["first1", "second1"], 2.0) if isinstance(a, Block)]


def _pair(a: str, b: str, now: float):  # type: ignore[no-untyped-def]
    from vna_agent.loopguard import _Pair

    x, y = sorted((a, b))
    return _Pair((x, y), now, now, now)


def test_loop_probes_are_not_counted_as_flows() -> None:
    from vna_agent.dataplane.stats import Direction
    from vna_agent.flows import FlowTable

    table = FlowTable("ov")
    core = LoopCore("vna1", "ov")
    core.add_port("a", PortKind.TUNNEL, "a", 0.0)
    ((_, frame),) = core.make_round(0.0)
    table.hook(memoryview(frame), False, Direction.OUT)
    assert table.drain()[2] == {}
