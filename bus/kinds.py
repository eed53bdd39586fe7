"""The record kinds the manager stores, and where each lives.

Four aggregate roots have their own event subject (``sf.evt.<aggregate>.<id>``):
overlays, network domains, applications and users. Every other record lives
inside one of them (a VNA inside its network domain, a node inside its
application) and is written by an event on its root's subject, so a change to
a record and the checks on its siblings are one atomic append.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel

from bus.models import (
    VNA,
    Application,
    ApplicationMap,
    ApplicationNetwork,
    Database,
    LocalOverlayNetwork,
    NetworkDomain,
    Node,
    NodePool,
    OverlayNetwork,
    ResourceDomain,
    UserAccount,
)
from bus.models.users import Authorisation


class Aggregate(StrEnum):
    """Aggregate root types (the ``<aggregate>`` token of event subjects)."""

    OVERLAY = "overlay"
    DOMAIN = "domain"
    APP = "app"
    USER = "user"
    SAGA = "saga"


@dataclass(frozen=True)
class RecordKind:
    """One kind of record: its model, its root and the list it lives in."""

    name: str
    model: type[BaseModel]
    aggregate: Aggregate
    key: str = "id"
    """Field that identifies the record within its root."""
    parent_field: str | None = None
    """Attribute of the root state holding the list; None for a root record."""
    read_right: Authorisation = Authorisation.NETWORK_READ
    write_right: Authorisation = Authorisation.NETWORK_WRITE

    @property
    def is_root(self) -> bool:
        return self.parent_field is None


_APP: dict[str, Authorisation] = {
    "read_right": Authorisation.APPLICATION_READ,
    "write_right": Authorisation.APPLICATION_WRITE,
}

KINDS: dict[str, RecordKind] = {
    k.name: k
    for k in [
        RecordKind("overlay", OverlayNetwork, Aggregate.OVERLAY),
        RecordKind("domain", NetworkDomain, Aggregate.DOMAIN),
        RecordKind("vna", VNA, Aggregate.DOMAIN, parent_field="vnas"),
        RecordKind("resource_domain", ResourceDomain, Aggregate.DOMAIN, parent_field="resource_domains"),
        RecordKind(
            "local_overlay",
            LocalOverlayNetwork,
            Aggregate.DOMAIN,
            key="overlay_id",
            parent_field="local_overlay_networks",
        ),
        RecordKind("app", Application, Aggregate.APP, **_APP),
        RecordKind("node", Node, Aggregate.APP, parent_field="nodes", **_APP),
        RecordKind("node_pool", NodePool, Aggregate.APP, parent_field="node_pools", **_APP),
        RecordKind(
            "app_network",
            ApplicationNetwork,
            Aggregate.APP,
            parent_field="networks",
            **_APP,
        ),
        RecordKind("database", Database, Aggregate.APP, parent_field="databases", **_APP),
        RecordKind(
            "user",
            UserAccount,
            Aggregate.USER,
            read_right=Authorisation.USER_ADMIN,
            write_right=Authorisation.USER_ADMIN,
        ),
    ]
}

ROOT_KIND: dict[Aggregate, RecordKind] = {k.aggregate: k for k in KINDS.values() if k.is_root}

#: The state type folded for each aggregate root.
ROOT_STATE: dict[Aggregate, type[BaseModel]] = {
    Aggregate.OVERLAY: OverlayNetwork,
    Aggregate.DOMAIN: NetworkDomain,
    Aggregate.APP: ApplicationMap,
    Aggregate.USER: UserAccount,
}
