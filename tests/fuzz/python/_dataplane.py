"""Deterministic data-plane fixtures for the harnesses: fixed identities and sessions, a counting sink.

Fixed keys and indexes make a seed (a real record sealed by the
implementation) open again in every fuzzing process, so the fuzzer starts
past the receiver-index and tag checks.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vna_agent.dataplane.handshake import SessionKeys
from vna_agent.dataplane.keys import Peer, PeerAllowList, StaticKeyPair
from vna_agent.dataplane.record import RecordSession
from vna_agent.dataplane.session import SecureChannel
from vna_agent.dataplane.stats import TunnelStats

INITIATOR_KEY = StaticKeyPair(X25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
RESPONDER_KEY = StaticKeyPair(X25519PrivateKey.from_private_bytes(bytes(range(33, 65))))
#: The receiver's session index (what pieces and records name) and the sender's.
RX_INDEX = 0x5EC0_0001
TX_INDEX = 0x5EC0_0002
_K1, _K2 = bytes([0xA1]) * 32, bytes([0xB2]) * 32
PEER_ADDR = ("192.0.2.10", 51820)
OTHER_ADDR = ("192.0.2.66", 40000)


def responder() -> SecureChannel:
    """A responder that allows :data:`INITIATOR_KEY`."""
    return SecureChannel(RESPONDER_KEY, PeerAllowList([Peer("initiator", INITIATOR_KEY.public)]), initiator=False)


def initiator() -> SecureChannel:
    """An initiator towards :data:`RESPONDER_KEY`."""
    return SecureChannel(INITIATOR_KEY, PeerAllowList(), remote=Peer("responder", RESPONDER_KEY.public), initiator=True)


def keyed_pair() -> tuple[SecureChannel, SecureChannel]:
    """(sender, receiver) channels sharing one fixed session (as after a handshake)."""
    tx, rx = initiator(), responder()
    tx._rotate(RecordSession(SessionKeys(_K1, _K2, TX_INDEX, RX_INDEX, True, RESPONDER_KEY.public)))
    rx._rotate(RecordSession(SessionKeys(_K2, _K1, RX_INDEX, TX_INDEX, False, INITIATOR_KEY.public)))
    return tx, rx


class CountingSink:
    """The tunnel side of a link: delivered payloads and the drop counters."""

    def __init__(self) -> None:
        self.stats = TunnelStats()
        self.delivered = 0
        self.delivered_bytes = 0

    def deliver(self, payload: memoryview, flags: int) -> None:
        self.delivered += 1
        self.delivered_bytes += len(payload)

    def pause_device(self) -> None:
        return None

    def resume_device(self) -> None:
        return None

    def fast_path(self, *args: object, **kwargs: object) -> None:
        return None

    def fast_path_ended(self) -> None:
        return None

    def accounted(self) -> int:
        """Every outcome a message can have that the tunnel counts."""
        st = self.stats
        return self.delivered + sum(st.drops.values()) + st.handshakes + st.handshakes_refused + st.handshakes_failed
