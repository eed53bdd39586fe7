"""Sans-IO Noise IKpsk2 handshake, after WireGuard's.

``Noise_IKpsk2_25519_AESGCM_BLAKE2s``: X25519 static + ephemeral keys,
HMAC-BLAKE2s HKDF chaining, AES-256-GCM for the two encrypted handshake
fields. The initiator knows the responder's static key (IK), sends its own
static key encrypted and a TAI64N timestamp that the responder requires to
grow (replayed initiations are refused). The response can only be built with
the responder's static private key, so completing the handshake proves it.
Each side ends with a send key and a receive key (:class:`SessionKeys`).

Messages (sizes in bytes)::

    initiation (132): type=1 | 3 reserved | sender index (4) | ephemeral (32)
                      | enc(static) (32+16) | enc(timestamp) (12+16) | mac1 (16)
    response    (76): type=2 | 3 reserved | sender index (4) | receiver index (4)
                      | ephemeral (32) | enc(empty) (16) | mac1 (16)

mac1 = keyed BLAKE2s-128 over the message before it, keyed by
HASH("mac1----" || receiver's static public key): cheap rejection of traffic
not meant for this node. WireGuard's mac2/cookie reply is not implemented.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import HandshakeAuthError, ReplayedInitiation
from .keys import KEY_LEN, PublicKey, StaticKeyPair
from .wire import MsgType

CONSTRUCTION = b"Noise_IKpsk2_25519_AESGCM_BLAKE2s"
IDENTIFIER = b"Skyferry dataplane v1"
LABEL_MAC1 = b"mac1----"
ZERO_PSK = bytes(KEY_LEN)

_INIT_HEAD = struct.Struct("!B3xI")
_RESP_HEAD = struct.Struct("!B3xII")
_TAI64N = struct.Struct("!QI")
TIMESTAMP_LEN = _TAI64N.size
INITIATION_LEN = _INIT_HEAD.size + 32 + (32 + 16) + (TIMESTAMP_LEN + 16) + 16
RESPONSE_LEN = _RESP_HEAD.size + 32 + 16 + 16
_ZERO_NONCE = bytes(12)

#: Wall-clock source in nanoseconds (injectable for tests).
WallClock = Callable[[], int]


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    """HKDF with HMAC-BLAKE2s as in WireGuard: n outputs of 32 bytes."""
    prk = _hmac(ck, ikm)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = _hmac(prk, prev + bytes([i]))
        out.append(prev)
    return out


def _mac1(receiver_static: bytes, data: bytes) -> bytes:
    key = _hash(LABEL_MAC1, receiver_static)
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def _seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return AESGCM(key).encrypt(_ZERO_NONCE, plaintext, ad)


def _open(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeAuthError("handshake field failed authentication") from exc


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise HandshakeAuthError("invalid public key in handshake") from exc


def _pub(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _initial_state(responder_static: bytes) -> tuple[bytes, bytes]:
    ck = _hash(CONSTRUCTION)
    h = _hash(_hash(ck, IDENTIFIER), responder_static)
    return ck, h


def tai64n(now_ns: int) -> bytes:
    """TAI64N label for a Unix time in nanoseconds (leap seconds ignored, as WireGuard does)."""
    secs, nanos = divmod(now_ns, 1_000_000_000)
    return _TAI64N.pack((1 << 62) + secs, nanos)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Result of a completed handshake, from one side's point of view."""

    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    initiator: bool
    peer_static: PublicKey


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and its response."""

    sender_index: int
    ephemeral: X25519PrivateKey
    chaining_key: bytes
    hash: bytes
    local: StaticKeyPair
    remote_static: PublicKey
    psk: bytes


@dataclass(frozen=True, slots=True)
class ReceivedInitiation:
    """A verified initiation: who sent it, when, and the state to answer it."""

    initiator_static: PublicKey
    timestamp: bytes
    sender_index: int
    ephemeral: bytes
    chaining_key: bytes
    hash: bytes


def create_initiation(
    local: StaticKeyPair,
    remote: PublicKey,
    *,
    sender_index: int,
    timestamp: bytes,
    psk: bytes | None = None,
) -> tuple[bytes, InitiatorState]:
    """Build an initiation to ``remote``; keep the returned state for its response."""
    ck, h = _initial_state(remote.raw)
    eph = X25519PrivateKey.generate()
    eph_pub = _pub(eph)
    (ck,) = _kdf(ck, eph_pub, 1)
    h = _hash(h, eph_pub)
    ck, k = _kdf(ck, _dh(eph, remote.raw), 2)
    enc_static = _seal(k, local.public.raw, h)
    h = _hash(h, enc_static)
    ck, k = _kdf(ck, _dh(local.private, remote.raw), 2)
    enc_ts = _seal(k, timestamp, h)
    h = _hash(h, enc_ts)
    body = _INIT_HEAD.pack(MsgType.INITIATION, sender_index) + eph_pub + enc_static + enc_ts
    msg = body + _mac1(remote.raw, body)
    state = InitiatorState(sender_index, eph, ck, h, local, remote, psk or ZERO_PSK)
    return msg, state


def peek_type(msg: bytes | memoryview) -> int:
    """The message type byte (0 if empty)."""
    return msg[0] if len(msg) else 0


def consume_initiation(local: StaticKeyPair, msg: bytes | memoryview) -> ReceivedInitiation:
    """Verify an initiation addressed to ``local``; raises :class:`HandshakeAuthError`.

    The caller still has to check the initiator against its allow-list and
    the timestamp against :class:`TimestampGuard` before answering.
    """
    msg = bytes(msg)
    if len(msg) != INITIATION_LEN or msg[0] != MsgType.INITIATION:
        raise HandshakeAuthError("malformed initiation")
    if not hmac.compare_digest(_mac1(local.public.raw, msg[:-16]), msg[-16:]):
        raise HandshakeAuthError("initiation mac1 mismatch (not addressed to this key)")
    _, sender_index = _INIT_HEAD.unpack_from(msg)
    o = _INIT_HEAD.size
    eph_pub, enc_static, enc_ts = msg[o : o + 32], msg[o + 32 : o + 80], msg[o + 80 : o + 108]
    ck, h = _initial_state(local.public.raw)
    (ck,) = _kdf(ck, eph_pub, 1)
    h = _hash(h, eph_pub)
    ck, k = _kdf(ck, _dh(local.private, eph_pub), 2)
    initiator_static = _open(k, enc_static, h)
    h = _hash(h, enc_static)
    ck, k = _kdf(ck, _dh(local.private, initiator_static), 2)
    timestamp = _open(k, enc_ts, h)
    h = _hash(h, enc_ts)
    return ReceivedInitiation(PublicKey(initiator_static), timestamp, sender_index, eph_pub, ck, h)


def create_response(
    received: ReceivedInitiation,
    *,
    sender_index: int,
    psk: bytes | None = None,
) -> tuple[bytes, SessionKeys]:
    """Answer a verified initiation; the session keys are usable once the initiator confirms."""
    ck, h = received.chaining_key, received.hash
    eph = X25519PrivateKey.generate()
    eph_pub = _pub(eph)
    (ck,) = _kdf(ck, eph_pub, 1)
    h = _hash(h, eph_pub)
    (ck,) = _kdf(ck, _dh(eph, received.ephemeral), 1)
    (ck,) = _kdf(ck, _dh(eph, received.initiator_static.raw), 1)
    ck, t, k = _kdf(ck, psk or ZERO_PSK, 3)
    h = _hash(h, t)
    enc_empty = _seal(k, b"", h)
    body = _RESP_HEAD.pack(MsgType.RESPONSE, sender_index, received.sender_index) + eph_pub + enc_empty
    msg = body + _mac1(received.initiator_static.raw, body)
    t_recv, t_send = _kdf(ck, b"", 2)  # initiator sends with the first key
    keys = SessionKeys(t_send, t_recv, sender_index, received.sender_index, False, received.initiator_static)
    return msg, keys


def response_receiver_index(msg: bytes | memoryview) -> int:
    """The initiator index a response answers (to find the pending state)."""
    if len(msg) != RESPONSE_LEN:
        raise HandshakeAuthError("malformed response")
    return int(_RESP_HEAD.unpack_from(msg)[2])


def consume_response(state: InitiatorState, msg: bytes | memoryview) -> SessionKeys:
    """Verify the response to ``state``'s initiation; raises :class:`HandshakeAuthError`."""
    msg = bytes(msg)
    if len(msg) != RESPONSE_LEN or msg[0] != MsgType.RESPONSE:
        raise HandshakeAuthError("malformed response")
    if not hmac.compare_digest(_mac1(state.local.public.raw, msg[:-16]), msg[-16:]):
        raise HandshakeAuthError("response mac1 mismatch")
    _, sender_index, receiver_index = _RESP_HEAD.unpack_from(msg)
    if receiver_index != state.sender_index:
        raise HandshakeAuthError("response to another initiation")
    o = _RESP_HEAD.size
    eph_pub, enc_empty = msg[o : o + 32], msg[o + 32 : o + 48]
    ck, h = state.chaining_key, state.hash
    (ck,) = _kdf(ck, eph_pub, 1)
    h = _hash(h, eph_pub)
    (ck,) = _kdf(ck, _dh(state.ephemeral, eph_pub), 1)
    (ck,) = _kdf(ck, _dh(state.local.private, eph_pub), 1)
    ck, t, k = _kdf(ck, state.psk, 3)
    h = _hash(h, t)
    _open(k, enc_empty, h)  # proves the responder holds its static private key
    t_send, t_recv = _kdf(ck, b"", 2)
    return SessionKeys(t_send, t_recv, state.sender_index, sender_index, True, state.remote_static)


class TimestampGuard:
    """Responder-side memory of the newest initiation timestamp per peer.

    An initiation whose TAI64N label is not strictly greater than the last
    accepted one from the same static key is a replay and is refused. The
    memory is per process: like WireGuard, a restarted responder accepts one
    stale initiation, which cannot complete a session without the
    initiator's ephemeral key.
    """

    def __init__(self) -> None:
        self._latest: dict[bytes, bytes] = {}

    def check(self, peer: PublicKey, timestamp: bytes) -> None:
        """Raise :class:`ReplayedInitiation` unless ``timestamp`` is newer."""
        last = self._latest.get(peer.raw)
        if last is not None and timestamp <= last:
            raise ReplayedInitiation("initiation timestamp is not newer than the last one")

    def accept(self, peer: PublicKey, timestamp: bytes) -> None:
        """Check and remember ``timestamp``."""
        self.check(peer, timestamp)
        self._latest[peer.raw] = timestamp


def wall_clock_ns() -> int:
    """Default :data:`WallClock`."""
    return time.time_ns()
