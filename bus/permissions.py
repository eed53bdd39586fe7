"""NATS subject permissions of each kind of participant.

The server enforces these, so an agent that is compromised still cannot
append to the manager's event stream or impersonate a component's service.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from bus.subjects import ALERTS_STREAM, EVENTS_STREAM, FLOWS_STREAM, ROOT


class Role(StrEnum):
    MANAGER = "manager"
    COMPONENT = "component"
    AGENT = "agent"
    CLI = "cli"
    OBSERVER = "observer"
    SAGA = "saga"
    """The saga coordinator run as its own process (``python -m manager.saga.worker``)."""


_INBOX = "_INBOX.>"
_SRV = "$SRV.>"
_JS_INFO = [
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
    f"$JS.API.STREAM.INFO.{FLOWS_STREAM}",
    f"$JS.API.STREAM.INFO.{ALERTS_STREAM}",
]


# KV buckets the saga coordinator uses; the names are defined by manager.saga.leases.LEASE_BUCKET and
# manager.auth.NONCE_BUCKET (bus cannot import the manager; tests/bus/test_permissions.py checks them).
SAGA_LEASE_BUCKET = "SF_SAGA_LEASES"
NONCE_BUCKET = "SF_NONCES"


def _kv_bucket(bucket: str) -> list[str]:
    # Create/bind the bucket, read keys (direct or not), put/create/update/delete keys.
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$KV.{bucket}.>",
    ]


def _read_stream(stream: str) -> list[str]:
    # What an ordered/ephemeral consumer needs to read a stream, and nothing that writes.
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        "$JS.FC.>",
    ]


def role_permissions(role: Role) -> dict[str, Any]:
    """NATS ``permissions`` block for a role."""
    if role is Role.MANAGER:
        # The manager owns the streams and is the only writer of domain events.
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if role is Role.COMPONENT:
        pub = [
            f"{ROOT}.cmd.>",
            f"{ROOT}.agent.>",
            f"{ROOT}.status.>",
            f"{ROOT}.progress.>",
            f"{ROOT}.flow.>",
            f"{ROOT}.alert.>",
            _SRV,
            _INBOX,
            *_JS_INFO,
            *_read_stream(EVENTS_STREAM),
            *_read_stream(FLOWS_STREAM),
            *_read_stream(ALERTS_STREAM),
        ]
        return {
            "publish": {"allow": pub, "deny": [f"{ROOT}.evt.>"]},
            "subscribe": {"allow": [f"{ROOT}.>", _SRV, _INBOX]},
        }
    if role is Role.AGENT:
        return {
            "publish": {
                "allow": [
                    f"{ROOT}.status.>",
                    f"{ROOT}.flow.>",
                    f"{ROOT}.alert.>",
                    f"{ROOT}.progress.>",
                    f"{ROOT}.cmd.>",
                    _SRV,
                    _INBOX,
                ],
                "deny": [f"{ROOT}.evt.>", "$JS.API.>"],
            },
            "subscribe": {"allow": [f"{ROOT}.agent.>", _SRV, _INBOX]},
            "allow_responses": True,
        }
    if role is Role.SAGA:
        # Appends its own aggregate's events only (sf.evt.saga.>), sends steps to components and agents,
        # keeps its leases and the shared replay nonces in KV, reads SF_EVENTS; cannot touch the other
        # aggregates' events, the streams' configuration or the manager's idempotency records.
        return {
            "publish": {
                "allow": [
                    f"{ROOT}.evt.saga.>",
                    f"{ROOT}.cmd.>",
                    f"{ROOT}.agent.>",
                    f"{ROOT}.status.>",
                    f"{ROOT}.progress.>",
                    _SRV,
                    _INBOX,
                    "$JS.API.INFO",
                    f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
                    *_read_stream(EVENTS_STREAM),
                    *_kv_bucket(SAGA_LEASE_BUCKET),
                    *_kv_bucket(NONCE_BUCKET),
                ],
            },
            "subscribe": {"allow": [f"{ROOT}.cmd.saga.>", f"{ROOT}.evt.saga.>", _SRV, _INBOX]},
        }
    if role is Role.CLI:
        return {
            "publish": {
                "allow": [
                    f"{ROOT}.cmd.>",
                    _SRV,
                    *_JS_INFO,
                    *_read_stream(EVENTS_STREAM),
                    *_read_stream(FLOWS_STREAM),
                    *_read_stream(ALERTS_STREAM),
                ],
                "deny": [f"{ROOT}.evt.>"],
            },
            "subscribe": {"allow": [_INBOX, f"{ROOT}.status.>", f"{ROOT}.progress.>"]},
        }
    return {
        "publish": {
            "allow": [
                _SRV,
                *_JS_INFO,
                *_read_stream(EVENTS_STREAM),
                *_read_stream(FLOWS_STREAM),
                *_read_stream(ALERTS_STREAM),
            ]
        },
        "subscribe": {"allow": [_INBOX, f"{ROOT}.status.>", f"{ROOT}.progress.>"]},
    }
