"""Connection to the NATS bus: one or many URLs, credentials, TLS, reconnect, drain."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from bus.errors import BusUnavailable
from bus.subjects import ALERTS_ALL, ALERTS_STREAM, EVENTS_ALL, EVENTS_STREAM, FLOWS_ALL, FLOWS_STREAM

log = structlog.get_logger(__name__)


@dataclass
class BusConfig:
    """How to reach the bus; every field has a safe default for the embedded stack."""

    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    """One or many NATS URLs (a cluster); the client fails over between them."""
    name: str = "skyferry"
    """Connection name shown by the server's monitoring."""
    nkey_seed: str | None = None
    """nkeys seed (``SU...``) for nkey authentication."""
    nkey_seed_file: Path | None = None
    """File holding the seed; read at connect time."""
    creds_file: Path | None = None
    """A ``.creds`` file (JWT + seed) for operator-mode servers."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout: float = 3.0
    max_reconnect_attempts: int = -1
    """-1: keep trying forever (daemons); the CLI sets a small number."""
    reconnect_time_wait: float = 0.5
    drain_timeout: float = 5.0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> BusConfig:
        """Comma-separated URLs as accepted by ``--server`` / ``SKYFERRY_NATS_URL``."""
        return cls(servers=[u.strip() for u in url.split(",") if u.strip()], **kwargs)

    def _tls(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "max_reconnect_attempts": self.max_reconnect_attempts,
            "reconnect_time_wait": self.reconnect_time_wait,
            "drain_timeout": self.drain_timeout,
            "allow_reconnect": True,
        }
        seed = self.nkey_seed or (self.nkey_seed_file.read_text().strip() if self.nkey_seed_file else None)
        if seed:
            opts["nkeys_seed_str"] = seed
        if self.creds_file:
            opts["user_credentials"] = str(self.creds_file)
        if self.user:
            opts["user"], opts["password"] = self.user, self.password
        if self.token:
            opts["token"] = self.token
        tls = self._tls()
        if tls:
            opts["tls"] = tls
        return opts


class Bus:
    """A live connection: the NATS client plus its JetStream context."""

    def __init__(self, nc: Client, config: BusConfig) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config

    @classmethod
    async def connect(cls, config: BusConfig) -> Bus:
        """Connect (with failover across ``config.servers``).

        Raises:
            BusUnavailable: no server could be reached or authentication failed.
        """
        log_ = log.bind(servers=config.servers, name=config.name)

        async def on_disconnect() -> None:
            # A drain/close we asked for is not worth a warning.
            if nc.is_closed or nc.is_draining:
                log_.debug("bus_closed")
            else:
                log_.warning("bus_disconnected")

        async def on_reconnect() -> None:
            log_.info("bus_reconnected", url=str(nc.connected_url.netloc if nc.connected_url else ""))

        async def on_error(exc: Exception) -> None:
            log_.warning("bus_error", error=repr(exc))

        try:
            nc = await nats.connect(
                **config.connect_options(),
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
            )
        except Exception as exc:  # nats raises several unrelated types here
            raise BusUnavailable(f"cannot connect to {config.servers}: {exc!r}") from exc
        return cls(nc, config)

    async def close(self) -> None:
        """Drain subscriptions and pending publishes, then close."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception:  # already closing / connection lost: close hard instead
            await self.nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_kv(bus: Bus, bucket: str, *, ttl_s: float, history: int = 1) -> KeyValue:
    """Bind to a JetStream KV bucket, creating it (file storage, with a TTL) if missing."""
    try:
        return await bus.js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await bus.js.create_key_value(
            KeyValueConfig(bucket=bucket, ttl=ttl_s, history=history, storage=StorageType.FILE)
        )


async def ensure_streams(bus: Bus, *, replicas: int = 1, flow_max_age_s: float = 86_400) -> None:
    """Create or update the SF_EVENTS and SF_FLOWS streams (idempotent)."""
    events = StreamConfig(
        name=EVENTS_STREAM,
        subjects=[EVENTS_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
        allow_direct=True,
        discard=DiscardPolicy.OLD,
        description="Skyferry domain events: the source of truth.",
    )
    flows = StreamConfig(
        name=FLOWS_STREAM,
        subjects=[FLOWS_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=flow_max_age_s,
        max_bytes=1024**3,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
        description="Flow statistics from VNAs (bounded by age and size).",
    )
    alerts = StreamConfig(
        name=ALERTS_STREAM,
        subjects=[ALERTS_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=30 * 86_400,
        max_bytes=256 * 1024**2,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
        description="Data-plane alerts from VNAs: MAC/IP conflicts, loops.",
    )
    for cfg in (events, flows, alerts):
        try:
            await bus.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            await bus.js.update_stream(cfg)
