"""BusService on a real server: micro discovery, schema metadata, typed errors."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from bus import codec
from bus.client import command
from bus.connection import Bus
from bus.errors import InternalError, NoResponders, NotFound, UnknownCommand, ValidationFailed
from bus.service import BusService, CommandContext


class Echo(BaseModel):
    text: str


class Echoed(BaseModel):
    text: str
    actor: str | None


async def _collect(bus: Bus, subject: str, wait: float = 0.3) -> list[dict[str, object]]:
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subject, b"", reply=inbox)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=wait)
            out.append(json.loads(msg.data))
    except Exception:
        pass
    await sub.unsubscribe()
    return out


@pytest.fixture
async def echo_service(bus: Bus) -> BusService:
    svc = BusService(bus, "echo", "1.2.3", "echoes")

    @svc.command("say", Echo, Echoed, description="echo the text")
    async def say(ctx: CommandContext, req: Echo) -> Echoed:
        if req.text == "missing":
            raise NotFound("no such thing")
        if req.text == "crash":
            raise RuntimeError("boom")
        return Echoed(text=req.text, actor=ctx.envelope.actor)

    await svc.start()
    return svc


async def test_discovery_ping_info_stats(bus: Bus, echo_service: BusService) -> None:
    pings = await _collect(bus, "$SRV.PING.echo")
    assert [p["name"] for p in pings] == ["echo"]
    (info,) = await _collect(bus, "$SRV.INFO.echo")
    (ep,) = info["endpoints"]  # type: ignore[misc]
    assert ep["subject"] == "sf.cmd.echo.say"
    assert ep["metadata"]["request_schema"] == "skyferry.v1.Echo"
    assert ep["metadata"]["response_schema"] == "skyferry.v1.Echoed"
    await command(bus, "echo", "say", Echo(text="hi"), Echoed)
    (stats,) = await _collect(bus, "$SRV.STATS.echo")
    assert stats["endpoints"][0]["num_requests"] == 1  # type: ignore[index]


async def test_typed_errors(bus: Bus, echo_service: BusService) -> None:
    assert (await command(bus, "echo", "say", Echo(text="hi"), Echoed)).text == "hi"
    with pytest.raises(NotFound):
        await command(bus, "echo", "say", Echo(text="missing"), Echoed)
    with pytest.raises(InternalError):
        await command(bus, "echo", "say", Echo(text="crash"), Echoed)
    with pytest.raises(ValidationFailed):
        await command(bus, "echo", "say", {"text": 5, "extra": 1}, Echoed)
    with pytest.raises(UnknownCommand):
        await command(bus, "echo", "shout", Echo(text="hi"), Echoed)
    with pytest.raises(NoResponders):
        await command(bus, "nobody", "say", Echo(text="hi"), Echoed, timeout=1)


async def test_plain_json_request_gets_json_reply(bus: Bus, echo_service: BusService) -> None:
    msg = await bus.nc.request(
        "sf.cmd.echo.say", b'{"text":"plain"}', headers={"Content-Type": "application/json"}, timeout=2
    )
    assert json.loads(msg.data) == {"text": "plain", "actor": None}
    msg = await bus.nc.request("sf.cmd.echo.say", codec.encode({"text": 1}), timeout=2)
    assert codec.decode(msg.data)["code"] == "validation"


async def test_requests_in_flight_survive_a_stop(bus: Bus, echo_service: BusService) -> None:
    results = await asyncio.gather(*(command(bus, "echo", "say", Echo(text=str(i)), Echoed) for i in range(20)))
    assert [r.text for r in results] == [str(i) for i in range(20)]
    await echo_service.stop()
    with pytest.raises(NoResponders):
        await command(bus, "echo", "say", Echo(text="x"), Echoed, timeout=1)
