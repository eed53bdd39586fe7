"""Handshake messages from anyone: initiations to a responder, responses to an initiator.

Modes (first byte): 0 raw initiation, 1 raw response, 2/3 the same with a
valid mac1 recomputed over the body (what an attacker who knows the public
key can send), so the fuzzer gets past the cheap check into the DH/AEAD code.
Only :class:`HandshakeError` may come out.
"""

from __future__ import annotations

from collections.abc import Iterator

from vna_agent.dataplane import handshake as hs
from vna_agent.dataplane.errors import HandshakeError
from vna_agent.dataplane.session import SecureChannel

from ._dataplane import INITIATOR_KEY, RESPONDER_KEY, initiator, responder
from ._input import Reader

MAX_LEN = 512


def _with_mac1(body: bytes, size: int, receiver_static: bytes) -> bytes:
    body = body[: size - 16].ljust(size - 16, b"\0")
    return body + hs._mac1(receiver_static, body)


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte() % 4
    msg = r.rest()
    ch: SecureChannel
    if mode in (0, 2):
        ch = responder()
        if mode == 2:
            msg = _with_mac1(msg, hs.INITIATION_LEN, RESPONDER_KEY.public.raw)
    else:
        ch = initiator()
        ch.begin_handshake()  # a pending initiation the response may claim to answer
        if mode == 3:
            msg = _with_mac1(msg, hs.RESPONSE_LEN, INITIATOR_KEY.public.raw)
    try:
        reply = ch.handle_handshake(msg)
    except HandshakeError:
        return
    if mode in (0, 2):  # an accepted initiation is answered with a well-formed response
        assert reply is not None and len(reply) == hs.RESPONSE_LEN, reply
        assert ch.next is not None
    else:
        assert reply is None and ch.current is not None


def seeds() -> Iterator[bytes]:
    """A real initiation and a real response (and their bodies for the mac1-fixing modes)."""
    ini, resp = initiator(), responder()
    init_msg = ini.begin_handshake()
    reply = resp.handle_handshake(init_msg)
    assert reply is not None
    yield b"\x00" + init_msg
    yield b"\x01" + reply
    yield b"\x02" + init_msg[:-16]
    yield b"\x03" + reply[:-16]
    yield b"\x00\x01"
