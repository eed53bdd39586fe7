"""Sans-IO record layer: nonces, tags, replay window, plain records."""

from __future__ import annotations

import os

import pytest

from vna_agent.dataplane import handshake as hs
from vna_agent.dataplane.errors import BadTag, DecodeError, NonceExhausted, RecordTooBig, ReplayedRecord
from vna_agent.dataplane.keys import StaticKeyPair
from vna_agent.dataplane.plain import PlainChannel
from vna_agent.dataplane.record import RecordSession, ReplayWindow
from vna_agent.dataplane.wire import FLAG_VNET, MAX_PAYLOAD, MAX_RECORD, RECORD_HEADER, MsgType


def _sessions(limit: int | None = None) -> tuple[RecordSession, RecordSession]:
    ini, resp = StaticKeyPair.generate(), StaticKeyPair.generate()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=11, timestamp=hs.tai64n(1))
    reply, rkeys = hs.create_response(hs.consume_initiation(resp, msg), sender_index=22)
    ikeys = hs.consume_response(state, reply)
    kw = {} if limit is None else {"limit": limit}
    return RecordSession(ikeys, **kw), RecordSession(rkeys, **kw)


def _seal(s: RecordSession, payload: bytes, flags: int = 0) -> bytes:
    out = bytearray(MAX_RECORD)
    n = s.seal_into(payload, flags, memoryview(out))
    return bytes(out[:n])


def _open(s: RecordSession, rec: bytes) -> bytes:
    counter = RECORD_HEADER.unpack_from(rec)[4]
    return bytes(s.open(counter, memoryview(rec)))


def test_round_trip_both_directions_and_header() -> None:
    a, b = _sessions()
    data = os.urandom(1500)
    rec = _seal(a, data, FLAG_VNET)
    typ, flags, _, receiver, counter = RECORD_HEADER.unpack_from(rec)
    assert (typ, flags, receiver, counter) == (MsgType.DATA, FLAG_VNET, 22, 0)
    assert len(rec) == 16 + 1500 + 16
    assert data not in rec
    assert _open(b, rec) == data
    assert _open(a, _seal(b, b"pong")) == b"pong"
    assert _open(b, _seal(a, b"")) == b""  # keepalive


def test_nonce_counter_increments_and_never_repeats() -> None:
    a, _ = _sessions()
    counters = [RECORD_HEADER.unpack_from(_seal(a, b"x"))[4] for _ in range(5)]
    assert counters == [0, 1, 2, 3, 4]
    assert a.next_counter == 5


def test_refuses_to_send_past_the_limit() -> None:
    a, b = _sessions(limit=3)
    for _ in range(3):
        _open(b, _seal(a, b"x"))
    with pytest.raises(NonceExhausted):
        _seal(a, b"x")
    assert a.next_counter == 3


def test_altered_record_rejected_by_tag() -> None:
    a, b = _sessions()
    rec = bytearray(_seal(a, b"hello world"))
    for pos in (1, 20, len(rec) - 1):  # flags (AD), ciphertext, tag
        bad = bytearray(rec)
        bad[pos] ^= 0x40
        with pytest.raises(BadTag):
            _open(b, bytes(bad))
    assert _open(b, bytes(rec)) == b"hello world"  # the failures did not burn the counter


def test_wrong_keys_rejected() -> None:
    a, _ = _sessions()
    _, other = _sessions()
    with pytest.raises(BadTag):
        _open(other, _seal(a, b"x"))


def test_replayed_record_rejected() -> None:
    a, b = _sessions()
    rec = _seal(a, b"once")
    _open(b, rec)
    with pytest.raises(ReplayedRecord):
        _open(b, rec)


def test_out_of_order_within_window_accepted_once() -> None:
    a, b = _sessions()
    recs = [_seal(a, bytes([i])) for i in range(10)]
    for i in (3, 0, 9, 1, 2, 8, 4, 5, 7, 6):
        assert _open(b, recs[i]) == bytes([i])
    for r in recs:
        with pytest.raises(ReplayedRecord):
            _open(b, r)


def test_replay_window_edges() -> None:
    w = ReplayWindow(2048)
    w.accept(0)
    w.accept(5000)
    with pytest.raises(ReplayedRecord):
        w.accept(5000 - 2048)  # just outside the window
    w.accept(5000 - 2047)  # oldest slot still inside
    with pytest.raises(ReplayedRecord):
        w.accept(5000 - 2047)
    w.check(4999)
    w.accept(4999)
    with pytest.raises(ReplayedRecord):
        w.check(4999)
    w.accept(10_000)  # a jump larger than the window clears it
    with pytest.raises(ReplayedRecord):
        w.accept(5000)
    w.accept(9999)


def test_size_limits() -> None:
    a, b = _sessions()
    with pytest.raises(RecordTooBig):
        _seal(a, bytes(MAX_PAYLOAD + 1))
    big = os.urandom(MAX_PAYLOAD)
    assert _open(b, _seal(a, big)) == big
    with pytest.raises(DecodeError):
        b.open(0, memoryview(b"\x04" * 20))


def test_plain_channel_same_framing_no_tag() -> None:
    p = PlainChannel()
    out = bytearray(64)
    n = p.seal_into(b"frame", FLAG_VNET, memoryview(out))
    assert n == 16 + 5
    typ, flags, _, receiver, counter = RECORD_HEADER.unpack_from(out)
    assert (typ, flags, receiver, counter) == (MsgType.PLAIN, FLAG_VNET, 0, 0)
    payload, fl = PlainChannel().open(memoryview(out)[:n])
    assert (bytes(payload), fl) == (b"frame", FLAG_VNET)
    with pytest.raises(DecodeError):
        p.open(memoryview(b"\x04" + bytes(20)))


def test_fallback_without_encrypt_into(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older cryptography (no encrypt_into/decrypt_into) produces the same records."""
    from vna_agent.dataplane import record

    a, b = _sessions()
    fast = _seal(a, b"same bytes")
    monkeypatch.setattr(record, "_HAS_INTO", False)
    a.next_counter = 0
    assert _seal(a, b"same bytes") == fast
    assert _open(b, fast) == b"same bytes"
