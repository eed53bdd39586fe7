"""Saga leases: which coordinator may drive a saga right now.

Several coordinators may run (one per manager node). A coordinator acts on a
saga only while it holds the saga's lease, a key in the JetStream KV bucket
``SF_SAGA_LEASES`` whose TTL (the bucket's max age, e.g. 5 s) is renewed every
``ttl/3``:

* acquire: ``kv.create(saga_id)``; it fails while someone holds the key. If the
  value names *this* coordinator's instance id (a restart of the same instance),
  the key is taken over at once with ``kv.update(last=revision)``.
* renew: ``kv.update(saga_id, last=revision)``; a wrong revision means the lease
  expired and someone else took it: :class:`LeaseLost`, the run stops.
* a coordinator that dies stops renewing; the key expires after the TTL and the
  next scan of any coordinator (``resume_all`` / the periodic scan of ``serve``)
  acquires it and continues the saga from its events.

Instance ids must be unique among live coordinators; the default one is. The
lease keeps coordinators from calling participants twice at the same time, but
it is not what keeps the history consistent: every append carries the expected
last position, so a coordinator that lost its lease without noticing cannot
write after the new holder (its append conflicts and it stops).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from bus.connection import Bus
from bus.errors import BusTimeout, BusUnavailable
from manager.saga.errors import LeaseHeld, LeaseLost

log = structlog.get_logger(__name__)

LEASE_BUCKET = "SF_SAGA_LEASES"
DEFAULT_LEASE_TTL_S = 5.0


@dataclass(frozen=True)
class Lease:
    """A held lease: the saga, its holder and the KV revision to renew from."""

    saga_id: str
    holder: str
    revision: int


class LeaseManager(Protocol):
    """Acquire, renew and release per-saga leases."""

    ttl_s: float

    async def acquire(self, saga_id: str, holder: str) -> Lease:
        """Take the saga's lease.

        Raises:
            LeaseHeld: another holder has it.
        """
        ...

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease.

        Raises:
            LeaseLost: it expired and was taken, or was released.
            BusTimeout, BusUnavailable: transient; the caller retries until the lease would expire.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up (best effort)."""
        ...


class MemoryLeases:
    """In-process leases with the same rules; share one instance between coordinators in a test."""

    def __init__(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._held: dict[str, tuple[str, int, float]] = {}
        self._revision = 0

    def holder(self, saga_id: str) -> str | None:
        entry = self._held.get(saga_id)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0]

    def expire(self, saga_id: str) -> None:
        """Let a lease run out now (simulates a dead holder)."""
        self._held.pop(saga_id, None)

    def _put(self, saga_id: str, holder: str) -> Lease:
        self._revision += 1
        self._held[saga_id] = (holder, self._revision, time.monotonic() + self.ttl_s)
        return Lease(saga_id, holder, self._revision)

    async def acquire(self, saga_id: str, holder: str) -> Lease:
        current = self.holder(saga_id)
        if current is not None and current != holder:
            raise LeaseHeld(f"saga {saga_id} is run by {current}", details={"saga_id": saga_id, "holder": current})
        return self._put(saga_id, holder)

    async def renew(self, lease: Lease) -> Lease:
        entry = self._held.get(lease.saga_id)
        if entry is None or entry[1] != lease.revision:
            raise LeaseLost(f"lease of saga {lease.saga_id} lost", details={"saga_id": lease.saga_id})
        return self._put(lease.saga_id, lease.holder)

    async def release(self, lease: Lease) -> None:
        entry = self._held.get(lease.saga_id)
        if entry is not None and entry[1] == lease.revision:
            del self._held[lease.saga_id]


class KvLeases:
    """Leases in the JetStream KV bucket ``SF_SAGA_LEASES`` (TTL = the bucket's max age).

    The TTL is a property of the bucket, fixed by whoever creates it first; a
    coordinator configured with another TTL uses the existing bucket and logs it.
    """

    def __init__(self, bus: Bus, *, ttl_s: float = DEFAULT_LEASE_TTL_S, replicas: int = 1) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def bucket(self) -> KeyValue:
        """The lease bucket, created on first use."""
        async with self._lock:
            if self._kv is None:
                config = KeyValueConfig(
                    bucket=LEASE_BUCKET,
                    description="Skyferry saga leases: which coordinator drives which saga.",
                    history=1,
                    ttl=self.ttl_s,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
                try:
                    self._kv = await self.bus.js.create_key_value(config)
                except nats.js.errors.BadRequestError:
                    # Exists with another configuration (another TTL): use it as it is.
                    kv = await self.bus.js.key_value(LEASE_BUCKET)
                    ttl = (await kv.status()).ttl
                    log.warning("saga_lease_bucket_exists", bucket=LEASE_BUCKET, wanted_ttl_s=self.ttl_s, ttl_s=ttl)
                    self.ttl_s = ttl or self.ttl_s
                    self._kv = kv
            return self._kv

    @staticmethod
    def _value(holder: str) -> bytes:
        return json.dumps({"holder": holder, "at": time.time()}).encode()

    async def acquire(self, saga_id: str, holder: str) -> Lease:
        try:
            kv = await self.bucket()
            for _ in range(3):
                try:
                    rev = await kv.create(saga_id, self._value(holder))
                    return Lease(saga_id, holder, rev)
                except nats.js.errors.KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await kv.get(saga_id)
                except nats.js.errors.KeyNotFoundError:
                    continue  # expired or released between the two calls
                current = _holder_of(entry.value)
                if current != holder:
                    raise LeaseHeld(
                        f"saga {saga_id} is run by {current}", details={"saga_id": saga_id, "holder": current}
                    )
                try:
                    rev = await kv.update(saga_id, self._value(holder), last=entry.revision)
                    return Lease(saga_id, holder, rev)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            raise BusTimeout("lease store did not answer", details={"saga_id": saga_id}) from exc
        except nats.errors.Error as exc:
            raise BusUnavailable(f"lease store unavailable: {exc!r}", details={"saga_id": saga_id}) from exc
        raise LeaseHeld(f"saga {saga_id}: lease contended", details={"saga_id": saga_id})

    async def renew(self, lease: Lease) -> Lease:
        try:
            kv = await self.bucket()
            rev = await kv.update(lease.saga_id, self._value(lease.holder), last=lease.revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise LeaseLost(
                f"lease of saga {lease.saga_id} lost", details={"saga_id": lease.saga_id, "holder": lease.holder}
            ) from exc
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            raise BusTimeout("lease renewal not acknowledged", details={"saga_id": lease.saga_id}) from exc
        except nats.errors.Error as exc:
            raise BusUnavailable(f"lease renewal failed: {exc!r}", details={"saga_id": lease.saga_id}) from exc
        return Lease(lease.saga_id, lease.holder, rev)

    async def release(self, lease: Lease) -> None:
        try:
            kv = await self.bucket()
            await kv.delete(lease.saga_id, last=lease.revision)
        except Exception as exc:  # expired or taken already, or the bus is going away: nothing to undo
            log.debug("saga_lease_release_failed", saga_id=lease.saga_id, error=repr(exc))


def _holder_of(value: bytes | None) -> str | None:
    try:
        data = json.loads(value or b"{}")
    except ValueError:
        return None
    holder = data.get("holder") if isinstance(data, dict) else None
    return holder if isinstance(holder, str) else None
