"""PullFlow against a real nats-server: order, batching, idle timeouts, lost requests, a deleted consumer."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from bus.connection import Bus, BusConfig
from bus.pull import ConsumerGone, PullFlow
from bus.server import EmbeddedNatsServer

STREAM = "PULLTEST"


async def _stream(bus: Bus) -> None:
    await bus.js.add_stream(StreamConfig(name=STREAM, subjects=["pt.>"]))


async def _consumer(bus: Bus, name: str, ack: AckPolicy = AckPolicy.NONE) -> str:
    cfg = ConsumerConfig(durable_name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=ack, filter_subject="pt.>")
    return (await bus.js.add_consumer(STREAM, cfg)).name


async def _publish(bus: Bus, first: int, count: int) -> None:
    for i in range(first, first + count):
        await bus.js.publish(f"pt.{i % 7}", str(i).encode(), headers={"Sf-N": str(i)})


async def _drain(flow: PullFlow, count: int, most: int, timeout: float = 20.0) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            batch = await flow.next_batch(most, 1.0)
            assert len(batch) <= most
            got += [int(m.data) for m in batch]
    return got


async def test_delivers_every_message_once_in_order_in_bounded_batches(bus: Bus) -> None:
    await _stream(bus)
    await _publish(bus, 0, 1500)
    name = await _consumer(bus, "all")
    async with PullFlow(bus, STREAM, name, window=256) as flow:
        got = await _drain(flow, 1500, most=100)
        assert got == list(range(1500))
        assert flow.outstanding <= 256
        # Nothing more: an empty batch once the timeout passes, not an error and not a hang.
        start = time.monotonic()
        assert await flow.next_batch(100, 0.3) == []
        assert 0.25 <= time.monotonic() - start < 5


async def test_hands_out_the_first_message_without_waiting_for_a_full_batch(bus: Bus) -> None:
    await _stream(bus)
    name = await _consumer(bus, "live")
    async with PullFlow(bus, STREAM, name, window=1000) as flow:
        assert await flow.next_batch(500, 0.2) == []  # the request is out; nothing to deliver yet
        await _publish(bus, 0, 1)
        start = time.monotonic()
        batch = await flow.next_batch(500, 5.0)
        assert [int(m.data) for m in batch] == [0]
        assert time.monotonic() - start < 2.0  # not the 5 s timeout, not a heartbeat


async def test_acked_messages_are_not_redelivered(bus: Bus) -> None:
    await _stream(bus)
    await _publish(bus, 0, 300)
    name = await _consumer(bus, "acked", AckPolicy.ALL)
    async with PullFlow(bus, STREAM, name, window=64) as flow:
        batch = await flow.next_batch(300, 5.0)
        await batch[-1].ack()
        rest = await _drain(flow, 300 - len(batch), most=300)
    assert [int(m.data) for m in batch] + rest == list(range(300))
    info = await bus.js.consumer_info(STREAM, name)
    assert info.num_ack_pending == 300 - len(batch)


async def test_requests_lost_in_a_server_restart_are_made_again() -> None:
    server = EmbeddedNatsServer()
    await server.start()
    try:
        bus = await Bus.connect(BusConfig(servers=[server.url], name="pull-restart"))
        try:
            await _stream(bus)
            await _publish(bus, 0, 10)
            name = await _consumer(bus, "survivor")
            async with PullFlow(bus, STREAM, name, window=100, expires=30.0, heartbeat=0.5) as flow:
                assert await _drain(flow, 10, most=100) == list(range(10))
                await server.restart()  # the server forgets the outstanding request (expires in 30 s)

                async def published() -> None:
                    while True:
                        try:
                            await _publish(bus, 10, 5)
                            return
                        except Exception:  # reconnecting
                            await asyncio.sleep(0.1)

                await asyncio.wait_for(published(), 20)
                # Within a few heartbeats the flow notices the silence and asks again.
                assert await _drain(flow, 5, most=100, timeout=15) == list(range(10, 15))
        finally:
            await bus.close()
    finally:
        await server.stop()


async def test_a_deleted_consumer_ends_the_flow_with_a_typed_error(bus: Bus) -> None:
    await _stream(bus)
    name = await _consumer(bus, "doomed")
    async with PullFlow(bus, STREAM, name, window=10) as flow:
        assert await flow.next_batch(10, 0.2) == []
        await bus.js.delete_consumer(STREAM, name)
        with pytest.raises(ConsumerGone) as err:
            async with asyncio.timeout(10):
                while True:
                    await flow.next_batch(10, 0.5)
    assert err.value.retryable
