"""The manager's command surface on the bus: the map store's create/update/delete/get/list.

Every handler authenticates (signature, done by the service), authorises
(authorisation + record ACL, checked inside the decision so it sees exactly
the state being written), decides one event and appends it atomically.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel

from bus.connection import Bus
from bus.errors import AlreadyExists, Forbidden, NotFound, ValidationFailed
from bus.kinds import KINDS, ROOT_KIND, Aggregate, RecordKind
from bus.messages import (
    MESSAGES,
    AppExport,
    AppImport,
    AppMapView,
    AppSetState,
    Empty,
    NetMapImport,
    NetMapImportResult,
    NetMapView,
    SchemaDocument,
    WhoAmI,
    WriteResult,
    event_type,
)
from bus.models import ApplicationMap, NetworkDomain, NetworkMap, OverlayNetwork, UserAccount
from bus.models.common import AccessControlEntry, Credentials, Right
from bus.models.users import Authorisation
from bus.service import BusService, CommandContext
from manager.access import authorise, may_see
from manager.auth import KvNonceStore, SignatureAuthenticator
from manager.domain import decide_create, decide_delete, decide_set_state, decide_update, find_child, key_of
from manager.store.repository import Decision, Keyed, Loaded, Repository

log = structlog.get_logger(__name__)

SERVICE = "manager"
VERSION = "0.1.0"


def acl_of(aggregate: Aggregate, state: BaseModel | None) -> list[AccessControlEntry]:
    """The access-control list that guards a root (and every record inside it)."""
    if state is None:
        return []
    if isinstance(state, ApplicationMap):
        return list(state.application.access_controls)
    return list(getattr(state, "access_controls", []) or [])


@dataclass
class ManagerService:
    """Builds and runs the ``manager`` bus service over a :class:`Repository`."""

    bus: Bus
    repo: Repository
    schema_provider: Callable[[], dict[str, Any]] | None = None
    require_signatures: bool = True

    def __post_init__(self) -> None:
        self.service: BusService | None = None
        self.authenticator: SignatureAuthenticator | None = None

    def lookup_user(self, user_id: str) -> UserAccount | None:
        state = self.repo.current(Aggregate.USER, user_id)
        return state if isinstance(state, UserAccount) else None

    async def start(self) -> BusService:
        authenticator = None
        if self.require_signatures:
            authenticator = SignatureAuthenticator(self.lookup_user, await KvNonceStore.open(self.bus))
        self.authenticator = authenticator
        svc = BusService(
            self.bus,
            SERVICE,
            VERSION,
            "Skyferry migration manager: maps, users, access control",
            authenticator=authenticator,
        )
        for kind in KINDS.values():
            self._register_kind(svc, kind)
        self._register_maps(svc)
        await svc.start()
        self.service = svc
        return svc

    async def stop(self) -> None:
        if self.service:
            await self.service.stop()

    # --- generic record commands ----------------------------------------------------------------

    def _register_kind(self, svc: BusService, kind: RecordKind) -> None:
        m = MESSAGES[kind.name]
        handlers: dict[str, tuple[type[BaseModel], type[BaseModel], Callable[..., Awaitable[BaseModel]]]] = {
            "create": (m.create, WriteResult, self._create),
            "update": (m.update, WriteResult, self._update),
            "delete": (m.delete, WriteResult, self._delete),
            "get": (m.get, m.view, self._get),
            "list": (m.list, m.list_result, self._list),
        }
        for verb, (req, resp, fn) in handlers.items():
            svc.add_command_spec(f"{kind.name}_{verb}", req, resp, _bind(fn, kind), f"{verb} a {kind.name} record")

    def _agg_id(self, kind: RecordKind, req: Any) -> str:
        return str(req.parent_id) if not kind.is_root else key_of(kind, req.record)

    async def _write(
        self,
        ctx: CommandContext,
        kind: RecordKind,
        agg_id: str,
        decide: Callable[[Loaded], Decision],
        expected: int | None,
        key: str,
    ) -> WriteResult:
        written = await self.repo.write(
            kind.aggregate,
            agg_id,
            decide,
            expected_version=expected,
            actor=ctx.envelope.actor,
            msg_id=ctx.envelope.msg_id,
            correlation_id=ctx.envelope.correlation_id,
            keyed=keyed_of(ctx),
        )
        ctx.log.info(
            "record_written",
            kind=kind.name,
            id=key,
            event_type=written.event_type,
            position=written.position,
            replayed=written.replayed,
        )
        return WriteResult(
            kind=kind.name,
            aggregate=kind.aggregate.value,
            aggregate_id=agg_id,
            id=key,
            version=written.position,
            event_type=written.event_type,
        )

    def _guard(self, ctx: CommandContext, kind: RecordKind, cur: Loaded, right: Right) -> None:
        user = ctx.principal
        if user is None:
            return
        what = f"{cur.aggregate.value} {cur.id}"
        authorise(
            user,
            kind.write_right if right is not Right.READ else kind.read_right,
            acl=acl_of(cur.aggregate, cur.state),
            right=right,
            what=what,
        )

    async def _create(self, kind: RecordKind, ctx: CommandContext, req: Any) -> WriteResult:
        key = key_of(kind, req.record)
        if kind.is_root and ctx.principal is not None:
            authorise(ctx.principal, kind.write_right, what=f"new {kind.name}")

        def decide(cur: Loaded) -> Decision:
            if not kind.is_root:
                self._guard(ctx, kind, cur, Right.WRITE)
            self._check_references(kind, req.record)
            return decide_create(kind, cur.state, req.record)

        return await self._write(ctx, kind, self._agg_id(kind, req), decide, None, key)

    async def _update(self, kind: RecordKind, ctx: CommandContext, req: Any) -> WriteResult:
        key = key_of(kind, req.record)

        def decide(cur: Loaded) -> Decision:
            self._guard(ctx, kind, cur, Right.WRITE)
            self._check_references(kind, req.record)
            return decide_update(kind, cur.state, req.record)

        return await self._write(ctx, kind, self._agg_id(kind, req), decide, req.expected_version, key)

    async def _delete(self, kind: RecordKind, ctx: CommandContext, req: Any) -> WriteResult:
        agg_id = str(req.parent_id) if not kind.is_root else str(req.id)

        def decide(cur: Loaded) -> Decision:
            self._guard(ctx, kind, cur, Right.DELETE)
            if kind.name == "overlay":
                self._refuse_if_overlay_in_use(str(req.id))
            return decide_delete(kind, cur.state, str(req.id))

        return await self._write(ctx, kind, agg_id, decide, req.expected_version, str(req.id))

    async def _get(self, kind: RecordKind, ctx: CommandContext, req: Any) -> BaseModel:
        agg_id = str(req.parent_id) if not kind.is_root else str(req.id)
        cur = await self.repo.load(kind.aggregate, agg_id, until_position=req.as_of_position, until_time=req.as_of_time)
        if cur.state is None:
            raise NotFound(f"{ROOT_KIND[kind.aggregate].name} {agg_id!r} does not exist")
        if not (kind.name == "user" and ctx.principal is not None and ctx.principal.id == agg_id):
            self._guard(ctx, kind, cur, Right.READ)
        record = self._record_of(kind, cur.state, str(req.id))
        view: BaseModel = MESSAGES[kind.name].view(record=record, aggregate_id=agg_id, version=cur.version)
        return view

    async def _list(self, kind: RecordKind, ctx: CommandContext, req: Any) -> BaseModel:
        m = MESSAGES[kind.name]
        user = ctx.principal
        if user is not None:
            authorise(user, kind.read_right, what=f"{kind.name} list")
        roots = self.repo.cached(kind.aggregate)
        if not kind.is_root:
            roots = [r for r in roots if r.id == str(req.parent_id)]
            if not roots:
                raise NotFound(f"{ROOT_KIND[kind.aggregate].name} {req.parent_id!r} does not exist")
        items = []
        for root in roots:
            if user is not None and not may_see(user, acl_of(root.aggregate, root.state)):
                continue
            records = (
                [self._record_of(kind, root.state, None)]
                if kind.is_root
                else getattr(root.state, kind.parent_field or "")
            )
            items += [m.view(record=r, aggregate_id=root.id, version=root.version) for r in records]
        result: BaseModel = m.list_result(items=items)
        return result

    @staticmethod
    def _record_of(kind: RecordKind, state: BaseModel | None, key: str | None) -> BaseModel:
        assert state is not None
        if kind.is_root:
            return state.application if isinstance(state, ApplicationMap) else state
        found = find_child(kind, state, key or "")
        if found is None:
            raise NotFound(f"{kind.name} {key!r} does not exist")
        return found

    # --- cross-aggregate reference checks (read side; see DESIGN note on eventual consistency) -----

    def _overlay_ids(self) -> set[str]:
        return {r.id for r in self.repo.cached(Aggregate.OVERLAY)}

    def _check_references(self, kind: RecordKind, record: BaseModel) -> None:
        refuse_plain_secrets(record)
        overlays = self._overlay_ids()
        if kind.name == "local_overlay" and str(record.overlay_id) not in overlays:  # type: ignore[attr-defined]
            raise ValidationFailed(f"overlay {record.overlay_id!r} does not exist")  # type: ignore[attr-defined]
        if kind.name == "app_network":
            for ov in (record.production_overlay_id, record.fence_overlay_id):  # type: ignore[attr-defined]
                if ov is not None and str(ov) not in overlays:
                    raise ValidationFailed(f"overlay {ov!r} does not exist")

    def _refuse_if_overlay_in_use(self, overlay_id: str) -> None:
        for dom in self.repo.cached(Aggregate.DOMAIN):
            assert isinstance(dom.state, NetworkDomain)
            if any(lon.overlay_id == overlay_id for lon in dom.state.local_overlay_networks):
                raise ValidationFailed(f"overlay {overlay_id!r} is still joined in domain {dom.id!r}")

    # --- whole maps, state, identity ----------------------------------------------------------------

    def _register_maps(self, svc: BusService) -> None:
        svc.add_command_spec(
            "app_import", AppImport, WriteResult, self._app_import, "create/replace an application map"
        )
        svc.add_command_spec(
            "app_export", AppExport, AppMapView, self._app_export, "an application map, as of now or earlier"
        )
        svc.add_command_spec("app_set_state", AppSetState, WriteResult, self._app_set_state, "change application state")
        svc.add_command_spec(
            "netmap_import", NetMapImport, NetMapImportResult, self._netmap_import, "import a network map"
        )
        svc.add_command_spec("netmap_export", Empty, NetMapView, self._netmap_export, "the whole network map")
        svc.add_command_spec("whoami", Empty, WhoAmI, self._whoami, "the authenticated user")
        svc.add_command_spec(
            "schema", Empty, SchemaDocument, self._schema, "AsyncAPI of every command and event", public=True
        )

    async def _app_import(self, ctx: CommandContext, req: AppImport) -> WriteResult:
        app_id = str(req.map.application.id)
        kind = KINDS["app"]
        if ctx.principal is not None:
            authorise(ctx.principal, Authorisation.APPLICATION_WRITE, what=f"app {app_id}")
        refuse_plain_secrets(req.map)
        for net in req.map.networks:
            self._check_references(KINDS["app_network"], net)

        def decide(cur: Loaded) -> Decision:
            if cur.state is not None:
                if not req.replace:
                    raise AlreadyExists(f"app {app_id!r} already exists (use replace)")
                self._guard(ctx, kind, cur, Right.WRITE)
            return event_type("app", "imported"), {"map": req.map.model_dump(mode="json")}

        return await self._write(ctx, kind, app_id, decide, req.expected_version, app_id)

    async def _app_export(self, ctx: CommandContext, req: AppExport) -> AppMapView:
        cur = await self.repo.load(
            Aggregate.APP, str(req.id), until_position=req.as_of_position, until_time=req.as_of_time
        )
        if not isinstance(cur.state, ApplicationMap):
            raise NotFound(f"app {req.id!r} does not exist")
        self._guard(ctx, KINDS["app"], cur, Right.READ)
        return AppMapView(map=cur.state, version=cur.version)

    async def _app_set_state(self, ctx: CommandContext, req: AppSetState) -> WriteResult:
        kind = KINDS["app"]

        def decide(cur: Loaded) -> Decision:
            self._guard(ctx, kind, cur, Right.CONTROL)
            return decide_set_state(cur.state, req.state, req.status)

        return await self._write(ctx, kind, str(req.id), decide, req.expected_version, str(req.id))

    async def _netmap_import(self, ctx: CommandContext, req: NetMapImport) -> NetMapImportResult:
        refuse_plain_secrets(req.map)
        if ctx.principal is not None:
            authorise(ctx.principal, Authorisation.NETWORK_WRITE, what="network map")
        written: list[WriteResult] = []
        unchanged: list[str] = []
        # Overlays first so domains' local overlay networks find them.
        for kind, record in [(KINDS["overlay"], o) for o in req.map.overlays] + [
            (KINDS["domain"], d) for d in req.map.domains
        ]:
            key = key_of(kind, record)
            keyed = keyed_of(ctx, f"{kind.name}:{key}")
            # A keyed re-run reads the stream itself, so an earlier run's write is found and reported
            # as written (the first result), never as "unchanged".
            cur = await self.repo.load(kind.aggregate, key, fresh=keyed is not None)
            earlier = self.repo.replayed(keyed, cur) if keyed is not None else None
            if earlier is not None:
                written.append(_write_result(kind, key, earlier.position, earlier.event_type))
                continue
            if cur.state is not None and cur.state.model_dump(mode="json") == record.model_dump(mode="json"):
                unchanged.append(f"{kind.name}:{key}")
                continue
            verb = "updated" if cur.state is not None else "created"

            def decide(cur: Loaded, kind: RecordKind = kind, record: BaseModel = record, verb: str = verb) -> Decision:
                if cur.state is not None:
                    self._guard(ctx, kind, cur, Right.WRITE)
                return event_type(kind.name, verb), {"record": record.model_dump(mode="json")}

            # A per-record message id keeps a retried import idempotent.
            written.append(await self._write_import(ctx, kind, key, decide, keyed))
        return NetMapImportResult(written=written, unchanged=unchanged)

    async def _write_import(
        self,
        ctx: CommandContext,
        kind: RecordKind,
        key: str,
        decide: Callable[[Loaded], Decision],
        keyed: Keyed | None,
    ) -> WriteResult:
        w = await self.repo.write(
            kind.aggregate,
            key,
            decide,
            expected_version=None,
            actor=ctx.envelope.actor,
            msg_id=f"{ctx.envelope.msg_id}-{kind.name}-{key}",
            correlation_id=ctx.envelope.correlation_id or ctx.envelope.msg_id,
            keyed=keyed,
        )
        return _write_result(kind, key, w.position, w.event_type)

    async def _netmap_export(self, ctx: CommandContext, req: Empty) -> NetMapView:
        user = ctx.principal
        if user is not None:
            authorise(user, Authorisation.NETWORK_READ, what="network map")
        overlays = [r.state for r in self.repo.cached(Aggregate.OVERLAY)]
        domains = [r.state for r in self.repo.cached(Aggregate.DOMAIN)]
        if user is not None:
            overlays = [o for o in overlays if may_see(user, acl_of(Aggregate.OVERLAY, o))]
            domains = [d for d in domains if may_see(user, acl_of(Aggregate.DOMAIN, d))]
        nm = NetworkMap.model_validate(
            {
                "overlays": [o.model_dump(mode="json") for o in overlays if isinstance(o, OverlayNetwork)],
                "domains": [d.model_dump(mode="json") for d in domains if isinstance(d, NetworkDomain)],
            }
        )
        return NetMapView(map=nm, version=self.repo.position)

    async def _whoami(self, ctx: CommandContext, req: Empty) -> WhoAmI:
        user = ctx.principal
        if not isinstance(user, UserAccount):
            raise Forbidden("no authenticated user")
        return WhoAmI(
            id=user.id,
            display_name=user.display_name,
            groups=list(user.groups),
            authorisations=sorted(user.authorisations),
        )

    async def _schema(self, ctx: CommandContext, req: Empty) -> SchemaDocument:
        if self.schema_provider is None:
            raise NotFound("schema document not available")
        return SchemaDocument(document=self.schema_provider())


def keyed_of(ctx: CommandContext, part: str | None = None) -> Keyed | None:
    """The idempotency key a write keeps in its event (``part`` names one event of a multi-event command)."""
    if ctx.idempotency is None:
        return None
    key = ctx.idempotency.key if part is None else f"{ctx.idempotency.key}#{part}"
    return Keyed(key=key, digest=ctx.idempotency.digest, actor=ctx.envelope.actor)


def _write_result(kind: RecordKind, key: str, position: int, ev_type: str) -> WriteResult:
    return WriteResult(
        kind=kind.name, aggregate=kind.aggregate.value, aggregate_id=key, id=key, version=position, event_type=ev_type
    )


def _walk_secrets(value: Any, path: str) -> list[str]:
    if isinstance(value, Credentials):
        return [path] if value.secret is not None else []
    if isinstance(value, BaseModel):
        return [p for name in type(value).model_fields for p in _walk_secrets(getattr(value, name), f"{path}.{name}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _walk_secrets(v, f"{path}.{i}")]
    return []


def refuse_plain_secrets(record: BaseModel) -> None:
    """Events are readable by every observer of the stream, so secrets never go into them.

    Raises:
        ValidationFailed: a ``Credentials.secret`` is set; use ``key_ref`` to point at a secret store.
    """
    found = _walk_secrets(record, "record")
    if found:
        raise ValidationFailed(
            "plain secrets are not stored in maps; reference them with credentials.key_ref",
            details={"errors": [{"loc": p.removeprefix("."), "msg": "secret not allowed"} for p in found]},
        )


def _bind(
    fn: Callable[..., Awaitable[BaseModel]], kind: RecordKind
) -> Callable[[CommandContext, Any], Awaitable[BaseModel]]:
    async def handler(ctx: CommandContext, req: Any) -> BaseModel:
        return await fn(kind, ctx, req)

    return handler
