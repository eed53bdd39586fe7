"""User accounts: identity, credentials, groups, authorisations and defaults."""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from typing import Annotated

import nkeys
from pydantic import AfterValidator, Field, PlainSerializer, StringConstraints

from bus.models.common import Credentials, Id, Record, in_declaration_order, require_unique

__all__ = ["Authorisation", "NkeyUserPublicKey", "UserAccount", "UserDefaults"]


class Authorisation(StrEnum):
    """A system feature a user is allowed to use."""

    ADMIN = "admin"
    NETWORK_READ = "network-read"
    NETWORK_WRITE = "network-write"
    APPLICATION_READ = "application-read"
    APPLICATION_WRITE = "application-write"
    USER_ADMIN = "user-admin"
    SAGA_OPERATE = "saga-operate"


def _check_nkey_user(value: str) -> str:
    # nkeys offers no public-key check, so decode as nkeys encodes: prefix byte, 32 key bytes, CRC16.
    try:
        raw = base64.b32decode(value)
    except binascii.Error:
        raise ValueError("public key is not valid base32") from None
    if raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError("public key is not an nkeys user key")
    checksum = int(nkeys.crc16(bytearray(raw[:-2])))
    if checksum.to_bytes(2, "little") != raw[-2:]:
        raise ValueError("public key checksum does not match")
    return value


NkeyUserPublicKey = Annotated[
    str,
    StringConstraints(pattern=r"^U[A-Z2-7]{55}$"),
    AfterValidator(_check_nkey_user),
]


class UserDefaults(Record):
    """Per-user defaults used when a request does not say otherwise."""

    image_library: Id | None = None
    resource_domain: Id | None = None


def _unique_groups(groups: list[str]) -> list[str]:
    require_unique(groups, "group")
    return groups


class UserAccount(Record):
    """An authorised user; the id is the user name."""

    id: Id
    display_name: Annotated[str, Field(max_length=128)] = ""
    public_key: NkeyUserPublicKey | None = None
    groups: Annotated[list[Id], AfterValidator(_unique_groups)] = []
    authorisations: Annotated[
        set[Authorisation],
        PlainSerializer(in_declaration_order, return_type=list[Authorisation], when_used="json"),
    ] = set()
    defaults: UserDefaults = UserDefaults()
    disabled: bool = False
    credentials: Credentials | None = None
