"""Command and event schemas of the manager, generated from the record kinds.

For every record kind ``K`` (see :mod:`bus.kinds`) there are commands
``K_create``, ``K_update``, ``K_delete``, ``K_get``, ``K_list`` and events
``skyferry.v1.evt.K.created|updated|deleted``. A handful of whole-map
commands (import/export, application state) complete the surface.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from bus.kinds import KINDS, RecordKind
from bus.models import ApplicationMap, NetworkMap
from bus.models.application import ApplicationState
from bus.models.common import Id, Status
from bus.models.users import Authorisation

EVENT_PREFIX = "skyferry.v1.evt."


class Message(BaseModel):
    """Base of every command/response/event payload."""

    model_config = ConfigDict(extra="forbid")


class Empty(Message):
    """No fields."""


class WriteResult(Message):
    """What a successful write changed."""

    kind: str
    aggregate: str
    aggregate_id: str
    id: str
    version: int = Field(description="Stream position of the aggregate after the write.")
    event_type: str


class AsOf(Message):
    """Read state as of an earlier stream position or time (both optional)."""

    as_of_position: int | None = Field(default=None, ge=1)
    as_of_time: dt.datetime | None = None


def event_type(kind: str, verb: str) -> str:
    """Versioned event type name, e.g. ``skyferry.v1.evt.node.created``."""
    return f"{EVENT_PREFIX}{kind}.{verb}"


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


class KindMessages:
    """The generated models of one record kind."""

    def __init__(self, kind: RecordKind) -> None:
        self.kind = kind
        c = _camel(kind.name)
        parent: dict[str, Any] = {} if kind.is_root else {"parent_id": (Id, Field(description="Id of the root."))}
        version: Any = (int | None, Field(default=None, ge=0, description="Expected aggregate version; None: latest."))
        self.create: type[Any] = create_model(f"{c}Create", __base__=Message, **parent, record=(kind.model, ...))
        self.update: type[Any] = create_model(
            f"{c}Update", __base__=Message, **parent, record=(kind.model, ...), expected_version=version
        )
        self.delete: type[Any] = create_model(
            f"{c}Delete", __base__=Message, **parent, id=(str, ...), expected_version=version
        )
        self.get: type[Any] = create_model(f"{c}Get", __base__=AsOf, **parent, id=(str, ...))
        list_parent: dict[str, Any] = {} if kind.is_root else {"parent_id": (Id, ...)}
        self.list: type[Any] = create_model(f"{c}List", __base__=Message, **list_parent)
        self.view: type[Any] = create_model(
            f"{c}View", __base__=Message, record=(kind.model, ...), aggregate_id=(str, ...), version=(int, ...)
        )
        self.list_result: type[Any] = create_model(f"{c}ListResult", __base__=Message, items=(list[self.view], ...))  # type: ignore[name-defined]
        self.created: type[Any] = create_model(f"{c}Created", __base__=Message, record=(kind.model, ...))
        self.updated: type[Any] = create_model(f"{c}Updated", __base__=Message, record=(kind.model, ...))
        self.deleted: type[Any] = create_model(f"{c}Deleted", __base__=Message, id=(str, ...))
        for verb, model in (("created", self.created), ("updated", self.updated), ("deleted", self.deleted)):
            model.__schema_name__ = event_type(kind.name, verb)


MESSAGES: dict[str, KindMessages] = {name: KindMessages(kind) for name, kind in KINDS.items()}


class AppImport(Message):
    """Create or replace a whole application map in one atomic event."""

    map: ApplicationMap
    replace: bool = Field(default=False, description="Replace an existing application of the same id.")
    expected_version: int | None = Field(default=None, ge=0)


class AppImported(Message):
    __schema_name__ = event_type("app", "imported")
    map: ApplicationMap


class AppExport(AsOf):
    id: Id


class AppMapView(Message):
    map: ApplicationMap
    version: int


class AppSetState(Message):
    """Move an application along its state machine."""

    id: Id
    state: ApplicationState
    status: Status | None = None
    expected_version: int | None = Field(default=None, ge=0)


class AppStateChanged(Message):
    __schema_name__ = event_type("app", "state_changed")
    from_state: ApplicationState
    to_state: ApplicationState
    status: Status


class NetMapImport(Message):
    """Create or update every overlay and network domain of a network map."""

    map: NetworkMap


class NetMapImportResult(Message):
    written: list[WriteResult]
    unchanged: list[str]


class NetMapView(Message):
    map: NetworkMap
    version: int = Field(description="Stream position the map was read at.")


class WhoAmI(Message):
    id: str
    display_name: str
    groups: list[str]
    authorisations: list[Authorisation]


class SchemaDocument(Message):
    """The AsyncAPI document describing every command and event."""

    document: dict[str, Any]


EXTRA_EVENTS: list[type[BaseModel]] = [AppImported, AppStateChanged]


def all_event_models() -> dict[str, type[BaseModel]]:
    """Event type name -> payload model, for every event the manager writes."""
    out: dict[str, type[BaseModel]] = {}
    for m in MESSAGES.values():
        for model in (m.created, m.updated, m.deleted):
            out[model.__schema_name__] = model
    for extra in EXTRA_EVENTS:
        out[extra.__schema_name__] = extra  # type: ignore[attr-defined]
    return out
