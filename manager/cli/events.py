"""``skyferry events tail``: follow the SF_EVENTS stream with an ordered consumer.

An ordered consumer is ephemeral, in memory, unacknowledged and recreated by
the client on a gap, so tailing never leaves state behind on the server and
never misses or repeats an event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.text import Text

from bus import subjects
from bus.errors import CodecError
from bus.kinds import Aggregate
from bus.messages import EVENT_PREFIX
from bus.subjects import EVENTS_STREAM
from manager.cli.context import Session, run_session
from manager.cli.errors import CliError
from manager.cli.output import Output
from manager.store.recorder import stored_from_message

events_app = typer.Typer(help="The event stream: the source of truth, live.", no_args_is_help=True)

PAYLOAD_WIDTH = 100


@dataclass(frozen=True)
class TailOptions:
    """Which events to show and when to stop."""

    aggregate: str | None = None
    aggregate_id: str | None = None
    from_start: bool = False
    last: int | None = None
    count: int | None = None
    follow: bool = True

    @property
    def subject(self) -> str:
        if self.aggregate_id is not None:
            if self.aggregate is None:
                raise CliError("--id needs --aggregate")
            return subjects.event(self.aggregate, self.aggregate_id)
        return subjects.events_of(self.aggregate)


async def _start(s: Session, opts: TailOptions) -> tuple[ConsumerConfig | None, int]:
    """Consumer start and how many leading events to skip; ``None`` when there is nothing to show."""
    if not (opts.from_start or opts.last is not None):
        if not opts.follow:
            raise CliError("--no-follow needs --from-start or --last")
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW), 0
    filtered = opts.subject != subjects.EVENTS_ALL
    info = await s.bus.js.stream_info(EVENTS_STREAM, subjects_filter=opts.subject if filtered else None)
    total = sum((info.state.subjects or {}).values()) if filtered else info.state.messages
    if total == 0 and not opts.follow:
        return None, 0
    if opts.last is None or opts.last >= total:
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL), 0
    if filtered:  # positions of one aggregate type are not contiguous: read them all, show the last N
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL), total - opts.last
    start = max(info.state.last_seq - opts.last + 1, 1)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start), 0


def event_record(subject: str, position: int, headers: dict[str, str] | None, data: bytes) -> dict[str, Any]:
    """One event as plain data (payload decoded; undecodable payloads shown as an error)."""
    try:
        ev = stored_from_message(subject, position, headers, data)
    except (CodecError, ValueError) as exc:
        return {"position": position, "subject": subject, "error": str(exc)}
    return {
        "position": ev.position,
        "time": ev.timestamp.isoformat(),
        "subject": subject,
        "aggregate": ev.aggregate_type,
        "id": ev.aggregate_id,
        "event_type": ev.event_type,
        "actor": ev.actor,
        "msg_id": ev.msg_id,
        "correlation_id": ev.correlation_id,
        "data": ev.data,
    }


async def tail_events(s: Session, opts: TailOptions, on_event: Callable[[dict[str, Any]], None]) -> int:
    """Deliver events to ``on_event`` until ``count`` is reached or, without follow, the end."""
    config, skip = await _start(s, opts)
    if config is None:
        return 0
    sub = await s.bus.js.subscribe(opts.subject, stream=EVENTS_STREAM, ordered_consumer=True, config=config)
    seen = 0
    try:
        while opts.count is None or seen < opts.count:
            msg = await sub.next_msg(timeout=None)
            meta = msg.metadata
            if skip > 0:
                skip -= 1
            else:
                on_event(event_record(msg.subject, int(meta.sequence.stream), msg.headers, msg.data))
                seen += 1
            if not opts.follow and meta.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return seen


class EventPrinter:
    """Prints events as aligned lines (table) or JSON lines / YAML documents."""

    def __init__(self, out: Output, *, full: bool = False) -> None:
        self.out = out
        self.full = full
        self._header = False

    def __call__(self, ev: dict[str, Any]) -> None:
        if not self.out.human:
            self.out.line(ev)
            return
        if not self._header:
            header = self._row("POS", "TIME", "SUBJECT", "EVENT", "ACTOR", "PAYLOAD")
            self.out.out.print(Text(header, style="bold"), soft_wrap=True)
            self._header = True
        payload = json.dumps(ev.get("data", ev.get("error")), separators=(",", ":"), default=str)
        if not self.full and len(payload) > PAYLOAD_WIDTH:
            payload = payload[: PAYLOAD_WIDTH - 1] + "…"
        etype = str(ev.get("event_type", "?")).removeprefix(EVENT_PREFIX)
        when = str(ev.get("time", ""))[:19].replace("T", " ")
        row = self._row(str(ev["position"]), when, ev["subject"], etype, ev.get("actor") or "", payload)
        self.out.out.print(Text(row), soft_wrap=True)

    @staticmethod
    def _row(pos: str, when: str, subject: str, etype: str, actor: str, payload: str) -> str:
        return f"{pos:>6}  {when:<19}  {subject:<26}  {etype:<24}  {actor:<12}  {payload}"


@events_app.command("tail")
def tail(
    ctx: typer.Context,
    aggregate: Annotated[Aggregate | None, typer.Option("--aggregate", help="Only this aggregate type.")] = None,
    aggregate_id: Annotated[str | None, typer.Option("--id", help="Only this aggregate (needs --aggregate).")] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Start at the first event.")] = False,
    last: Annotated[int | None, typer.Option("--last", min=0, help="Start with the last N events.")] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Exit after N events.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep waiting for new events (default) or stop at the end.")
    ] = True,
    full: Annotated[bool, typer.Option("--full", help="Do not shorten payloads.")] = False,
) -> None:
    """Follow the event stream: position, time, subject, event type, actor and payload (Ctrl-C stops)."""
    opts = TailOptions(
        aggregate=aggregate.value if aggregate else None,
        aggregate_id=aggregate_id,
        from_start=from_start,
        last=last,
        count=count,
        follow=follow,
    )

    async def body(s: Session) -> None:
        await tail_events(s, opts, EventPrinter(s.out, full=full))

    run_session(ctx, body, interrupt_ok=True)
