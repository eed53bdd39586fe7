"""Periodic status/heartbeat of a bus participant on ``sf.status.<service>.<instance>``."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from bus import codec, subjects
from bus.connection import Bus
from bus.subjects import Header


class Heartbeat(BaseModel):
    """One status message."""

    __schema_name__ = "skyferry.v1.status.heartbeat"
    service: str
    instance: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    time: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    health: str = "ok"
    details: dict[str, Any] = Field(default_factory=dict)


async def run_heartbeat(
    bus: Bus,
    service: str,
    instance: str,
    *,
    interval_s: float = 5.0,
    details: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Publish a heartbeat every ``interval_s`` until cancelled."""
    subject = subjects.status(service, instance)
    while True:
        hb = Heartbeat(service=service, instance=instance, details=details() if details else {})
        if not bus.nc.is_closed:
            await bus.nc.publish(subject, codec.encode(hb), headers={Header.SCHEMA.value: Heartbeat.__schema_name__})
        await asyncio.sleep(interval_s)
