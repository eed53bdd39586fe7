"""Static X25519 identities, pre-shared keys and the peer allow-list.

Keys travel as base64 text (the WireGuard convention); private key and PSK
files must not be readable by group or others.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import KeyFileError, UnknownPeer

KEY_LEN = 32


def _decode_b64_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{what} is not valid base64") from exc
    if len(raw) != KEY_LEN:
        raise KeyFileError(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def _read_secret_file(path: Path, what: str) -> str:
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{what} {path} is accessible by group/others (mode {oct(st.st_mode & 0o777)})")
    return text


def _write_secret_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)  # the rename must never expose an empty key after a power loss
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A static X25519 public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFileError(f"public key must be {KEY_LEN} bytes")

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        """Parse a base64 public key; raises :class:`KeyFileError`."""
        return cls(_decode_b64_key(text, "public key"))

    def b64(self) -> str:
        """The base64 form (what peers configure)."""
        return base64.b64encode(self.raw).decode()

    def x25519(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.b64()})"


class StaticKeyPair:
    """A node's long-term X25519 identity."""

    __slots__ = ("private", "public")

    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private
        self.public = PublicKey(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def generate(cls) -> StaticKeyPair:
        """A fresh random identity."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_b64(cls, text: str) -> StaticKeyPair:
        """Parse a base64 private key; raises :class:`KeyFileError`."""
        return cls(X25519PrivateKey.from_private_bytes(_decode_b64_key(text, "private key")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StaticKeyPair:
        """Read a base64 private key file (mode 0600 or stricter)."""
        return cls.from_b64(_read_secret_file(Path(path), "private key"))

    def private_b64(self) -> str:
        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key as base64 to a 0600 file (atomically)."""
        _write_secret_file(Path(path), self.private_b64() + "\n")

    def __repr__(self) -> str:
        return f"StaticKeyPair(public={self.public.b64()})"


def generate_psk() -> bytes:
    """A random 32-byte pre-shared key (mixed into the handshake, like WireGuard's psk2)."""
    return os.urandom(KEY_LEN)


def load_psk(path: str | os.PathLike[str]) -> bytes:
    """Read a base64 PSK file (mode 0600 or stricter)."""
    return _decode_b64_key(_read_secret_file(Path(path), "psk"), "psk")


def save_psk(psk: bytes, path: str | os.PathLike[str]) -> None:
    """Write a PSK as base64 to a 0600 file."""
    _write_secret_file(Path(path), base64.b64encode(psk).decode() + "\n")


@dataclass(frozen=True, slots=True)
class Peer:
    """A configured remote: its static key and an optional PSK."""

    name: str
    public_key: PublicKey
    psk: bytes | None = None


class PeerAllowList:
    """Static public keys a node accepts; anything else is refused."""

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self._peers: dict[bytes, Peer] = {}
        for p in peers:
            self.add(p)

    def add(self, peer: Peer) -> None:
        self._peers[peer.public_key.raw] = peer

    def remove(self, key: PublicKey) -> None:
        self._peers.pop(key.raw, None)

    def get(self, key: PublicKey | bytes) -> Peer | None:
        raw = key.raw if isinstance(key, PublicKey) else key
        return self._peers.get(raw)

    def require(self, key: PublicKey | bytes) -> Peer:
        """The configured peer for ``key``; raises :class:`UnknownPeer`."""
        peer = self.get(key)
        if peer is None:
            raw = key.raw if isinstance(key, PublicKey) else key
            shown = base64.b64encode(raw).decode() if len(raw) == KEY_LEN else "?"
            raise UnknownPeer("peer static key not allowed", details={"public_key": shown})
        return peer

    def __contains__(self, key: object) -> bool:
        if isinstance(key, PublicKey):
            return key.raw in self._peers
        return isinstance(key, bytes) and key in self._peers

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())

    def __len__(self) -> int:
        return len(self._peers)
