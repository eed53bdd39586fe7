"""Every NATS subject, stream and header Skyferry uses, defined once.

Tokens (service names, ids, verbs) must be subject-safe; :func:`token`
enforces that so that a hostile id can never widen a subscription.
"""

from __future__ import annotations

import re
from enum import StrEnum

ROOT = "sf"
EVENTS_STREAM = "SF_EVENTS"
FLOWS_STREAM = "SF_FLOWS"
ALERTS_STREAM = "SF_ALERTS"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Header(StrEnum):
    """Message headers; never spell one twice."""

    CONTENT_TYPE = "Content-Type"
    MSG_ID = "Sf-Msg-Id"
    CORRELATION_ID = "Sf-Correlation-Id"
    CAUSATION_ID = "Sf-Causation-Id"
    ACTOR = "Sf-Actor"
    TIMESTAMP = "Sf-Timestamp"
    SCHEMA = "Sf-Schema"
    SIGNATURE = "Sf-Signature"
    IDEMPOTENCY_KEY = "Sf-Idempotency-Key"
    IDEMPOTENCY_DIGEST = "Sf-Idempotency-Digest"
    ERROR = "Sf-Error"
    NATS_MSG_ID = "Nats-Msg-Id"
    NATS_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"


class ContentType(StrEnum):
    MSGPACK = "application/msgpack"
    JSON = "application/json"


def token(value: str) -> str:
    """Validate one subject token (no dots, wildcards or spaces)."""
    if not _TOKEN.match(value):
        raise ValueError(f"not a valid subject token: {value!r}")
    return value


def command(service: str, verb: str) -> str:
    """Request/reply subject of a command to a component: ``sf.cmd.<service>.<verb>``."""
    return f"{ROOT}.cmd.{token(service)}.{token(verb)}"


def command_group(service: str) -> str:
    """The micro-service group prefix for a component's commands."""
    return f"{ROOT}.cmd.{token(service)}"


def agent(agent_id: str, verb: str) -> str:
    """Request/reply subject of a command to one agent: ``sf.agent.<id>.<verb>``."""
    return f"{ROOT}.agent.{token(agent_id)}.{token(verb)}"


def agent_group(agent_id: str) -> str:
    return f"{ROOT}.agent.{token(agent_id)}"


def event(aggregate: str, aggregate_id: str) -> str:
    """JetStream subject of one aggregate's events: ``sf.evt.<aggregate>.<id>``."""
    return f"{ROOT}.evt.{token(aggregate)}.{token(aggregate_id)}"


def events_of(aggregate: str | None = None) -> str:
    """Wildcard for all events, or all events of one aggregate type."""
    return f"{ROOT}.evt.>" if aggregate is None else f"{ROOT}.evt.{token(aggregate)}.*"


def status(service: str, instance: str) -> str:
    """Heartbeat/status subject: ``sf.status.<service>.<instance>``."""
    return f"{ROOT}.status.{token(service)}.{token(instance)}"


STATUS_ALL = f"{ROOT}.status.>"


def flow(overlay: str, vna: str) -> str:
    """Flow-statistics subject: ``sf.flow.<overlay>.<vna>``."""
    return f"{ROOT}.flow.{token(overlay)}.{token(vna)}"


FLOWS_ALL = f"{ROOT}.flow.>"


def alert(overlay: str, source: str) -> str:
    """Data-plane alerts (MAC/IP conflicts, loops): ``sf.alert.<overlay>.<source>``."""
    return f"{ROOT}.alert.{token(overlay)}.{token(source)}"


ALERTS_ALL = f"{ROOT}.alert.>"


def progress(job_id: str) -> str:
    """Progress of a capture, deploy or saga: ``sf.progress.<job>``."""
    return f"{ROOT}.progress.{token(job_id)}"


PROGRESS_ALL = f"{ROOT}.progress.>"
EVENTS_ALL = f"{ROOT}.evt.>"


def parse_event_subject(subject: str) -> tuple[str, str]:
    """``sf.evt.app.web1`` -> ``("app", "web1")``."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != ROOT or parts[1] != "evt":
        raise ValueError(f"not an event subject: {subject!r}")
    return parts[2], parts[3]
