"""Sans-IO secure channel: handshakes, session rotation and rekeying for one peer.

A channel holds up to three sessions, WireGuard style:

* ``current``  - seals outgoing records;
* ``previous`` - kept for ``previous_grace`` seconds after a rotation so
  records already in flight under the old keys still open;
* ``next``     - responder only: keys answered but not yet confirmed; the
  first record that opens under it promotes it to ``current``.

Only the initiator (the connecting side) starts handshakes: at start, when
the current session is older than ``rekey_after_time`` or has carried
``rekey_after_bytes``/``rekey_after_records`` in either direction, and when a
pending initiation went unanswered for ``rekey_timeout``. Both sides refuse
to use a session older than ``reject_after_time`` or past its counter limit.
Time comes from an injectable monotonic clock.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import DecodeError, HandshakeAuthError, NoSession
from .handshake import (
    InitiatorState,
    SessionKeys,
    TimestampGuard,
    WallClock,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    tai64n,
    wall_clock_ns,
)
from .keys import Peer, PeerAllowList, StaticKeyPair
from .record import COUNTER_LIMIT, RecordSession
from .wire import RECORD_HEADER, MsgType

Clock = Callable[[], float]
_DATA = int(MsgType.DATA)


#: (local index, remote index, send key, recv key, next counter, limit, kind, window top, window bits)
SessionRow = tuple[int, int, bytes, bytes, int, int, int, int, bytes]


@dataclass(frozen=True, slots=True)
class RekeyPolicy:
    """When sessions are replaced and how long old ones live (seconds, counts)."""

    rekey_after_time: float = 120.0
    """Initiator starts a new handshake once the current session is this old."""
    reject_after_time: float = 180.0
    """No session is used for sending or receiving past this age."""
    rekey_after_bytes: int = 1 << 36
    """Rekey after this many payload bytes in either direction (AES-GCM usage bound)."""
    rekey_after_records: int = 1 << 40
    """Rekey after this many records in either direction."""
    counter_limit: int = COUNTER_LIMIT
    """Hard per-session send limit; sealing refuses at this counter."""
    previous_grace: float = 10.0
    """How long the replaced session still opens in-flight records."""
    rekey_timeout: float = 5.0
    """An initiation unanswered this long is abandoned (and retried)."""
    keepalive: float = 10.0
    """Datagram links send an empty record when idle this long."""


class Channel(Protocol):
    """What links need from a record codec (AEAD :class:`SecureChannel` or plain)."""

    encrypted: bool
    initiator: bool
    overhead: int

    @property
    def ready(self) -> bool: ...

    def seal_into(self, payload: memoryview | bytes, flags: int, out: memoryview) -> int: ...

    def open(self, record: memoryview) -> tuple[memoryview, int]: ...

    def check_piece(self, receiver: int, counter_low: int) -> None: ...

    def wants_handshake(self) -> bool: ...

    def handshake_overdue(self) -> bool: ...

    def begin_handshake(self) -> bytes: ...

    def handle_handshake(self, msg: bytes | memoryview) -> bytes | None: ...

    def expire(self) -> None: ...

    def reset(self) -> None: ...

    def forget_established(self) -> None: ...

    def status(self) -> ChannelStatus: ...


@dataclass(slots=True)
class ChannelStatus:
    """Snapshot for status reports."""

    peer: str | None
    ready: bool
    handshakes: int
    last_handshake: float | None
    current_index: int | None
    current_age: float | None
    pending: bool
    sessions: int = field(default=0)


class SecureChannel:
    """Handshake + session state for one peer (sans-IO).

    Args:
        local: this node's static identity.
        peers: allowed remote static keys (responder refuses others).
        remote: the peer to initiate to (initiator only).
        initiator: whether this side starts handshakes.
        policy: rekey timers and limits.
        clock: monotonic seconds.
        wall_clock: Unix nanoseconds for initiation timestamps.
        guard: replayed-initiation memory (shared across reconnects).
    """

    encrypted = True
    overhead = 32

    def __init__(
        self,
        local: StaticKeyPair,
        peers: PeerAllowList,
        *,
        remote: Peer | None = None,
        initiator: bool,
        policy: RekeyPolicy | None = None,
        clock: Clock = time.monotonic,
        wall_clock: WallClock = wall_clock_ns,
        guard: TimestampGuard | None = None,
    ) -> None:
        if initiator and remote is None:
            raise ValueError("an initiator needs the remote peer")
        if remote is not None and remote.public_key not in peers:
            peers.add(remote)
        self.local = local
        self.peers = peers
        self.peer: Peer | None = remote
        self.initiator = initiator
        self.policy = policy or RekeyPolicy()
        self.clock = clock
        self.wall_clock = wall_clock
        self.guard = guard or TimestampGuard()
        self.current: RecordSession | None = None
        self.previous: RecordSession | None = None
        self.next: RecordSession | None = None
        self.pending: InitiatorState | None = None
        self.pending_since = 0.0
        self.rotated_at = 0.0
        self.handshakes = 0
        self.last_handshake: float | None = None  # Unix seconds
        self._by_index: dict[int, RecordSession] = {}
        self._last_ts = 0

    # -- state -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether records can be sealed now."""
        return self.current is not None

    def reset(self) -> None:
        """Forget every session and pending handshake (new connection)."""
        self.current = self.previous = self.next = None
        self.pending = None
        self._by_index.clear()

    def forget_established(self) -> None:
        """Drop current and previous sessions (the peer reconnected; only ``next`` is valid)."""
        self._drop("current")
        self._drop("previous")

    def _new_index(self) -> int:
        while True:
            idx = secrets.randbits(32)
            if idx and idx not in self._by_index and (self.pending is None or idx != self.pending.sender_index):
                return idx

    def _session(self, keys: SessionKeys) -> RecordSession:
        return RecordSession(keys, created=self.clock(), limit=self.policy.counter_limit)

    def _install(self, session: RecordSession, slot: str) -> None:
        old = getattr(self, slot)
        if old is not None:
            self._by_index.pop(old.local_index, None)
        setattr(self, slot, session)
        self._by_index[session.local_index] = session

    def _drop(self, slot: str) -> None:
        old = getattr(self, slot)
        if old is not None:
            self._by_index.pop(old.local_index, None)
            setattr(self, slot, None)

    def _rotate(self, session: RecordSession) -> None:
        self._drop("previous")
        if self.current is not None:
            self.previous = self.current  # stays in _by_index
        self.current = session
        self._by_index[session.local_index] = session
        self.rotated_at = self.clock()
        self.handshakes += 1
        self.last_handshake = time.time()

    def _timestamp(self) -> bytes:
        # Strictly increasing even if the wall clock stalls between two initiations.
        now = max(self.wall_clock(), self._last_ts + 1)
        self._last_ts = now
        return tai64n(now)

    # -- handshake -----------------------------------------------------------

    def begin_handshake(self) -> bytes:
        """Initiator: a fresh initiation (replaces any pending one)."""
        assert self.peer is not None
        msg, state = create_initiation(
            self.local,
            self.peer.public_key,
            sender_index=self._new_index(),
            timestamp=self._timestamp(),
            psk=self.peer.psk,
        )
        self.pending = state
        self.pending_since = self.clock()
        return msg

    def handle_handshake(self, msg: bytes | memoryview) -> bytes | None:
        """Process a handshake message; return the reply to send (responder) or None.

        Raises:
            HandshakeError: refused (unknown peer, replay, bad authentication).
        """
        if not len(msg):
            raise HandshakeAuthError("empty handshake message")
        typ = msg[0]
        if typ == MsgType.INITIATION and not self.initiator:
            return self._handle_initiation(msg)
        if typ == MsgType.RESPONSE and self.initiator:
            self._handle_response(msg)
            return None
        raise HandshakeAuthError(f"unexpected handshake message type {typ}")

    def _handle_initiation(self, msg: bytes | memoryview) -> bytes:
        received = consume_initiation(self.local, msg)
        peer = self.peers.require(received.initiator_static)
        self.guard.accept(peer.public_key, received.timestamp)
        if self.peer is not None and self.peer.public_key != peer.public_key:
            self.reset()  # another allowed identity took over this channel
        self.peer = peer
        reply, keys = create_response(received, sender_index=self._new_index(), psk=peer.psk)
        self._install(self._session(keys), "next")
        return reply

    def _handle_response(self, msg: bytes | memoryview) -> None:
        state = self.pending
        if state is None:
            raise HandshakeAuthError("response without a pending initiation")
        keys = consume_response(state, msg)
        self.pending = None
        self._rotate(self._session(keys))

    # -- records -------------------------------------------------------------

    def seal_into(self, payload: memoryview | bytes, flags: int, out: memoryview) -> int:
        """Seal ``payload`` under the current session into ``out``; return the record length."""
        s = self.current
        if s is None:
            raise NoSession("no session keyed yet")
        return s.seal_into(payload, flags, out)

    def open(self, record: memoryview) -> tuple[memoryview, int]:
        """Open a record under whichever session its receiver index names."""
        if len(record) < RECORD_HEADER.size:
            raise DecodeError("short record")
        typ, flags, _, receiver, counter = RECORD_HEADER.unpack_from(record)
        if typ != _DATA:
            raise DecodeError("not an AEAD record")
        s = self._by_index.get(receiver)
        if s is None:
            raise NoSession("unknown receiver index")
        payload = s.open(counter, record)
        if s is self.next:
            self.next = None
            self._rotate(s)
        return payload, flags

    def check_piece(self, receiver: int, counter_low: int) -> None:
        """Refuse a datagram piece before it gets reassembly state: unknown index or counter out of window.

        Raises:
            NoSession: no session has that receiver index.
            ReplayedRecord: the counter cannot open any more (or is far ahead).
        """
        s = self._by_index.get(receiver)
        if s is None:
            raise NoSession("piece for an unknown receiver index")
        s.window.check_low32(counter_low)

    # -- native fast path (fastpath.py) ---------------------------------------

    def session_table(self) -> list[SessionRow]:
        """Every keyed session for the native fast path: keys, counters, replay window, role.

        Kind 0 seals (current), 1 becomes current on its first received record
        (next), 2 only opens (previous).
        """
        return [s.fastpath_row(0 if s is self.current else 1 if s is self.next else 2) for s in self._by_index.values()]

    def promote(self, local_index: int) -> None:
        """The fast path received the first record under ``next``: it is current now."""
        s = self.next
        if s is not None and s.local_index == local_index:
            self.next = None
            self._rotate(s)

    def absorb_counters(self, counters: dict[int, tuple[int, int, int, int, int]]) -> None:
        """Take what the fast path did per session: its send counter, and records/bytes *since the last call*.

        They drive rekeying (``rekey_after_bytes``/``records``, the counter limit).
        """
        for idx, (next_counter, rs, bs, rr, br) in counters.items():
            s = self._by_index.get(idx)
            if s is not None:
                s.next_counter = max(s.next_counter, next_counter)
                c = s.counters
                c.records_sent += rs
                c.bytes_sent += bs
                c.records_received += rr
                c.bytes_received += br

    # -- timers --------------------------------------------------------------

    def wants_handshake(self) -> bool:
        """Initiator: whether to send an initiation now (first, rekey or retry)."""
        if not self.initiator:
            return False
        now = self.clock()
        if self.pending is not None:
            return now - self.pending_since >= self.policy.rekey_timeout
        s = self.current
        if s is None:
            return True
        p = self.policy
        c = s.counters
        return (
            now - s.created >= p.rekey_after_time
            or max(c.bytes_sent, c.bytes_received) >= p.rekey_after_bytes
            or max(c.records_sent, c.records_received) >= p.rekey_after_records
            or s.next_counter >= s.limit - (s.limit >> 4)
        )

    def handshake_overdue(self) -> bool:
        """Initiator: a pending initiation outlived ``rekey_timeout``."""
        return self.pending is not None and self.clock() - self.pending_since >= self.policy.rekey_timeout

    def expire(self) -> None:
        """Drop sessions past their lifetime; call about once a second."""
        now = self.clock()
        p = self.policy
        if self.previous is not None and (
            now - self.rotated_at >= p.previous_grace or self.previous.age(now) >= p.reject_after_time
        ):
            self._drop("previous")
        for slot in ("current", "next"):
            s = getattr(self, slot)
            if s is not None and s.age(now) >= p.reject_after_time:
                self._drop(slot)

    def status(self) -> ChannelStatus:
        now = self.clock()
        cur = self.current
        return ChannelStatus(
            peer=self.peer.name if self.peer else None,
            ready=self.ready,
            handshakes=self.handshakes,
            last_handshake=self.last_handshake,
            current_index=cur.local_index if cur else None,
            current_age=round(cur.age(now), 3) if cur else None,
            pending=self.pending is not None,
            sessions=len(self._by_index),
        )
