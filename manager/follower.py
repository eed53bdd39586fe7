"""Keeps a repository's cache current with events written by any manager instance."""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from bus.connection import Bus
from bus.subjects import EVENTS_ALL, EVENTS_STREAM
from manager.store.recorder import stored_from_message
from manager.store.repository import Repository

log = structlog.get_logger(__name__)


class StreamFollower:
    """An ordered push consumer from the repository's position onwards."""

    def __init__(self, bus: Bus, repo: Repository) -> None:
        self.bus = bus
        self.repo = repo
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.bus.js.subscribe(
            EVENTS_ALL,
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.repo.position + 1),
            cb=self._on_msg,
        )

    async def _on_msg(self, msg: Msg) -> None:
        try:
            ev = stored_from_message(msg.subject, int(msg.metadata.sequence.stream), msg.headers, msg.data)
            self.repo.observe(ev)
        except Exception as exc:  # one bad event must not stop the cache from following
            log.warning("follower_skip_event", subject=msg.subject, error=repr(exc))

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                log.debug("follower_unsubscribe_failed")
            self._sub = None
