"""Run a data plane inside a network namespace from a process that lives outside it.

Linux network namespaces are per thread: a thread that ``setns()``-es into a
namespace creates its sockets, TAPs and netlink sockets there, while the
process's other threads (the bus connection) stay where they were. The VNA
agent uses this in the lab, where each VNA is a namespace but the bus is on
the host's loopback; on a real VNA the agent runs with ``netns=None``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from bus.errors import SkyferryError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


class NetnsError(SkyferryError):
    """The namespace does not exist or cannot be entered."""


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsLoop:
    """An event loop in a thread that lives in ``netns`` (or a plain thread if ``None``)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"dataplane-{netns or 'host'}", daemon=True)

    def start(self) -> None:
        if self.netns and not os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            raise NetnsError(f"no network namespace {self.netns!r}")
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise NetnsError(f"cannot enter {self.netns}: {self._error}") from self._error

    def _main(self) -> None:
        try:
            if self.netns:
                _setns(self.netns)
            self._loop = asyncio.new_event_loop()
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the namespace's loop and await its result from the caller's loop."""
        assert self._loop is not None, "start() first"
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wrap_future(fut)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a plain function in the namespace thread and wait (for short synchronous calls)."""

        async def wrapper() -> Any:
            return fn(*args)

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
