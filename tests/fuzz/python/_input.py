"""Reading structured choices out of fuzz bytes (deterministic, total: never raises)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

_U16 = struct.Struct("!H")


class Reader:
    """Consumes a fuzz input front to back; past the end every read yields zeros / empty bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        """The next byte (0 at the end)."""
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        """Up to ``n`` next bytes."""
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        """Everything not read yet."""
        return self.take(len(self.data))

    def chunks(self) -> Iterator[bytes]:
        """The rest as messages, each ``u16 length || bytes`` (the last one may be short)."""
        while self.pos < len(self.data):
            (n,) = _U16.unpack(self.take(2).rjust(2, b"\0"))
            yield self.take(n)


def frame_chunks(messages: list[bytes], *, prefix: bytes = b"") -> bytes:
    """The inverse of :meth:`Reader.chunks` (for seeds)."""
    return prefix + b"".join(_U16.pack(len(m)) + m for m in messages)
