"""A tunnel endpoint: frame device (TAP) + transport link + record codec + counters.

The hot path lives here and in the links: a readable TAP is drained in
batches (``os.readv`` into one preallocated buffer, no per-frame
allocation), each frame sealed straight into the link's send buffer, and
the batch flushed with one socket write. Opened payloads are written to the
TAP with one ``os.write`` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from .datagram import DatagramLink
from .errors import RecordError
from .fastpath import Address, FastPath
from .fastpath import available as fastpath_available
from .handshake import TimestampGuard
from .keys import Peer, PeerAllowList, StaticKeyPair
from .link import Backoff, Link
from .mtu import report as mtu_report
from .plain import PlainChannel
from .session import Channel, RekeyPolicy, SecureChannel
from .stats import Direction, DropReason, FlowHook, FlowSampler, TunnelState, TunnelStats, gso_segments
from .stream import StreamClient, StreamServer
from .switch import Switch
from .tap import FrameDevice, TapDevice
from .vxlan import KernelVxlan, VxlanSpec
from .wire import FLAG_BUNDLE, FLAG_VNET, MAX_PAYLOAD, VNET_HDR

log = structlog.get_logger("vna_agent.dataplane.tunnel")

READ_BATCH = 64
#: Frames up to this size (jumbo) are bundled; bigger ones (superpackets) travel alone.
BUNDLE_FRAME_MAX = 9216
#: Payload bytes per bundle record.
BUNDLE_LIMIT = 32 * 1024
_BLEN = struct.Struct("!H")
TICK = 0.2
_ZERO_VNET = bytes(VNET_HDR.size)
_VNET_LEN = VNET_HDR.size


class TunnelMode(StrEnum):
    """How frames cross: encrypted stream (TCP), encrypted datagram (UDP), plain, kernel VXLAN."""

    STREAM = "stream"
    DATAGRAM = "datagram"
    PLAIN = "plain"
    VXLAN = "vxlan"


class Role(StrEnum):
    """Server listens (responder); client connects (initiator)."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """One tunnel endpoint. Validated when built.

    Attributes:
        name: label for logs and status.
        mode: see :class:`TunnelMode`.
        role: server (listen on ``address``) or client (connect to ``address``).
        address: (host, port) to listen on or connect to.
        bridge: overlay bridge to attach the TAP to (``None``: leave it detached).
        tap: TAP interface name (default derived from ``name``).
        offload: TAP with VNET_HDR + TSO (superpackets) or frame by frame.
        mtu: overlay MTU set on the TAP.
        plain_transport: for ``plain`` mode, "stream" or "datagram".
        path_mtu: underlay path MTU for datagram splitting (``None``: ask the kernel).
        bind: datagram client's local (host, port).
        policy: rekey timers and limits.
        backoff: reconnect backoff (stream client).
        vxlan: link parameters for ``vxlan`` mode.
        fastpath: once keyed, forward in the native thread (``fastpath.py``) when it is built.
    """

    name: str
    mode: TunnelMode
    role: Role = Role.CLIENT
    address: tuple[str, int] = ("127.0.0.1", 0)
    bridge: str | None = None
    tap: str | None = None
    offload: bool = True
    mtu: int = 1500
    plain_transport: str = "stream"
    path_mtu: int | None = None
    bind: tuple[str, int] = ("0.0.0.0", 0)
    policy: RekeyPolicy = field(default_factory=RekeyPolicy)
    backoff: Backoff = field(default_factory=Backoff)
    vxlan: VxlanSpec | None = None
    fastpath: bool = True

    def __post_init__(self) -> None:
        if self.mode == TunnelMode.VXLAN and (self.vxlan is None or not self.bridge):
            raise ValueError("vxlan mode needs a VxlanSpec and a bridge")
        if self.plain_transport not in ("stream", "datagram"):
            raise ValueError("plain_transport must be 'stream' or 'datagram'")
        if not 68 <= self.mtu <= 65535:
            raise ValueError("mtu out of range")
        if self.tap is not None and not 0 < len(self.tap) < 16:
            raise ValueError("tap name must be 1..15 characters")

    @property
    def transport(self) -> str:
        if self.mode == TunnelMode.PLAIN:
            return self.plain_transport
        return str(self.mode)

    @property
    def encrypted(self) -> bool:
        return self.mode in (TunnelMode.STREAM, TunnelMode.DATAGRAM)

    @property
    def tap_name(self) -> str:
        return self.tap or f"sft-{self.name}"[:15]


class Tunnel:
    """Ties a frame device, a link and a codec together (see module docstring).

    Args:
        config: what to run.
        identity: this node's static key (encrypted modes).
        peer: the remote's static key (client: whom to dial; server: whom to accept).
        device: an already open device (tests pass a :class:`~.tap.PipeDevice`);
            otherwise a TAP is opened and attached to ``config.bridge``.
        flow_hook: called for every frame that passes (per-flow statistics).
        flow_sampler: the same statistics fed from the native fast path; without it a
            tunnel with a ``flow_hook`` stays on the Python data path.
        guard: replayed-initiation memory to share across tunnel restarts.
    """

    def __init__(
        self,
        config: TunnelConfig,
        *,
        identity: StaticKeyPair | None = None,
        peer: Peer | None = None,
        device: FrameDevice | None = None,
        flow_hook: FlowHook | None = None,
        flow_sampler: FlowSampler | None = None,
        guard: TimestampGuard | None = None,
        netns: str | None = None,
    ) -> None:
        if config.encrypted and (identity is None or peer is None):
            raise ValueError("encrypted modes need identity and peer")
        self.config = config
        self.identity = identity
        self.peer = peer
        self.flow_hook = flow_hook
        self.flow_sampler = flow_sampler
        self.fast: FastPath | None = None
        self._stats = TunnelStats()
        self.device: FrameDevice | None = device
        self._own_device = device is None
        self._guard = guard or TimestampGuard()
        self._netns = netns
        self.channel: Channel | None = None
        self.link: Link | None = None
        self._vxlan: KernelVxlan | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading = False
        self._paused = False
        self._fd = -1
        self._vnet = False
        self._rbuf = bytearray(BUNDLE_LIMIT + MAX_PAYLOAD + 2)
        self._rview = memoryview(self._rbuf)
        self._flags = 0
        self._bundle_limit = BUNDLE_LIMIT

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the device, bind/dial the transport, start serving.

        Raises:
            DataplaneError: device, switch or socket set-up failed.
        """
        cfg = self.config
        try:
            if cfg.mode == TunnelMode.VXLAN:
                assert cfg.vxlan is not None
                self._vxlan = KernelVxlan(cfg.vxlan, Switch(cfg.bridge or "", netns=self._netns))
                await self._vxlan.create()
                self.stats.state = TunnelState.UP
                return
            await self._open_device()
            self.channel = self._make_channel()
            self.link = self._make_link(self.channel)
            await self.link.open()
        except BaseException:
            await self._cleanup()
            raise
        self._start_reading()
        self._task = asyncio.create_task(self._supervise(), name=f"tunnel-{cfg.name}")
        addr = f"{cfg.address[0]}:{cfg.address[1]}"
        log.info("tunnel_started", name=cfg.name, mode=str(cfg.mode), role=str(cfg.role), address=addr)

    async def stop(self) -> None:
        """Stop serving and release the device (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._cleanup()
        self.stats.state = TunnelState.STOPPED
        log.info("tunnel_stopped", name=self.config.name)

    @property
    def running(self) -> bool:
        """Started and not failed or stopped (vxlan: link created)."""
        if self._vxlan is not None:
            return True
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Until the tunnel stops (re-raises a failure of its link)."""
        if self._task is not None:
            await self._task

    async def _cleanup(self) -> None:
        if self.fast is not None:  # the link normally stops it first; never close the TAP under it
            self.fast.stop()
            self.fast = None
        self._stop_reading()
        if self._vxlan is not None:
            await self._vxlan.delete()
            self._vxlan = None
        if self.device is not None and self._own_device:
            self.device.close()
            self.device = None

    async def _open_device(self) -> None:
        cfg = self.config
        if self.device is None:
            tap = TapDevice.open(cfg.tap_name, offload=cfg.offload)
            self.device = tap
            if cfg.bridge:
                await Switch(cfg.bridge, netns=self._netns).add_port(tap.name, mtu=cfg.mtu)
        self._fd = self.device.fd
        self._vnet = self.device.vnet_hdr
        self._flags = FLAG_VNET if self._vnet else 0

    def _make_channel(self) -> Channel:
        cfg = self.config
        initiator = cfg.role == Role.CLIENT
        if not cfg.encrypted:
            return PlainChannel(initiator=initiator)
        assert self.identity is not None and self.peer is not None
        return SecureChannel(
            self.identity,
            PeerAllowList([self.peer]),
            remote=self.peer,
            initiator=initiator,
            policy=cfg.policy,
            guard=self._guard,
        )

    def _make_link(self, channel: Channel) -> Link:
        cfg = self.config
        host, port = cfg.address
        if cfg.transport == "datagram":
            if cfg.role == Role.SERVER:
                return DatagramLink(channel, self, bind=(host, port), policy=cfg.policy, path_mtu=cfg.path_mtu)
            return DatagramLink(
                channel, self, bind=cfg.bind, remote=(host, port), policy=cfg.policy, path_mtu=cfg.path_mtu
            )
        if cfg.role == Role.SERVER:
            return StreamServer(host, port, channel, self, policy=cfg.policy)
        return StreamClient(host, port, channel, self, policy=cfg.policy, backoff=cfg.backoff)

    async def _supervise(self) -> None:
        assert self.link is not None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run())
                tg.create_task(self._ticker())
        except* Exception as eg:
            self.stats.state = TunnelState.FAILED
            log.error("tunnel_failed", name=self.config.name, error=str(eg.exceptions[0]))
            raise

    async def _ticker(self) -> None:
        assert self.link is not None
        while True:
            await asyncio.sleep(TICK)
            self.link.tick()

    # -- device reading (hot path) ------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and self._fd >= 0 and not self._paused and self.fast is None:
            asyncio.get_running_loop().add_reader(self._fd, self._on_device_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False

    @property
    def stats(self) -> TunnelStats:
        """The tunnel's counters (the fast path's native counters merged in)."""
        fast = self.fast  # once: another thread may read status while the loop thread drops it
        if fast is not None:
            fast.merge_stats()
        return self._stats

    # -- native fast path ---------------------------------------------------------

    def fast_path(
        self,
        sock_fd: int,
        *,
        stream: bool,
        on_message: Callable[[bytes, Address], None],
        on_closed: Callable[[int], None],
        on_peer: Callable[[Address], None] | None = None,
        on_msgsize: Callable[[], None] | None = None,
        chunk: int = 0,
        gso: bool = True,
    ) -> FastPath | None:
        """Hand the TAP and ``sock_fd`` to a native forwarding thread (the link starts it).

        ``None`` when the fast path is off, not built, or cannot serve this tunnel
        (plain channel, a test device, a flow hook without a sampler).
        """
        cfg = self.config
        ch = self.channel
        if (
            not cfg.fastpath
            or not fastpath_available()
            or not isinstance(ch, SecureChannel)
            or self.device is None
            or (self.flow_hook is not None and self.flow_sampler is None)
            or self.fast is not None
        ):
            return None
        self._stop_reading()
        self.fast = FastPath(
            tap_fd=self._fd,
            sock_fd=sock_fd,
            stream=stream,
            vnet=self._vnet,
            channel=ch,
            stats=self._stats,
            on_message=on_message,
            on_closed=on_closed,
            on_peer=on_peer,
            on_msgsize=on_msgsize,
            sampler=self.flow_sampler,
            bundle_limit=self._bundle_limit,
            chunk=chunk,
            gso=gso,
        )
        return self.fast

    def flush_flows(self) -> None:
        """Move the fast path's flow samples into the flow sampler now (safe from another thread)."""
        fast = self.fast
        if fast is not None:
            fast.flush_flows()

    def fast_path_ended(self) -> None:
        """The link stopped its fast path: the Python data path takes the TAP back."""
        self.fast = None
        if not self._paused:
            self._start_reading()

    def pause_device(self) -> None:
        self._paused = True
        self._stop_reading()

    def resume_device(self) -> None:
        self._paused = False
        self._start_reading()

    def _on_device_readable(self) -> None:
        """Drain the device: small frames are bundled into one record, big ones go alone.

        Frames are read straight into the bundle buffer behind a 2-byte length,
        so bundling costs no copy; it never waits for more frames than are
        already queued, so it adds no latency.
        """
        link = self.link
        if link is None:
            return
        fd, buf, view = self._fd, self._rbuf, self._rview
        st = self.stats
        vnet = self._vnet
        hook = self.flow_hook
        limit = self._bundle_limit
        pos = count = nbytes = segs = 0
        try:
            for _ in range(READ_BATCH):
                try:
                    n = os.readv(fd, [view[pos + 2 : pos + 2 + MAX_PAYLOAD]])
                except BlockingIOError:
                    break
                if n >= MAX_PAYLOAD:
                    st.drop(DropReason.TOO_BIG)
                    continue
                frame = view[pos + 2 : pos + 2 + n]
                if hook is not None:
                    hook(frame, vnet, Direction.OUT)
                s = gso_segments(frame, True) if vnet and frame[1] else 1  # [1]: gso_type
                if n > BUNDLE_FRAME_MAX:
                    if count:
                        self._send(link, view[:pos], count, nbytes, segs)
                    self._send(link, frame, 1, n, s)
                    pos = count = nbytes = segs = 0
                else:
                    _BLEN.pack_into(buf, pos, n)
                    pos += 2 + n
                    count += 1
                    nbytes += n
                    segs += s
                    if pos >= limit:
                        self._send(link, view[:pos], count, nbytes, segs)
                        pos = count = nbytes = segs = 0
                if self._paused:
                    break
            if count:
                self._send(link, view[:pos], count, nbytes, segs)
        except OSError as exc:
            log.error("device_read_failed", name=self.config.name, error=str(exc))
            self._stop_reading()
        finally:
            link.flush()

    def _send(self, link: Link, payload: memoryview, count: int, nbytes: int, segs: int) -> None:
        """Seal one record: a lone frame, or a bundle of ``count`` length-prefixed frames."""
        flags = self._flags
        if count > 1:
            flags |= FLAG_BUNDLE
        elif nbytes != len(payload):  # a single frame still behind its length prefix
            payload = payload[2:]
        try:
            link.send_frame(payload, flags)
        except RecordError as exc:
            self.stats.drop(exc.reason, count)
            return
        st = self.stats
        st.records_out += 1
        st.bytes_out += nbytes
        st.frames_out += segs

    # -- device writing (hot path) ---------------------------------------------------

    def deliver(self, payload: memoryview, flags: int) -> None:
        """Write an opened payload (a frame or a bundle of frames) to the device."""
        n = len(payload)
        st = self.stats
        if not n:
            st.keepalives_in += 1
            return
        st.records_in += 1
        if not flags & FLAG_BUNDLE:
            self._write(payload, flags)
            return
        pos = 0
        write = self._write
        while pos < n:
            end = pos + 2 + ((payload[pos] << 8) | payload[pos + 1]) if pos + 2 <= n else n + 1
            if end > n:
                st.drop(DropReason.DECODE)
                return
            write(payload[pos + 2 : end], flags)
            pos = end

    def _write(self, frame: memoryview, flags: int) -> None:
        n = len(frame)
        st = self.stats
        vnet = bool(flags & FLAG_VNET)
        if vnet and n < _VNET_LEN:
            st.drop(DropReason.DECODE)
            return
        try:
            if vnet == self._vnet:
                os.write(self._fd, frame)
            elif self._vnet:  # plain frame into a VNET_HDR TAP: "no offload" header
                os.writev(self._fd, [_ZERO_VNET, frame])
            elif not frame[1] and not frame[0] & 1:  # no GSO, checksum complete
                os.write(self._fd, frame[_VNET_LEN:])
            else:  # a superpacket or partial-checksum frame cannot go into a plain TAP
                st.drop(DropReason.OFFLOAD_MISMATCH)
                return
        except BlockingIOError:
            st.drop(DropReason.QUEUE_FULL)
            return
        except OSError:
            st.drop(DropReason.DEVICE)
            return
        st.bytes_in += n
        st.frames_in += gso_segments(frame, True) if vnet and frame[1] else 1
        if self.flow_hook is not None:
            self.flow_hook(frame, vnet, Direction.IN)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: state, counters, session and link details, MTU report."""
        cfg = self.config
        out: dict[str, Any] = {
            "name": cfg.name,
            "mode": str(cfg.mode),
            "role": str(cfg.role),
            "address": f"{cfg.address[0]}:{cfg.address[1]}",
            "device": self.device.name if self.device else None,
            "offload": self._vnet,
            "fastpath": self.fast is not None,
            "bridge": cfg.bridge,
            "time": time.time(),
            **self.stats.snapshot(),
        }
        if self.channel is not None:
            cs = self.channel.status()
            out["session"] = {
                "peer": cs.peer,
                "ready": cs.ready,
                "handshakes": cs.handshakes,
                "current_index": cs.current_index,
                "current_age": cs.current_age,
                "pending": cs.pending,
                "sessions": cs.sessions,
            }
        if self.link is not None:
            out["link"] = self.link.info()
        path_mtu = cfg.path_mtu or 1500
        if self.link is not None:
            path_mtu = int(getattr(self.link, "path_mtu", path_mtu))
        mode = cfg.transport if cfg.encrypted else f"plain-{cfg.transport}"
        if cfg.mode == TunnelMode.VXLAN:
            mode = "vxlan"
            path_mtu = cfg.vxlan.underlay_mtu if cfg.vxlan else path_mtu
        out["mtu"] = mtu_report(mode, path_mtu, encrypted=cfg.encrypted, vnet=self._vnet).as_dict()
        return out

    async def vxlan_counters(self) -> dict[str, int]:
        """Kernel counters of the VXLAN link (vxlan mode)."""
        return await self._vxlan.counters() if self._vxlan else {}

    def bound_port(self) -> int:
        """The local port of a server's listening socket."""
        return int(getattr(self.link, "bound_port", 0))
