"""Switch (Linux bridge) operations over netlink in a throw-away namespace (root only)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from vna_agent.dataplane.errors import SwitchError
from vna_agent.dataplane.switch import Switch

from .nslab import has_root, run

pytestmark = [pytest.mark.root, pytest.mark.skipif(not has_root(), reason="needs root")]


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    name = f"sfd{secrets.token_hex(2)}w"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


async def test_bridge_life_cycle(ns: str) -> None:
    p = ns[:7]
    sw = Switch(f"{p}br", netns=ns)
    assert not await sw.exists()
    await sw.create(ageing=30)
    await sw.create(ageing=30)  # idempotent
    assert await sw.exists()
    run("ip", "-n", ns, "link", "add", f"{p}v0", "type", "veth", "peer", "name", f"{p}v1")
    await sw.add_port(f"{p}v0", mtu=1400)
    assert await sw.ports() == [f"{p}v0"]
    out = run("ip", "-n", ns, "-d", "link", "show", f"{p}br").stdout
    assert "ageing_time 3000" in out
    await sw.set_ageing(1.5)
    assert "ageing_time 150" in run("ip", "-n", ns, "-d", "link", "show", f"{p}br").stdout
    fdb = await sw.fdb()
    assert any(e.local and e.port == f"{p}v0" for e in fdb)  # the port's own MAC
    await sw.remove_port(f"{p}v0")
    assert await sw.ports() == []
    with pytest.raises(SwitchError):
        await sw.add_port(f"{p}nope")
    await sw.delete()
    assert not await sw.exists()
