"""Wire constants, named once: message types, header layouts, size limits.

All multi-byte fields are big-endian except the virtio_net_hdr, which the
kernel writes in host (little-endian on x86/arm64) order and which we carry
opaquely inside the encrypted payload.
"""

from __future__ import annotations

import struct
from enum import IntEnum

PROTOCOL_VERSION = 1


class MsgType(IntEnum):
    """First byte of every message on every transport."""

    INITIATION = 1
    RESPONSE = 2
    DATA = 4  # AEAD record
    PLAIN = 5  # unencrypted record (trusted links)
    PIECE = 6  # datagram piece of a split record


#: type, flags, reserved, receiver index, counter. AEAD associated data = these 16 bytes.
RECORD_HEADER = struct.Struct("!BBHIQ")
#: type, piece index, piece count, reserved, receiver index, counter (low 32 bits), byte offset.
PIECE_HEADER = struct.Struct("!BBBBIII")
#: stream framing: length of the message that follows.
STREAM_LEN = struct.Struct("!I")
#: virtio_net_hdr (legacy, 10 bytes): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR = struct.Struct("<BBHHHH")

TAG_LEN = 16
RECORD_OVERHEAD = RECORD_HEADER.size + TAG_LEN

#: Record flag: the payload (each frame of a bundle) starts with a virtio_net_hdr.
FLAG_VNET = 0x01
#: Record flag: the payload is several frames, each ``u16 length || frame``.
FLAG_BUNDLE = 0x02

#: Largest payload (virtio header + frame) a record carries. A TAP with TSO
#: hands out GSO frames up to 64 KiB + L2 header; the rest is slack so that a
#: read filling the whole buffer can be recognised as truncated.
MAX_PAYLOAD = 65536 + 512
MAX_RECORD = RECORD_OVERHEAD + MAX_PAYLOAD
#: Any single message (handshakes are far smaller than records).
MAX_MESSAGE = MAX_RECORD
