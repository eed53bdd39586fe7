"""A command as any bus client can send it: envelope headers and a msgpack/JSON body, through dispatch.

Drives :meth:`bus.service.BusService._dispatch` (envelope headers, content
type, codec, signature and freshness check by the manager's
:class:`~manager.auth.SignatureAuthenticator`, idempotency key, request
model) for real request models of the manager and the saga service. Input:
mode byte (bit 0: sign the message with the known user's key, so the
request gets past authentication), command byte, header lines ``name:
value`` up to an empty line, then the body. The reply must be a result or a
typed error; ``internal`` (an exception that was not a SkyferryError) is a
finding, as is anything escaping dispatch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from bus import codec, signing
from bus.envelope import Envelope, utcnow
from bus.errors import ErrorCode
from bus.messages import MESSAGES, AppImport, AppSetState, Empty, NetMapImport
from bus.models.users import UserAccount
from bus.service import BusService, CommandSpec, schema_name
from bus.subjects import ContentType, Header
from manager.auth import SignatureAuthenticator
from manager.saga.service import SagaRef, StartSaga

from ._input import Reader

MAX_LEN = 16384
SUBJECT = "sf.cmd.manager.fuzz"
SEED = signing.generate_user_seed()
USER = UserAccount(id="alice", public_key=signing.public_key_of(SEED))
REQUESTS: list[type[Any]] = [
    AppImport,
    NetMapImport,
    AppSetState,
    StartSaga,
    SagaRef,
    MESSAGES["node"].create,
    MESSAGES["overlay"].update,
    MESSAGES["vna"].get,
]
_LOOP = asyncio.new_event_loop()


async def _ok(ctx: Any, request: Any) -> Empty:
    return Empty()


def _service() -> BusService:
    auth = SignatureAuthenticator(lambda actor: USER if actor == USER.id else None, signing.MemoryNonceStore())
    svc = BusService(bus=None, name="manager", version="0", authenticator=auth)  # type: ignore[arg-type]
    for i, model in enumerate(REQUESTS):
        svc.add(CommandSpec(verb=f"c{i}", request=model, response=Empty, handler=_ok))
    return svc


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return headers


def _sign(headers: dict[str, str], body: bytes, spec: CommandSpec[Any, Any]) -> None:
    headers[Header.TIMESTAMP.value] = utcnow().isoformat()
    try:
        env = Envelope.from_headers(headers, default_schema=schema_name(spec.request))
    except Exception:
        return
    headers[Header.SIGNATURE.value] = signing.sign(SEED, SUBJECT, env, body).signature or ""
    headers[Header.MSG_ID.value] = env.msg_id


async def _dispatch(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    spec_index = r.byte() % len(REQUESTS)
    head, _, body = r.rest().partition(b"\n\n")
    headers = _headers(head)
    svc = _service()
    spec = svc.commands[f"c{spec_index}"]
    if mode & 1:
        _sign(headers, body, spec)
    reply, reply_headers = await svc._dispatch(spec, SUBJECT, body, headers)
    error = reply_headers.get(Header.ERROR.value)
    assert error != ErrorCode.INTERNAL.value, codec.decode(reply, ContentType(reply_headers[Header.CONTENT_TYPE]))


def one_input(data: bytes) -> None:
    _LOOP.run_until_complete(_dispatch(data))


def seeds() -> Iterator[bytes]:
    """Commands as the CLI sends them: signed msgpack and JSON requests of each command."""
    node = {"parent_id": "app1", "record": {"id": "web1", "name": "web", "placement": "dc1"}}
    bodies: list[tuple[int, Any]] = [
        (2, {"id": "app1", "state": "off"}),
        (4, {"saga_id": "s1", "reason": "fuzz"}),
        (5, node),
        (7, {"parent_id": "nd1", "id": "vna1"}),
        (3, {"plan": {"saga_id": "s1", "name": "n", "steps": [{"step_id": "a", "action": {"subject": "sf.cmd.x.y"}}]}}),
    ]
    for index, payload in bodies:
        for ctype in (ContentType.MSGPACK, ContentType.JSON):
            head = f"{Header.ACTOR}: alice\n{Header.CONTENT_TYPE}: {ctype.value}\n{Header.MSG_ID}: m{index}"
            yield bytes([1, index]) + head.encode() + b"\n\n" + codec.encode(payload, ctype)
    yield b"\x00\x00" + f"{Header.TIMESTAMP}: yesterday".encode() + b"\n\n" + b"\x81\xa1a\xc1"
