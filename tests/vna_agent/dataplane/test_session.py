"""Sans-IO secure channel: confirmation, rekey triggers, old session kept briefly, expiry."""

from __future__ import annotations

import pytest

from vna_agent.dataplane.errors import NoSession
from vna_agent.dataplane.keys import Peer, PeerAllowList, StaticKeyPair
from vna_agent.dataplane.session import RekeyPolicy, SecureChannel
from vna_agent.dataplane.wire import MAX_RECORD


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _pair(policy: RekeyPolicy, clock: FakeClock) -> tuple[SecureChannel, SecureChannel]:
    ki, kr = StaticKeyPair.generate(), StaticKeyPair.generate()
    ini = SecureChannel(ki, PeerAllowList(), remote=Peer("r", kr.public), initiator=True, policy=policy, clock=clock)
    resp = SecureChannel(kr, PeerAllowList([Peer("i", ki.public)]), initiator=False, policy=policy, clock=clock)
    return ini, resp


def _handshake(ini: SecureChannel, resp: SecureChannel) -> None:
    reply = resp.handle_handshake(ini.begin_handshake())
    assert reply is not None
    assert ini.handle_handshake(reply) is None


def _seal(ch: SecureChannel, data: bytes) -> bytes:
    out = bytearray(MAX_RECORD)
    return bytes(out[: ch.seal_into(data, 0, memoryview(out))])


def _open(ch: SecureChannel, rec: bytes) -> bytes:
    payload, _ = ch.open(memoryview(rec))
    return bytes(payload)


def test_responder_waits_for_confirmation() -> None:
    clock = FakeClock()
    ini, resp = _pair(RekeyPolicy(), clock)
    assert ini.wants_handshake()
    _handshake(ini, resp)
    assert ini.ready and not resp.ready and resp.next is not None
    with pytest.raises(NoSession):
        _seal(resp, b"too early")
    assert _open(resp, _seal(ini, b"")) == b""  # the initiator's keepalive confirms
    assert resp.ready and resp.next is None
    assert _open(ini, _seal(resp, b"hi")) == b"hi"
    assert not ini.wants_handshake()
    assert ini.handshakes == resp.handshakes == 1


def test_rekey_after_time_keeps_old_session_for_in_flight_records() -> None:
    clock = FakeClock()
    pol = RekeyPolicy(rekey_after_time=120, reject_after_time=180, previous_grace=10)
    ini, resp = _pair(pol, clock)
    _handshake(ini, resp)
    _open(resp, _seal(ini, b""))
    old_index = ini.current.local_index if ini.current else None
    clock.t += 119
    assert not ini.wants_handshake()
    clock.t += 1
    assert ini.wants_handshake()
    in_flight = _seal(resp, b"sent under the old keys")
    in_flight_up = _seal(ini, b"old keys, other way")
    _handshake(ini, resp)
    assert ini.current is not None and ini.current.local_index != old_index
    assert ini.previous is not None
    # responder still sends on the old session until confirmed
    late = _seal(resp, b"still old")
    assert _open(ini, in_flight) == b"sent under the old keys"
    assert _open(ini, late) == b"still old"
    assert _open(resp, _seal(ini, b"new keys")) == b"new keys"  # confirms; responder rotates
    assert _open(resp, in_flight_up) == b"old keys, other way"  # responder kept its previous too
    assert _open(ini, _seal(resp, b"new both ways")) == b"new both ways"
    assert not ini.wants_handshake()
    clock.t += 10
    ini.expire()
    resp.expire()
    assert ini.previous is None and resp.previous is None
    with pytest.raises(NoSession):  # its receiver index is gone with the old session
        _open(ini, late)


@pytest.mark.parametrize(
    ("policy", "send"),
    [
        (RekeyPolicy(rekey_after_bytes=1000), [b"x" * 600, b"x" * 600]),
        (RekeyPolicy(rekey_after_records=3), [b"a", b"b", b"c"]),
    ],
)
def test_rekey_after_bytes_or_records_either_direction(policy: RekeyPolicy, send: list[bytes]) -> None:
    for direction in ("out", "in"):
        clock = FakeClock()
        ini, resp = _pair(policy, clock)
        _handshake(ini, resp)
        _open(resp, _seal(ini, b""))
        assert not ini.wants_handshake()
        for data in send:
            if direction == "out":
                _open(resp, _seal(ini, data))
            else:
                _open(ini, _seal(resp, data))
        assert ini.wants_handshake(), direction


def test_rekey_before_counter_limit() -> None:
    clock = FakeClock()
    ini, resp = _pair(RekeyPolicy(counter_limit=32), clock)
    _handshake(ini, resp)
    for _ in range(29):
        _seal(ini, b"x")
    assert not ini.wants_handshake()
    _seal(ini, b"x")
    assert ini.wants_handshake()  # 30 >= 32 - 32/16


def test_reject_after_time_stops_using_the_session() -> None:
    clock = FakeClock()
    ini, resp = _pair(RekeyPolicy(rekey_after_time=120, reject_after_time=180), clock)
    _handshake(ini, resp)
    _open(resp, _seal(ini, b""))
    clock.t += 180
    ini.expire()
    resp.expire()
    assert not ini.ready and not resp.ready
    with pytest.raises(NoSession):
        _seal(ini, b"x")


def test_unanswered_initiation_is_retried_after_timeout() -> None:
    clock = FakeClock()
    ini, _ = _pair(RekeyPolicy(rekey_timeout=5), clock)
    ini.begin_handshake()
    assert not ini.wants_handshake() and not ini.handshake_overdue()
    clock.t += 5
    assert ini.handshake_overdue() and ini.wants_handshake()


def test_reconnect_forgets_established_sessions() -> None:
    clock = FakeClock()
    ini, resp = _pair(RekeyPolicy(), clock)
    _handshake(ini, resp)
    _open(resp, _seal(ini, b""))
    ini.reset()  # client reconnected: new handshake on a new connection
    reply = resp.handle_handshake(ini.begin_handshake())
    resp.forget_established()
    assert not resp.ready and resp.next is not None
    assert reply is not None
    ini.handle_handshake(reply)
    assert _open(resp, _seal(ini, b"x")) == b"x"
    assert resp.ready
