"""Sans-IO codec, envelope headers and nkey signatures, without a server."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import BaseModel

from bus import codec, signing, subjects
from bus.envelope import Envelope
from bus.errors import CodecError, ConcurrencyConflict, ErrorCode, ErrorReply, Unauthenticated, error_from_reply
from bus.subjects import ContentType, Header


class Sample(BaseModel):
    name: str
    when: dt.datetime
    tags: list[str]


def test_msgpack_and_json_round_trip() -> None:
    s = Sample(name="x", when=dt.datetime(2026, 1, 2, tzinfo=dt.UTC), tags=["a"])
    for ct in ContentType:
        data = codec.decode_mapping(codec.encode(s, ct), ct)
        assert Sample.model_validate(data) == s


@pytest.mark.parametrize("raw", [b"\xc1", b"\x92\x01", b"\xa3ab"])
def test_malformed_msgpack_is_a_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        codec.decode_mapping(raw)


def test_content_type_negotiation() -> None:
    assert codec.content_type_of(None) is ContentType.MSGPACK
    assert codec.content_type_of({"Content-Type": "application/json; charset=utf-8"}) is ContentType.JSON
    with pytest.raises(CodecError):
        codec.content_type_of({"Content-Type": "text/xml"})


def test_envelope_header_round_trip_and_bad_timestamp() -> None:
    env = Envelope(schema_name="skyferry.v1.X", actor="alice", correlation_id="c", causation_id="p")
    assert Envelope.from_headers(env.to_headers()) == env
    with pytest.raises(CodecError):
        Envelope.from_headers({Header.TIMESTAMP.value: "yesterday"})
    child = env.child("skyferry.v1.Y")
    assert (child.correlation_id, child.causation_id, child.actor) == ("c", env.msg_id, "alice")


def test_subject_tokens_refuse_wildcards() -> None:
    assert subjects.event("app", "web-1") == "sf.evt.app.web-1"
    for bad in ("a.b", "*", ">", "a b", ""):
        with pytest.raises(ValueError):
            subjects.event("app", bad)
    assert subjects.parse_event_subject("sf.evt.app.x") == ("app", "x")


def test_signature_binds_subject_body_and_actor() -> None:
    seed = signing.generate_user_seed()
    pub = signing.public_key_of(seed)
    env = signing.sign(seed, "sf.cmd.m.v", Envelope(schema_name="s", actor="alice"), b"body")
    signing.verify(pub, "sf.cmd.m.v", env, b"body")
    for subject, body, e in [
        ("sf.cmd.m.other", b"body", env),
        ("sf.cmd.m.v", b"other", env),
        ("sf.cmd.m.v", b"body", env.model_copy(update={"actor": "bob"})),
        ("sf.cmd.m.v", b"body", env.model_copy(update={"signature": None})),
        ("sf.cmd.m.v", b"body", env.model_copy(update={"signature": "!!notbase64"})),
    ]:
        with pytest.raises(Unauthenticated):
            signing.verify(pub, subject, e, body)
    with pytest.raises(Unauthenticated):
        signing.verify(signing.public_key_of(signing.generate_user_seed()), "sf.cmd.m.v", env, b"body")
    with pytest.raises(Unauthenticated):
        signing.decode_public_key(pub[:-1] + ("A" if pub[-1] != "A" else "B"))


async def test_freshness_window_and_nonces() -> None:
    store = signing.MemoryNonceStore()
    env = Envelope(schema_name="s")
    await signing.check_fresh(env, store)
    with pytest.raises(Unauthenticated, match="replayed"):
        await signing.check_fresh(env, store)
    old = Envelope(schema_name="s", timestamp=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    with pytest.raises(Unauthenticated, match="window"):
        await signing.check_fresh(old, store)


def test_error_replies_map_back_to_types() -> None:
    err = error_from_reply(ErrorReply(code=ErrorCode.CONFLICT, message="m", details={"a": 1}, retryable=True))
    assert isinstance(err, ConcurrencyConflict) and err.retryable and err.details == {"a": 1}
