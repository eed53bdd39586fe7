"""``skyferry status``: who is on the bus (NATS micro discovery) and their latest heartbeats."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Annotated, Any

import typer
from nats.aio.msg import Msg

from bus import codec
from bus.errors import CodecError
from bus.subjects import STATUS_ALL
from manager.cli.context import Session, run_session
from manager.cli.output import Column

SERVICE_COLUMNS = (
    Column("Name", "name"),
    Column("Id", "id"),
    Column("Version", "version"),
    Column("Endpoints", "endpoints"),
    Column("Requests", "requests"),
    Column("Errors", "errors"),
    Column("Description", "description"),
)
HEARTBEAT_COLUMNS = (
    Column("Service", "service"),
    Column("Instance", "instance"),
    Column("Host", "host"),
    Column("Pid", "pid"),
    Column("Age (s)", "age_s"),
    Column("Health", "health"),
    Column("Details", "details"),
)


async def _collect(s: Session, subject: str, wait: float) -> list[dict[str, Any]]:
    """Publish one discovery request and gather every reply for ``wait`` seconds."""
    replies: list[dict[str, Any]] = []

    async def on_reply(msg: Msg) -> None:
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(data, dict):
            replies.append(data)

    inbox = s.bus.nc.new_inbox()
    sub = await s.bus.nc.subscribe(inbox, cb=on_reply)
    try:
        await s.bus.nc.publish(subject, b"", reply=inbox)
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return replies


async def _heartbeats(s: Session, wait: float) -> list[dict[str, Any]]:
    """The latest heartbeat per (service, instance) seen within ``wait`` seconds."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}

    async def on_beat(msg: Msg) -> None:
        try:
            data = codec.decode_mapping(msg.data, codec.content_type_of(msg.headers))
        except CodecError:
            return
        latest[(str(data.get("service")), str(data.get("instance")))] = data

    sub = await s.bus.nc.subscribe(STATUS_ALL, cb=on_beat)
    try:
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    now = dt.datetime.now(dt.UTC)
    for beat in latest.values():
        try:
            beat["age_s"] = round((now - dt.datetime.fromisoformat(str(beat.get("time")))).total_seconds(), 1)
        except (TypeError, ValueError):
            beat["age_s"] = None
    return sorted(latest.values(), key=lambda b: (str(b.get("service")), str(b.get("instance"))))


async def discover(s: Session, wait: float) -> dict[str, list[dict[str, Any]]]:
    """Services (``$SRV.INFO`` merged with ``$SRV.STATS``) and heartbeats, gathered concurrently."""
    infos, stats, beats = await asyncio.gather(
        _collect(s, "$SRV.INFO", wait), _collect(s, "$SRV.STATS", wait), _heartbeats(s, wait)
    )
    by_id = {st.get("id"): st for st in stats}
    services = []
    for info in sorted(infos, key=lambda i: (str(i.get("name")), str(i.get("id")))):
        st = by_id.get(info.get("id"), {})
        endpoints = st.get("endpoints") or []
        services.append(
            {
                "name": info.get("name"),
                "id": info.get("id"),
                "version": info.get("version"),
                "description": info.get("description"),
                "endpoints": len(info.get("endpoints") or []),
                "requests": sum(int(e.get("num_requests", 0)) for e in endpoints),
                "errors": sum(int(e.get("num_errors", 0)) for e in endpoints),
                "metadata": info.get("metadata") or {},
            }
        )
    return {"services": services, "heartbeats": beats}


def status(
    ctx: typer.Context,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0.1, help="Seconds to collect replies and heartbeats (heartbeats come every ~5 s)."),
    ] = 1.0,
) -> None:
    """Discover the services on the bus and show their latest heartbeats."""

    async def body(s: Session) -> None:
        found = await discover(s, wait)
        if not s.out.human:
            s.out.document(found)
            return
        s.out.table("Services", SERVICE_COLUMNS, found["services"], empty="no service answered")
        s.out.table("Heartbeats", HEARTBEAT_COLUMNS, found["heartbeats"], empty=f"none within {wait:g} s")

    run_session(ctx, body)
