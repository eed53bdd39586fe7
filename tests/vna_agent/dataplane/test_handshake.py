"""Sans-IO handshake: success, refusals, replay protection, key agreement."""

from __future__ import annotations

import pytest

from vna_agent.dataplane import handshake as hs
from vna_agent.dataplane.errors import HandshakeAuthError, ReplayedInitiation, UnknownPeer
from vna_agent.dataplane.keys import Peer, PeerAllowList, StaticKeyPair, generate_psk
from vna_agent.dataplane.session import SecureChannel


def _pair() -> tuple[StaticKeyPair, StaticKeyPair]:
    return StaticKeyPair.generate(), StaticKeyPair.generate()


def test_full_handshake_agrees_on_crossed_keys() -> None:
    ini, resp = _pair()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=7, timestamp=hs.tai64n(1))
    assert len(msg) == hs.INITIATION_LEN == 132
    received = hs.consume_initiation(resp, msg)
    assert received.initiator_static == ini.public
    assert received.sender_index == 7
    reply, rkeys = hs.create_response(received, sender_index=9)
    assert len(reply) == hs.RESPONSE_LEN == 76
    ikeys = hs.consume_response(state, reply)
    assert ikeys.send_key == rkeys.recv_key and ikeys.recv_key == rkeys.send_key
    assert ikeys.send_key != ikeys.recv_key
    assert (ikeys.local_index, ikeys.remote_index) == (7, 9)
    assert (rkeys.local_index, rkeys.remote_index) == (9, 7)
    assert ikeys.initiator and not rkeys.initiator


def test_psk_must_match() -> None:
    ini, resp = _pair()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=1, timestamp=hs.tai64n(1), psk=generate_psk())
    reply, _ = hs.create_response(hs.consume_initiation(resp, msg), sender_index=2, psk=generate_psk())
    with pytest.raises(HandshakeAuthError):
        hs.consume_response(state, reply)


def test_initiation_for_another_responder_fails_mac1() -> None:
    ini, resp = _pair()
    other = StaticKeyPair.generate()
    msg, _ = hs.create_initiation(ini, resp.public, sender_index=1, timestamp=hs.tai64n(1))
    with pytest.raises(HandshakeAuthError, match="mac1"):
        hs.consume_initiation(other, msg)


def test_responder_without_the_static_private_key_cannot_answer() -> None:
    """A responder impersonator (right public key, wrong private) is detected by the initiator."""
    ini, resp = _pair()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=1, timestamp=hs.tai64n(1))
    impostor = StaticKeyPair.generate()
    # the impostor passes mac1 (it is public-key based) but cannot open the static field
    forged = bytearray(msg)
    forged[-16:] = hs._mac1(impostor.public.raw, bytes(msg[:-16]))
    with pytest.raises(HandshakeAuthError):
        hs.consume_initiation(impostor, bytes(forged))
    assert state.remote_static == resp.public


def test_tampered_initiation_and_response_are_refused() -> None:
    ini, resp = _pair()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=1, timestamp=hs.tai64n(1))
    bad = bytearray(msg)
    bad[20] ^= 1
    with pytest.raises(HandshakeAuthError):
        hs.consume_initiation(resp, bytes(bad))
    reply, _ = hs.create_response(hs.consume_initiation(resp, msg), sender_index=2)
    bad = bytearray(reply)
    bad[-20] ^= 1
    with pytest.raises(HandshakeAuthError):
        hs.consume_response(state, bytes(bad))
    with pytest.raises(HandshakeAuthError):
        hs.consume_initiation(resp, msg[:-1])


def _channels(*, allowed: bool = True) -> tuple[SecureChannel, SecureChannel, StaticKeyPair, StaticKeyPair]:
    ini, resp = _pair()
    allow = PeerAllowList([Peer("ini", ini.public)] if allowed else [Peer("x", StaticKeyPair.generate().public)])
    c_ini = SecureChannel(ini, PeerAllowList(), remote=Peer("resp", resp.public), initiator=True)
    c_resp = SecureChannel(resp, allow, initiator=False)
    return c_ini, c_resp, ini, resp


def test_wrong_static_key_is_refused() -> None:
    c_ini, c_resp, _, _ = _channels(allowed=False)
    with pytest.raises(UnknownPeer):
        c_resp.handle_handshake(c_ini.begin_handshake())
    assert not c_resp.ready and c_resp.next is None


def test_replayed_initiation_is_refused() -> None:
    c_ini, c_resp, _, _ = _channels()
    first = c_ini.begin_handshake()
    assert c_resp.handle_handshake(first) is not None
    with pytest.raises(ReplayedInitiation):
        c_resp.handle_handshake(first)
    # a later initiation is fine
    assert c_resp.handle_handshake(c_ini.begin_handshake()) is not None


def test_older_timestamp_is_refused_even_if_never_seen() -> None:
    ini, _ = _pair()
    guard = hs.TimestampGuard()
    guard.accept(ini.public, hs.tai64n(2_000_000_000))
    with pytest.raises(ReplayedInitiation):
        guard.accept(ini.public, hs.tai64n(1_999_999_999))


def test_timestamps_strictly_increase_with_a_stalled_clock() -> None:
    ini, resp = _pair()
    c_ini = SecureChannel(ini, PeerAllowList(), remote=Peer("r", resp.public), initiator=True, wall_clock=lambda: 5)
    c_resp = SecureChannel(resp, PeerAllowList([Peer("i", ini.public)]), initiator=False)
    for _ in range(3):
        assert c_resp.handle_handshake(c_ini.begin_handshake()) is not None


def test_response_to_a_superseded_initiation_is_refused() -> None:
    c_ini, c_resp, _, _ = _channels()
    reply_old = c_resp.handle_handshake(c_ini.begin_handshake())
    c_ini.begin_handshake()  # retransmission replaces the pending state
    assert reply_old is not None
    with pytest.raises(HandshakeAuthError):
        c_ini.handle_handshake(reply_old)


def test_roles_are_enforced() -> None:
    c_ini, c_resp, _, _ = _channels()
    init = c_ini.begin_handshake()
    with pytest.raises(HandshakeAuthError):
        c_ini.handle_handshake(init)  # initiators do not answer initiations
    reply = c_resp.handle_handshake(init)
    assert reply is not None
    with pytest.raises(HandshakeAuthError):
        c_resp.handle_handshake(reply)
