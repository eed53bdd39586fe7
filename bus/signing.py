"""Proof of identity: every command is signed with the acting user's ed25519 nkey.

The signed bytes bind the subject, the envelope (id, time, actor, schema,
content type) and a SHA-256 of the body, so a signature cannot be moved to
another command, another user or another payload. Replays are stopped by a
time window plus a record of message ids seen inside it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
from collections import OrderedDict
from typing import Protocol

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bus.envelope import Envelope, utcnow
from bus.errors import Unauthenticated

REPLAY_WINDOW = dt.timedelta(seconds=120)


def generate_user_seed() -> str:
    """A new nkeys user seed (``SU...``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def public_key_of(seed: str) -> str:
    """The ``U...`` public key of a user seed."""
    try:
        return bytes(nkeys.from_seed(seed.strip().encode()).public_key).decode()
    except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
        raise Unauthenticated("invalid nkey seed") from exc


def decode_public_key(public_key: str) -> bytes:
    """Raw 32-byte ed25519 key of a ``U...`` nkey; checks prefix and CRC."""
    try:
        raw = base64.b32decode(public_key)
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("public key is not base32") from exc
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise Unauthenticated("not a user public key")
    if nkeys.crc16(bytearray(raw[:33])) != int.from_bytes(raw[33:], "little"):
        raise Unauthenticated("public key checksum mismatch")
    return raw[1:33]


def signing_input(subject: str, envelope: Envelope, body: bytes) -> bytes:
    """The exact bytes a command signature covers."""
    parts = [
        "skyferry-sig-v1",
        subject,
        envelope.msg_id,
        envelope.timestamp.isoformat(),
        envelope.actor or "",
        envelope.schema_name,
        envelope.content_type.value,
        hashlib.sha256(body).hexdigest(),
    ]
    return "\n".join(parts).encode()


def sign(seed: str, subject: str, envelope: Envelope, body: bytes) -> Envelope:
    """Return ``envelope`` with its signature set."""
    kp = nkeys.from_seed(seed.strip().encode())
    sig = kp.sign(signing_input(subject, envelope, body))
    return envelope.model_copy(update={"signature": base64.urlsafe_b64encode(sig).decode().rstrip("=")})


def verify(public_key: str, subject: str, envelope: Envelope, body: bytes) -> None:
    """Check the envelope's signature against a user's public key.

    Raises:
        Unauthenticated: missing, malformed or wrong signature.
    """
    if not envelope.signature:
        raise Unauthenticated("command is not signed", details={"actor": envelope.actor})
    try:
        sig = base64.urlsafe_b64decode(envelope.signature + "=" * (-len(envelope.signature) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("malformed signature") from exc
    key = Ed25519PublicKey.from_public_bytes(decode_public_key(public_key))
    try:
        key.verify(sig, signing_input(subject, envelope, body))
    except InvalidSignature as exc:
        raise Unauthenticated("bad signature", details={"actor": envelope.actor}) from exc


class NonceStore(Protocol):
    """Remembers message ids for the replay window."""

    async def remember(self, msg_id: str) -> bool:
        """Record ``msg_id``; False if it was already there."""
        ...


class MemoryNonceStore:
    """In-process nonce store bounded by size (ids older than the window fall off)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._max = max_entries

    async def remember(self, msg_id: str) -> bool:
        if msg_id in self._seen:
            return False
        self._seen[msg_id] = None
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True


async def check_fresh(
    envelope: Envelope,
    nonces: NonceStore,
    *,
    now: dt.datetime | None = None,
    window: dt.timedelta = REPLAY_WINDOW,
) -> None:
    """Refuse stale, future or already-seen commands.

    Raises:
        Unauthenticated: outside the time window, or a replayed message id.
    """
    current = now or utcnow()
    if abs(current - envelope.timestamp) > window:
        raise Unauthenticated(
            "command timestamp outside the replay window",
            details={"timestamp": envelope.timestamp.isoformat(), "window_s": window.total_seconds()},
        )
    if not await nonces.remember(envelope.msg_id):
        raise Unauthenticated("replayed command", details={"msg_id": envelope.msg_id})
