"""A JetStream pull consumer read as a flow: requests kept ahead of the reader, no task per message.

nats-py's ``PullSubscription.fetch`` waits for each message of a batch with a
task of its own (``asyncio.wait_for`` and a ``uuid4`` name per message: about
20-30 µs, as much as projecting the event), and returns only when the batch is
full or its timeout ends. :class:`PullFlow` instead keeps pull requests
outstanding for up to ``window`` messages (topped up when half are delivered,
the way nats.go's ``Consume`` does), takes the messages in one subscription
callback into a buffer, and hands out whatever the buffer holds as soon as it
holds anything: the reader applies one batch while the server already sends
the next.

Each request asks for idle heartbeats, so requests that the server forgot (it
restarted, the client reconnected) are noticed within a few heartbeats and
made again instead of stalling until they would have expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import Bus
from bus.errors import BusError

log = structlog.get_logger(__name__)

#: JetStream's API subject prefix (no domain, as everywhere in Skyferry).
JS_API = "$JS.API"
_STATUS = "Status"
_DESCRIPTION = "Description"
_HEARTBEAT = "100"
_DONE = frozenset({"404", "408", "409"})
"""No messages / request expired / request ended by the server (consumer deleted, limits...)."""


class ConsumerGone(BusError):
    """The server ended the pull because the consumer was deleted or changed (recreate it)."""


class PullFlow:
    """Messages of one JetStream pull consumer, pulled ahead. Use as ``async with`` or :meth:`open`.

    Args:
        bus: a connected bus.
        stream: the stream's name.
        consumer: the consumer's (durable or ephemeral) name.
        window: most messages requested and not yet handed out.
        expires: lifetime of each pull request, seconds.
        heartbeat: idle heartbeat asked of each request, seconds (a request silent for three
            of them is taken as lost and made again).
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        consumer: str,
        *,
        window: int = 2048,
        expires: float = 10.0,
        heartbeat: float = 1.0,
    ) -> None:
        self.bus = bus
        self.api = f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.window = window
        self.expires = expires
        self.heartbeat = heartbeat
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._credits: dict[str, int] = {}
        """Outstanding requests (reply subject), oldest first -> messages still to come."""
        self._ids = itertools.count(1)
        self._heard = time.monotonic()
        self._gone: str | None = None
        self._log = log.bind(stream=stream, consumer=consumer)

    async def open(self) -> PullFlow:
        """Subscribe to the flow's inbox (requests are made by :meth:`next_batch`)."""
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        return self

    async def close(self) -> None:
        """Unsubscribe; outstanding requests end on the server when they expire."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be down
                await sub.unsubscribe()

    async def __aenter__(self) -> PullFlow:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def outstanding(self) -> int:
        """Messages requested and not yet delivered."""
        return sum(self._credits.values())

    async def next_batch(self, most: int, timeout: float, *, linger: float = 0.0) -> list[Msg]:
        """Up to ``most`` messages, as soon as there is one; ``[]`` if none came within ``timeout``.

        ``linger``: once there is one, wait this long for more when fewer than ``most`` are
        there (a reader whose work costs per batch trades a few ms of latency for fewer batches).

        Raises:
            ConsumerGone: the server ended the pull: the consumer was deleted or its limits changed.
        """
        deadline = time.monotonic() + timeout
        while not self._buffer:
            self._raise_if_gone()
            self._arrived.clear()  # before anything that may yield: a message arriving meanwhile sets it
            await self._top_up()
            left = deadline - time.monotonic()
            if self._buffer or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, self.heartbeat))
        if linger > 0 and 0 < len(self._buffer) < most:
            await asyncio.sleep(linger)
        batch = [self._buffer.popleft() for _ in range(min(most, len(self._buffer)))]
        await self._top_up()
        return batch

    async def _top_up(self) -> None:
        """Request more once half the window is delivered (or the requests were lost)."""
        if self._credits and time.monotonic() - self._heard > 3 * self.heartbeat:
            self._log.info("pull_requests_lost", outstanding=self.outstanding)
            self._credits.clear()  # silent for three heartbeats: the server no longer has them
        want = self.window - len(self._buffer) - self.outstanding
        if want < self.window // 2:
            return
        reply = f"{self._inbox}.{next(self._ids)}"
        request = {"batch": want, "expires": int(self.expires * 1e9), "idle_heartbeat": int(self.heartbeat * 1e9)}
        if not self._credits:
            self._heard = time.monotonic()
        self._credits[reply] = want
        await self.bus.nc.publish(self.api, json.dumps(request).encode(), reply=reply)

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get(_STATUS) if headers and not msg.data else None
        if status is None:
            self._buffer.append(msg)
            # A message names its stream subject, not the request: the server serves requests in order.
            credits = self._credits
            if credits:
                oldest = next(iter(credits))
                left = credits[oldest] - 1
                if left > 0:
                    credits[oldest] = left
                else:
                    del credits[oldest]
            self._arrived.set()
            return
        if status == _HEARTBEAT:
            return
        self._credits.pop(msg.subject, None)
        description = (headers or {}).get(_DESCRIPTION, "")
        if status == "409" and ("Deleted" in description or "Changed" in description):
            self._gone = description
        self._arrived.set()

    def _raise_if_gone(self) -> None:
        if self._gone is not None:
            raise ConsumerGone(f"pull ended by the server: {self._gone}", details={"api": self.api})
