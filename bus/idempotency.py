"""Replies remembered by idempotency key, so a retried or re-run saga step has its effect once.

A request carrying ``Sf-Idempotency-Key`` (or an ``idempotency_key`` payload field)
whose key already succeeded gets the stored reply instead of running again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

import msgpack
import nats.js.errors
from nats.js.kv import KeyValue

from bus.connection import Bus, open_kv

IDEMPOTENCY_BUCKET = "SF_IDEMPOTENCY"


class IdempotencyStore(Protocol):
    async def get(self, scope: str, key: str) -> tuple[bytes, dict[str, str]] | None: ...

    async def put(self, scope: str, key: str, body: bytes, headers: dict[str, str]) -> None: ...


def _kv_key(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\x00{key}".encode()).hexdigest()[:48]


class MemoryIdempotencyStore:
    """In-process store (tests, single-process participants)."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._data: OrderedDict[str, tuple[bytes, dict[str, str]]] = OrderedDict()
        self._max = max_entries

    async def get(self, scope: str, key: str) -> tuple[bytes, dict[str, str]] | None:
        return self._data.get(_kv_key(scope, key))

    async def put(self, scope: str, key: str, body: bytes, headers: dict[str, str]) -> None:
        self._data[_kv_key(scope, key)] = (body, dict(headers))
        while len(self._data) > self._max:
            self._data.popitem(last=False)


class KvIdempotencyStore:
    """Shared by every instance of a service and kept across restarts (JetStream KV with a TTL)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus, *, ttl_s: float = 7 * 86_400) -> KvIdempotencyStore:
        return cls(await open_kv(bus, IDEMPOTENCY_BUCKET, ttl_s=ttl_s))

    async def get(self, scope: str, key: str) -> tuple[bytes, dict[str, str]] | None:
        try:
            entry = await self._kv.get(_kv_key(scope, key))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        body, headers = msgpack.unpackb(entry.value, raw=False)
        return bytes(body), dict(headers)

    async def put(self, scope: str, key: str, body: bytes, headers: dict[str, str]) -> None:
        await self._kv.put(_kv_key(scope, key), msgpack.packb([body, headers], use_bin_type=True))
