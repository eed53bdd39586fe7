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


_INBOX = "_INBOX.>"
_SRV = "$SRV.>"
_JS_INFO = [
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
    f"$JS.API.STREAM.INFO.{FLOWS_STREAM}",
    f"$JS.API.STREAM.INFO.{ALERTS_STREAM}",
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
