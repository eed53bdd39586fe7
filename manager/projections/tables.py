"""The SQL read models: SQLAlchemy Core tables, one :data:`metadata`.

Bookkeeping tables (``projection_position``, ``projection_errors``), an audit
copy of every event (``events``), the folded state of every root
(``aggregates``) and relational tables for operators and downstream tools.
Relational rows are always rewritten whole for a root, so they carry no
foreign keys: a root's rows are deleted and inserted in one transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

metadata = MetaData()


#: JSON, stored as JSONB on PostgreSQL; Python ``None`` is SQL NULL, never JSON ``null``.
JsonType: TypeEngine[Any] = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _ts(name: str, nullable: bool = False) -> Column[Any]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


_ID = 64
_NAME = 128

# --- bookkeeping ------------------------------------------------------------------------------------

projection_position = Table(
    "projection_position",
    metadata,
    Column("name", String(_ID), primary_key=True),
    Column("position", BigInteger, nullable=False),
    _ts("updated_at"),
)

projection_errors = Table(
    "projection_errors",
    metadata,
    Column("projection", String(_ID), primary_key=True),
    Column("position", BigInteger, primary_key=True),
    Column("subject", Text, nullable=True),
    Column("aggregate_type", String(_ID), nullable=True),
    Column("aggregate_id", String(_ID), nullable=True),
    Column("event_type", Text, nullable=True),
    Column("error", Text, nullable=False),
    _ts("recorded_at"),
)

# Header-derived columns are TEXT: an odd header must never fail a whole batch.
events = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("aggregate_type", String(_ID), nullable=False),
    Column("aggregate_id", String(_ID), nullable=False),
    Column("event_type", Text, nullable=False),
    Column("actor", Text, nullable=True),
    Column("msg_id", Text, nullable=False),
    Column("correlation_id", Text, nullable=True),
    Column("causation_id", Text, nullable=True),
    _ts("timestamp"),
    Column("data", JsonType, nullable=False),
    Index("ix_events_aggregate", "aggregate_type", "aggregate_id", "position"),
    Index("ix_events_correlation", "correlation_id"),
)

aggregates = Table(
    "aggregates",
    metadata,
    Column("aggregate_type", String(_ID), primary_key=True),
    Column("aggregate_id", String(_ID), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("state", JsonType, nullable=True),
    _ts("updated_at"),
)

# --- network map ------------------------------------------------------------------------------------

overlays = Table(
    "overlays",
    metadata,
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("description", Text, nullable=False),
    Column("vni", Integer, nullable=True),
    Column("optimisation_policy", String(32), nullable=False),
    Column("version", BigInteger, nullable=False),
)

network_domains = Table(
    "network_domains",
    metadata,
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("description", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
)

vnas = Table(
    "vnas",
    metadata,
    Column("domain_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("type", String(32), nullable=False),
    Column("state", String(32), nullable=False),
    Column("external_address", String(64), nullable=True),
    Column("api_uri", Text, nullable=True),
)

resource_domains = Table(
    "resource_domains",
    metadata,
    Column("domain_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("vendor", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("api_uri", Text, nullable=True),
)

local_overlay_networks = Table(
    "local_overlay_networks",
    metadata,
    Column("domain_id", String(_ID), primary_key=True),
    Column("overlay_id", String(_ID), primary_key=True),
    Column("vlan_ids", JsonType, nullable=False),
    Column("provide_tunnel_server", Boolean, nullable=False),
    Column("tunnel_mode", String(32), nullable=False),
    Column("trusted", Boolean, nullable=False),
    Index("ix_lon_overlay", "overlay_id"),
)

# --- applications -----------------------------------------------------------------------------------

applications = Table(
    "applications",
    metadata,
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("state", String(32), nullable=False),
    Column("status_level", String(16), nullable=False),
    Column("status_detail", Text, nullable=False),
    Column("parent_id", String(_ID), nullable=True),
    Column("version", BigInteger, nullable=False),
    Index("ix_applications_state", "state"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("app_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("server_id", String(_ID), nullable=True),
    Column("source_image", String(_ID), nullable=True),
    Column("node_pool_id", String(_ID), nullable=True),
    Column("placement", String(_ID), nullable=True),
    Column("deploy_priority", Integer, nullable=False),
    Column("capture_priority", Integer, nullable=False),
)

node_interfaces = Table(
    "node_interfaces",
    metadata,
    Column("app_id", String(_ID), primary_key=True),
    Column("node_id", String(_ID), primary_key=True),
    Column("name", String(32), primary_key=True),
    Column("application_network", String(_ID), nullable=False),
    Column("boot_protocol", String(16), nullable=False),
    Column("address", String(64), nullable=True),
    Column("prefix_len", Integer, nullable=True),
    Column("gateway", String(64), nullable=True),
    Column("mac", String(32), nullable=True),
    Index("ix_node_interfaces_address", "address"),
    Index("ix_node_interfaces_mac", "mac"),
)

node_pools = Table(
    "node_pools",
    metadata,
    Column("app_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=True),
    Column("prime_node", String(_ID), nullable=False),
    Column("min_nodes", Integer, nullable=False),
    Column("max_nodes", Integer, nullable=False),
    Column("source_image", String(_ID), nullable=True),
    Column("placement", String(_ID), nullable=True),
    Column("deploy_priority", Integer, nullable=False),
)

application_networks = Table(
    "application_networks",
    metadata,
    Column("app_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("name", String(_NAME), nullable=False),
    Column("production_overlay_id", String(_ID), nullable=False),
    Column("fence_overlay_id", String(_ID), nullable=True),
    Column("subnet", String(64), nullable=True),
    Index("ix_app_networks_overlay", "production_overlay_id"),
)

databases = Table(
    "databases",
    metadata,
    Column("app_id", String(_ID), primary_key=True),
    Column("id", String(_ID), primary_key=True),
    Column("node_id", String(_ID), nullable=False),
    Column("migrate_mode", String(32), nullable=False),
    Column("target_location", Text, nullable=True),
)

# --- users and sagas --------------------------------------------------------------------------------

users = Table(
    "users",
    metadata,
    Column("id", String(_ID), primary_key=True),
    Column("display_name", String(_NAME), nullable=False),
    Column("groups", JsonType, nullable=False),
    Column("authorisations", JsonType, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("version", BigInteger, nullable=False),
)

sagas = Table(
    "sagas",
    metadata,
    Column("id", String(_ID), primary_key=True),
    Column("name", Text, nullable=True),
    Column("status", Text, nullable=False),
    Column("last_event_type", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    _ts("updated_at"),
    Index("ix_sagas_status", "status"),
)

#: Tables holding the read model proper (everything but the bookkeeping).
READ_MODEL_TABLES: tuple[Table, ...] = (
    events,
    aggregates,
    overlays,
    network_domains,
    vnas,
    resource_domains,
    local_overlay_networks,
    applications,
    nodes,
    node_interfaces,
    node_pools,
    application_networks,
    databases,
    users,
    sagas,
)
