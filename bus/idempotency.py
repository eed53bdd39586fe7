"""Idempotency keys of commands: what a participant needs to have a keyed command's effect once.

A request carries its key in ``Sf-Idempotency-Key`` (or an ``idempotency_key`` payload
field); :class:`BusService` hands it to the handler as :class:`RequestKey`, with a digest
of the command so that a key reused for a different command is told apart.

Replies are not cached here on purpose: a cache written after the effect is a second
write, and a crash between the two loses the dedupe. Each participant keeps the key in
the same atomic write as its effect (the manager: inside the event; see ``docs/sagas.md``,
"Exactly once").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestKey:
    """A command's idempotency key and the digest of the command it was sent with."""

    key: str
    digest: str


def request_digest(subject: str, payload: dict[str, Any]) -> str:
    """A stable digest of a command: its subject and its payload (without the key itself)."""
    canonical = json.dumps([subject, payload], sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
