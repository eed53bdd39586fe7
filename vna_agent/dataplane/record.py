"""Sans-IO AEAD record layer: one session's sealing and opening.

Record::

    type=4 (1) | flags (1) | reserved (2) | receiver index (4) | counter (8)
    | AES-256-GCM(payload) | tag (16)

The nonce is 4 zero bytes + the 64-bit big-endian counter; the 16-byte
header is the associated data, so flags, index and counter are
authenticated. The send counter never repeats and sealing stops at
``limit``; received counters pass a sliding replay window after the tag
verifies. Sealing and opening write into caller-provided / preallocated
buffers with ``encrypt_into``/``decrypt_into`` when the installed
cryptography has them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import BadTag, DecodeError, NonceExhausted, RecordTooBig, ReplayedRecord
from .handshake import SessionKeys
from .wire import MAX_PAYLOAD, RECORD_HEADER, RECORD_OVERHEAD, TAG_LEN, MsgType

#: WireGuard's REJECT_AFTER_MESSAGES: never let the 64-bit counter wrap.
COUNTER_LIMIT = (1 << 64) - (1 << 13) - 1
REPLAY_WINDOW_BITS = 2048
#: How far past the newest received counter a datagram piece may be (records lost in between).
PIECE_AHEAD = 1 << 24
_NONCE_PREFIX = bytes(4)
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
_HDR = RECORD_HEADER.size
_DATA = int(MsgType.DATA)


class ReplayWindow:
    """Sliding window of seen counters (bit i set = ``top - i`` seen)."""

    __slots__ = ("_bits", "_mask", "_size", "top")

    def __init__(self, size: int = REPLAY_WINDOW_BITS) -> None:
        self._size = size
        self._mask = (1 << size) - 1
        self._bits = 0
        self.top = -1

    def check(self, counter: int) -> None:
        """Raise :class:`ReplayedRecord` if ``counter`` was seen or is too old (no update)."""
        d = self.top - counter
        if d >= self._size or (d >= 0 and (self._bits >> d) & 1):
            raise ReplayedRecord("replayed or too old record")

    def check_low32(self, low: int) -> None:
        """Refuse a counter known only by its low 32 bits (a datagram piece) unless it may still open.

        The full counter is taken as the one nearest ``top`` with these low
        bits; it must be at most :data:`PIECE_AHEAD` past ``top`` and pass
        :meth:`check`, so pieces of old, replayed or far-future records never
        get reassembly state.

        Raises:
            ReplayedRecord: seen, older than the window, or too far ahead.
        """
        ahead = (low - self.top) & 0xFFFFFFFF
        if ahead and ahead <= PIECE_AHEAD:
            return
        behind = (self.top - low) & 0xFFFFFFFF
        if behind >= self._size or behind > self.top:
            raise ReplayedRecord("piece counter outside the replay window")
        self.check(self.top - behind)

    def bits_bytes(self) -> bytes:
        """The window bitmap, 256 bytes little-endian (bit i: ``top - i`` seen), for the fast path."""
        return self._bits.to_bytes(self._size // 8, "little")

    def accept(self, counter: int) -> None:
        """Mark ``counter`` seen; raise :class:`ReplayedRecord` if it already was or is too old."""
        top = self.top
        if counter > top:
            d = counter - top
            self._bits = ((self._bits << d) | 1) & self._mask if d < self._size else 1
            self.top = counter
            return
        d = top - counter
        if d >= self._size:
            raise ReplayedRecord("record older than the replay window")
        bit = 1 << d
        if self._bits & bit:
            raise ReplayedRecord("replayed record")
        self._bits |= bit


@dataclass(slots=True)
class SessionCounters:
    """What a session has carried (drives rekeying)."""

    records_sent: int = 0
    bytes_sent: int = 0
    records_received: int = 0
    bytes_received: int = 0


class RecordSession:
    """Seal and open records with one handshake's keys.

    Args:
        keys: the handshake result.
        created: monotonic creation time (for rekey/expiry decisions).
        limit: the first counter that may not be used (tests lower it).
    """

    __slots__ = (
        "_open_buf",
        "_open_mv",
        "_recv",
        "_send",
        "counters",
        "created",
        "keys",
        "limit",
        "local_index",
        "next_counter",
        "remote_index",
        "window",
    )

    def __init__(self, keys: SessionKeys, *, created: float | None = None, limit: int = COUNTER_LIMIT) -> None:
        self.keys = keys
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.created = time.monotonic() if created is None else created
        self.limit = limit
        self.next_counter = 0
        self.window = ReplayWindow()
        self.counters = SessionCounters()
        self._send = AESGCM(keys.send_key)
        self._recv = AESGCM(keys.recv_key)
        self._open_buf = bytearray(MAX_PAYLOAD)
        self._open_mv = memoryview(self._open_buf)

    def seal_into(self, payload: memoryview | bytes, flags: int, out: memoryview) -> int:
        """Write header + ciphertext + tag of ``payload`` at ``out[0:]``; return the record length."""
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise RecordTooBig("payload too big for a record")
        c = self.next_counter
        if c >= self.limit:
            raise NonceExhausted("send counter exhausted; rekey required")
        self.next_counter = c + 1
        RECORD_HEADER.pack_into(out, 0, _DATA, flags, 0, self.remote_index, c)
        nonce = _NONCE_PREFIX + c.to_bytes(8, "big")
        end = _HDR + n + TAG_LEN
        if _HAS_INTO:
            self._send.encrypt_into(nonce, payload, out[:_HDR], out[_HDR:end])
        else:  # older cryptography
            out[_HDR:end] = self._send.encrypt(nonce, bytes(payload), bytes(out[:_HDR]))
        cs = self.counters
        cs.records_sent += 1
        cs.bytes_sent += n
        return end

    def open(self, counter: int, record: memoryview) -> memoryview:
        """Verify and decrypt a whole record (header included); return a view of the payload.

        The view points into a buffer this session reuses: consume it before
        the next call.
        """
        n = len(record) - RECORD_OVERHEAD
        if n < 0:
            raise DecodeError("record shorter than its overhead")
        self.window.check(counter)
        nonce = _NONCE_PREFIX + counter.to_bytes(8, "big")
        out = self._open_mv[:n]
        try:
            if _HAS_INTO:
                self._recv.decrypt_into(nonce, record[_HDR:], record[:_HDR], out)
            else:  # older cryptography
                out[:] = self._recv.decrypt(nonce, bytes(record[_HDR:]), bytes(record[:_HDR]))
        except InvalidTag as exc:
            raise BadTag("record failed authentication") from exc
        self.window.accept(counter)
        cs = self.counters
        cs.records_received += 1
        cs.bytes_received += n
        return out

    def fastpath_row(self, kind: int) -> tuple[int, int, bytes, bytes, int, int, int, int, bytes]:
        """This session for the native fast path (``SecureChannel.session_table`` explains ``kind``)."""
        keys, w = self.keys, self.window
        return (
            self.local_index,
            self.remote_index,
            keys.send_key,
            keys.recv_key,
            self.next_counter,
            self.limit,
            kind,
            w.top,
            w.bits_bytes(),
        )

    def age(self, now: float) -> float:
        return now - self.created
