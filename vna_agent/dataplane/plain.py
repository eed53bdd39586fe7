"""Unencrypted records for trusted links: same framing, no AEAD, no handshake.

Record::

    type=5 (1) | flags (1) | reserved (2) | receiver index = 0 (4) | counter (8) | payload

There is no authentication and no replay protection: use it only where the
underlay is as trusted as a LAN cable (inside one data center, or over an
already encrypted path). The counter is informative (loss/reorder
diagnostics); a restarted peer starts again at zero and is accepted.
"""

from __future__ import annotations

from .errors import DecodeError, HandshakeAuthError, RecordTooBig
from .session import ChannelStatus
from .wire import MAX_PAYLOAD, RECORD_HEADER, MsgType

_HDR = RECORD_HEADER.size
_PLAIN = int(MsgType.PLAIN)


class PlainChannel:
    """The :class:`~vna_agent.dataplane.session.Channel` of the plain mode."""

    encrypted = False
    overhead = _HDR
    ready = True

    def __init__(self, *, initiator: bool = False) -> None:
        self.initiator = initiator
        self.next_counter = 0

    def seal_into(self, payload: memoryview | bytes, flags: int, out: memoryview) -> int:
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise RecordTooBig("payload too big for a record")
        c = self.next_counter
        self.next_counter = c + 1
        RECORD_HEADER.pack_into(out, 0, _PLAIN, flags, 0, 0, c)
        out[_HDR : _HDR + n] = payload
        return _HDR + n

    def open(self, record: memoryview) -> tuple[memoryview, int]:
        if len(record) < _HDR or record[0] != _PLAIN:
            raise DecodeError("not a plain record")
        return record[_HDR:], record[1]

    def check_piece(self, receiver: int, counter_low: int) -> None:
        """Plain records carry receiver index 0 and no replay window."""
        if receiver != 0:
            raise DecodeError("plain piece with a receiver index")

    def wants_handshake(self) -> bool:
        return False

    def handshake_overdue(self) -> bool:
        return False

    def begin_handshake(self) -> bytes:
        raise HandshakeAuthError("plain channels do not handshake")

    def handle_handshake(self, msg: bytes | memoryview) -> bytes | None:
        raise HandshakeAuthError("plain channels do not handshake")

    def expire(self) -> None:
        return None

    def reset(self) -> None:
        return None

    def forget_established(self) -> None:
        return None

    def status(self) -> ChannelStatus:
        return ChannelStatus(None, True, 0, None, None, None, False, 0)
