"""Leases: the same rules in memory and in the JetStream KV bucket."""

from __future__ import annotations

import asyncio

import pytest

from bus.connection import Bus
from manager.saga import LEASE_BUCKET, KvLeases, LeaseHeld, LeaseLost, LeaseManager, MemoryLeases


class LeaseContract:
    """Subclasses provide ``leases`` (TTL about 1 s) and ``expire(saga_id)``."""

    async def expire(self, leases: LeaseManager, saga_id: str) -> None:
        raise NotImplementedError

    async def test_one_holder_at_a_time(self, leases: LeaseManager) -> None:
        lease = await leases.acquire("s1", "a")
        with pytest.raises(LeaseHeld) as info:
            await leases.acquire("s1", "b")
        assert info.value.details["holder"] == "a"
        renewed = await leases.renew(lease)
        assert renewed.revision != lease.revision
        await leases.release(renewed)
        assert (await leases.acquire("s1", "b")).holder == "b"

    async def test_same_holder_takes_it_back(self, leases: LeaseManager) -> None:
        old = await leases.acquire("s2", "a")
        new = await leases.acquire("s2", "a")  # a restart of the same instance
        with pytest.raises(LeaseLost):
            await leases.renew(old)
        await leases.renew(new)

    async def test_expired_lease_goes_to_the_next_holder(self, leases: LeaseManager) -> None:
        old = await leases.acquire("s3", "a")
        await self.expire(leases, "s3")
        await leases.acquire("s3", "b")
        with pytest.raises(LeaseLost):
            await leases.renew(old)

    async def test_release_of_a_lost_lease_is_harmless(self, leases: LeaseManager) -> None:
        old = await leases.acquire("s4", "a")
        await self.expire(leases, "s4")
        new = await leases.acquire("s4", "b")
        await leases.release(old)
        await leases.renew(new)


class TestMemoryLeases(LeaseContract):
    @pytest.fixture
    def leases(self) -> LeaseManager:
        return MemoryLeases(ttl_s=1.0)

    async def expire(self, leases: LeaseManager, saga_id: str) -> None:
        assert isinstance(leases, MemoryLeases)
        leases.expire(saga_id)


class TestKvLeases(LeaseContract):
    @pytest.fixture
    def leases(self, bus: Bus) -> LeaseManager:
        return KvLeases(bus, ttl_s=1.0)

    async def expire(self, leases: LeaseManager, saga_id: str) -> None:
        assert isinstance(leases, KvLeases)
        kv = await leases.bucket()
        async with asyncio.timeout(5):  # the server drops the key once the TTL has passed
            while True:
                try:
                    await kv.get(saga_id)
                except Exception:
                    return
                await asyncio.sleep(0.1)

    async def test_bucket_is_created_with_the_ttl(self, bus: Bus) -> None:
        leases = KvLeases(bus, ttl_s=2.0)
        status = await (await leases.bucket()).status()
        assert status.bucket == LEASE_BUCKET
        assert status.ttl == pytest.approx(2.0)
        # a coordinator configured differently uses the existing bucket
        other = KvLeases(bus, ttl_s=9.0)
        assert (await (await other.bucket()).status()).ttl == pytest.approx(2.0)
        assert other.ttl_s == pytest.approx(2.0)  # and renews on its schedule
