"""Authentication of commands: the actor's signature, checked against its UserAccount."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from bus import signing
from bus.connection import Bus, open_kv
from bus.envelope import Envelope
from bus.errors import Forbidden, Unauthenticated
from bus.models.users import Authorisation, UserAccount
from manager.access import authorise

NONCE_BUCKET = "SF_NONCES"


class KvNonceStore:
    """Message ids seen within the replay window, in a JetStream KV bucket.

    Shared by every manager instance and kept across restarts, so a captured
    command cannot be replayed against another instance or after a restart.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus, *, ttl_s: float = 2 * signing.REPLAY_WINDOW.total_seconds()) -> KvNonceStore:
        return cls(await open_kv(bus, NONCE_BUCKET, ttl_s=ttl_s))

    async def remember(self, msg_id: str) -> bool:
        key = hashlib.sha256(msg_id.encode()).hexdigest()[:40]
        try:
            await self._kv.create(key, b"1")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True


class SignatureAuthenticator:
    """Verifies that a command was signed by the user it names, and is fresh."""

    def __init__(self, lookup: Callable[[str], UserAccount | None], nonces: signing.NonceStore) -> None:
        self._lookup = lookup
        self._nonces = nonces

    async def authenticate(self, subject: str, envelope: Envelope, body: bytes) -> Any:
        if not envelope.actor:
            raise Unauthenticated("command names no actor")
        user = self._lookup(envelope.actor)
        if user is None or user.public_key is None:
            raise Unauthenticated(f"unknown actor {envelope.actor!r}")
        # Signature first: a forged message must not be able to burn a genuine message id.
        signing.verify(user.public_key, subject, envelope, body)
        await signing.check_fresh(envelope, self._nonces)
        if user.disabled:
            raise Forbidden(f"user {user.id!r} is disabled")
        return user


class AuthorisingAuthenticator:
    """Authenticates with ``inner``, then requires one authorisation (e.g. saga-operate)."""

    def __init__(self, inner: Any, needed: Authorisation) -> None:
        self._inner = inner
        self._needed = needed

    async def authenticate(self, subject: str, envelope: Envelope, body: bytes) -> Any:
        if self._inner is None:
            return None
        user = await self._inner.authenticate(subject, envelope, body)
        authorise(user, self._needed, what=subject)
        return user
