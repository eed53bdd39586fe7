"""The VNA agent on the bus: commands on ``sf.agent.<vna-id>.<verb>``, heartbeats, flows, alerts."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import structlog
from pydantic import BaseModel

from bus import codec, subjects
from bus.connection import Bus
from bus.heartbeat import run_heartbeat
from bus.messages import Empty
from bus.service import BusService, CommandContext
from bus.subjects import Header
from bus.vna import (
    Ack,
    Conflict,
    ConflictKind,
    Discovery,
    IdentityView,
    MacFlush,
    OverlayRef,
    SegmentJoin,
    SegmentLeave,
    SwitchCreate,
    SwitchStatus,
    TunnelAdd,
    TunnelRef,
    TunnelStatus,
    VnaStatus,
)
from vna_agent.agent import VnaAgent

log = structlog.get_logger(__name__)
SERVICE = "vna"
VERSION = "0.1.0"
#: Alerts about loops jump the queue: in a storm they must not wait behind hundreds of MAC moves.
URGENT = frozenset({ConflictKind.LOOP, ConflictKind.LOOP_BLOCKED, ConflictKind.LOOP_CLEARED})
ALERT_BACKLOG = 1024


class VnaAgentService:
    """Runs a :class:`VnaAgent` as a bus participant.

    NATS permissions decide who may command an agent: only the manager and
    component (VNM) roles may publish on ``sf.agent.>``. Alerts (MAC moves, loops
    found, blocked and cleared) arrive from the agent's data-plane thread as they
    happen and are published on ``sf.alert.<overlay>.<vna>``, loop alerts first.
    """

    def __init__(
        self,
        bus: Bus,
        agent: VnaAgent,
        *,
        flow_interval_s: float = 5.0,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.bus = bus
        self.agent = agent
        self.flow_interval_s = flow_interval_s
        self.heartbeat_s = heartbeat_s
        self._urgent: deque[Conflict] = deque(maxlen=ALERT_BACKLOG)
        self._alerts: deque[Conflict] = deque(maxlen=ALERT_BACKLOG)
        self._alert_ready = asyncio.Event()
        self.alerts_dropped = 0
        self.service = BusService(
            bus,
            SERVICE,
            VERSION,
            "Skyferry VNA agent",
            subject_prefix=subjects.agent_group(agent.vna_id),
            instance_metadata={"vna_id": agent.vna_id},
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._register()

    def _register(self) -> None:
        a = self.agent
        add = self.service.add_command_spec

        async def identity(ctx: CommandContext, req: Empty) -> IdentityView:
            return IdentityView(vna_id=a.vna_id, public_key=a.identity.public.b64())

        async def switch_create(ctx: CommandContext, req: SwitchCreate) -> SwitchStatus:
            return await a.switch_status(await a.switch_create(req.overlay_id, req.mtu))

        # Commands are declarative, so the kernel state is both the effect and the record of it: a
        # re-run finds its spec in place and gets the first answer; a keyed removal of what is already
        # gone succeeds (the first run removed it). See docs/sagas.md, "Exactly once".

        # The agent stores what it accepted (state.json) before it answers and re-applies it after a
        # restart, so these hold across an agent crash too.

        async def switch_remove(ctx: CommandContext, req: OverlayRef) -> Ack:
            if ctx.idempotency is not None and req.overlay_id not in a.switches:
                a.forget_switch(req.overlay_id)
                return Ack()
            await a.switch_remove(req.overlay_id)
            return Ack()

        async def segment_join(ctx: CommandContext, req: SegmentJoin) -> Ack:
            await a.segment_join(req)  # already joined: the same answer
            return Ack()

        async def segment_leave(ctx: CommandContext, req: SegmentLeave) -> Ack:
            joined = a.switches.get(req.overlay_id)
            if ctx.idempotency is not None and (joined is None or req.interface not in joined.segments):
                a.forget_join(req.overlay_id, req.interface)
                return Ack()
            await a.segment_leave(req.overlay_id, req.interface)
            return Ack()

        async def tunnel_add(ctx: CommandContext, req: TunnelAdd) -> TunnelStatus:
            existing = a.tunnels.get(req.tunnel_id)
            if existing is not None and existing.spec == req:
                return a.tunnel_status(existing)
            await a.tunnel_add(req)  # a different spec under the same id is refused (already_exists)
            return a.tunnel_status(a.tunnels[req.tunnel_id])

        async def tunnel_remove(ctx: CommandContext, req: TunnelRef) -> Ack:
            if ctx.idempotency is not None and req.tunnel_id not in a.tunnels:
                a.forget_tunnel(req.tunnel_id)
                return Ack()
            await a.tunnel_remove(req.tunnel_id)
            return Ack()

        async def mac_flush(ctx: CommandContext, req: MacFlush) -> Ack:
            n = await a.mac_flush(req.overlay_id, req.mac)
            return Ack(detail=f"{n} entries flushed")

        async def status(ctx: CommandContext, req: Empty) -> VnaStatus:
            return await a.status()

        async def discover(ctx: CommandContext, req: Empty) -> Discovery:
            return await a.discover()

        add("identity", Empty, IdentityView, identity, "the VNA's static X25519 public key")
        add("switch_create", SwitchCreate, SwitchStatus, switch_create, "create an overlay's software switch")
        add("switch_remove", OverlayRef, Ack, switch_remove, "remove an overlay's switch, its tunnels and joins")
        add("segment_join", SegmentJoin, Ack, segment_join, "join a local segment to an overlay switch")
        add("segment_leave", SegmentLeave, Ack, segment_leave, "detach a local segment")
        add("tunnel_add", TunnelAdd, TunnelStatus, tunnel_add, "add a tunnel server or client")
        add("tunnel_remove", TunnelRef, Ack, tunnel_remove, "remove a tunnel")
        add("mac_flush", MacFlush, Ack, mac_flush, "forget where a MAC was learned")
        add("status", Empty, VnaStatus, status, "switches, ports, tunnels, health")
        add("discover", Empty, Discovery, discover, "LANs, subnets and hosts this VNA can see")

    async def start(self) -> None:
        await self.service.start()
        loop = asyncio.get_running_loop()

        def sink(alert: Conflict) -> None:  # on the data-plane thread
            loop.call_soon_threadsafe(self._enqueue_alert, alert)

        self.agent.set_alert_sink(sink)
        vid = self.agent.vna_id
        self._tasks = [
            asyncio.create_task(
                run_heartbeat(
                    self.bus,
                    SERVICE,
                    vid,
                    interval_s=self.heartbeat_s,
                    details=self._heartbeat_details,
                )
            ),
            asyncio.create_task(self._publish_flows()),
            asyncio.create_task(self._publish_alerts()),
        ]

    def _heartbeat_details(self) -> dict[str, Any]:
        a = self.agent
        out: dict[str, Any] = {"tunnels": len(a.tunnels), "switches": len(a.switches)}
        if a.state_error is not None:  # loud until the agent is restarted on a good file
            out["state_error"] = a.state_error.message
            out["state_quarantined"] = str(a.state_quarantined)
        if unapplied := a.unapplied():
            out["unapplied"] = unapplied
        return out

    async def stop(self) -> None:
        self.agent.set_alert_sink(None)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.service.stop()

    async def _js_publish(self, subject: str, model: BaseModel) -> None:
        schema = getattr(model, "__schema_name__", "")
        try:
            await self.bus.js.publish(subject, codec.encode(model), headers={Header.SCHEMA.value: schema}, timeout=2.0)
        except Exception as exc:  # a publish lost to a bus outage must not kill the agent
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # nats-py turns a cancellation inside publish into an ordinary error; swallowing it
                # here kept the flow/conflict loops alive and stop() waiting for them forever.
                raise asyncio.CancelledError from exc
            log.warning("publish_failed", subject=subject, error=repr(exc))

    async def publish_flows_once(self) -> None:
        for sw in list(self.agent.switches.values()):
            stats, conflicts = self.agent.flow_stats(sw)
            await self._js_publish(subjects.flow(sw.overlay_id, self.agent.vna_id), stats)
            for c in conflicts:
                await self._js_publish(subjects.alert(sw.overlay_id, self.agent.vna_id), c)

    async def _publish_flows(self) -> None:
        while True:
            await asyncio.sleep(self.flow_interval_s)
            await self.publish_flows_once()

    def _enqueue_alert(self, alert: Conflict) -> None:
        """On the bus loop: queue an alert from the data plane (the oldest goes when the backlog is full)."""
        queue = self._urgent if alert.kind in URGENT else self._alerts
        if len(queue) == queue.maxlen:
            self.alerts_dropped += 1
            log.warning("alert_dropped", kind=queue[0].kind.value, backlog=len(queue), dropped=self.alerts_dropped)
        queue.append(alert)
        self._alert_ready.set()

    async def _publish_alerts(self) -> None:
        while True:
            await self._alert_ready.wait()
            self._alert_ready.clear()
            while self._urgent or self._alerts:
                c = self._urgent.popleft() if self._urgent else self._alerts.popleft()
                log.info("vna_alert", kind=c.kind.value, overlay=c.overlay_id, mac=c.mac, port=c.port, ports=c.ports)
                await self._js_publish(subjects.alert(c.overlay_id, self.agent.vna_id), c)

    async def __aenter__(self) -> VnaAgentService:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
