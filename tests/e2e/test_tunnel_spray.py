"""Black-box spray of tunnel ports in the lab (issue 9).

While a datagram and a stream tunnel each carry a TCP transfer, another lab
host sprays both tunnel ports for 30 s with random and wire-shaped junk
(bounded rate, lab addresses only, receiver index as an on-path host would
read it): both transfers arrive intact, the agents stay up and their tunnels
too, every injected datagram and junk connection is a counted drop at the
server, and the agents' memory stays flat.
"""

from __future__ import annotations

import pytest

from tests.e2e import spray
from tests.e2e.overlay_fixtures import Vnas, needs_root

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]

SECONDS = 30.0
RATE = 4_000_000  # bytes/s per transfer: the sprayed tunnels are busy, the 2-core machine is not saturated
UDP_RATE = 1000.0
TCP_RATE = 20.0
RSS_GROWTH_KIB = 16 * 1024


@pytest.mark.parametrize("data_path", ["native", "python"])
async def test_sprayed_tunnels_keep_carrying_and_count_every_junk_packet(  # type: ignore[no-untyped-def]
    vnas_for, monkeypatch: pytest.MonkeyPatch, data_path: str
) -> None:
    """Both data paths: the native fast path (when built) and the Python one (``SKYFERRY_FASTPATH=0``)."""
    monkeypatch.setenv("SKYFERRY_FASTPATH", "1" if data_path == "native" else "0")  # the agent processes inherit it
    vn: Vnas = await vnas_for(spray.SAMPLE, external=spray.VNAS)
    await spray.build(vn)
    r = await spray.run_round(vn, seconds=SECONDS, rate=RATE, udp_rate=UDP_RATE, tcp_rate=TCP_RATE)

    for mode, t in r.transfers.items():
        assert t.intact, (mode, t.sent, t.received)
        assert t.sent["bytes"] >= 0.5 * RATE * SECONDS, (mode, t.sent)  # it kept flowing during the spray
    assert all(r.alive.values()), r.alive

    sent = r.sprayed
    assert sent["udp"] >= 0.9 * UDP_RATE * SECONDS and sent["tcp"] >= 0.5 * TCP_RATE * SECONDS, sent
    # every datagram the server's kernel handed to the tunnel is counted (the kernel's own drops are its)
    uncounted = sent["udp"] - r.kernel_udp_errors - r.counted("datagram")
    known_gap = data_path == "native" and 0 < uncounted <= sent.get("udp_empty", 0)
    assert uncounted <= 0 or known_gap, (uncounted, sent, r.delta("datagram"))
    # every junk connection leaves at least one counted trace (refused handshake, framing error, cut short...)
    assert r.counted("stream") >= sent["tcp"], (sent, r.delta("stream"))

    for vna, samples in r.rss_kib.items():  # sampled each second from the spray's start
        assert max(samples) - samples[0] <= RSS_GROWTH_KIB, (vna, samples)

    after = await spray.tunnels(vn, spray.SERVER)
    assert {m: t.state for m, t in after.items()} == {"datagram": "up", "stream": "up"}
    assert all(t.fastpath == (data_path == "native") for t in after.values()) or data_path == "native", after
    for mode, (_, src, _) in spray.PATHS.items():
        assert await spray.ping_ok(vn, src), f"{src} no longer reaches the sink over the {mode} tunnel"
    if known_gap:  # everything else held; passes by itself once the native core counts empty datagrams
        pytest.xfail(
            f"native fast path: {uncounted} zero-length datagrams were not counted "
            "(_fastpath_core.c fp_on_datagram returns on n == 0 without a drop; the Python path counts them)"
        )
