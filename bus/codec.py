"""Sans-IO codec: payload bytes <-> Python values, msgpack by default, JSON on request.

Nothing here touches the network, so it is tested without a server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any

import msgpack
from pydantic import BaseModel, SecretStr

from bus.errors import CodecError
from bus.subjects import ContentType, Header


def _default(value: Any) -> Any:
    # msgpack and json both need these flattened to plain text.
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, ipaddress._BaseAddress | ipaddress._BaseNetwork | uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, SecretStr):
        return "**********"
    raise TypeError(f"cannot encode {type(value).__name__}")


def content_type_of(headers: Mapping[str, str] | None) -> ContentType:
    """The payload encoding a message declares; msgpack when it says nothing."""
    raw = (headers or {}).get(Header.CONTENT_TYPE, ContentType.MSGPACK)
    base = raw.split(";", 1)[0].strip().lower()
    if base in ("json", "application/json", "text/json"):
        return ContentType.JSON
    if base in ("msgpack", "application/msgpack", "application/x-msgpack", ""):
        return ContentType.MSGPACK
    raise CodecError(f"unsupported content type {raw!r}", details={"content_type": raw})


def encode(value: Any, content_type: ContentType = ContentType.MSGPACK) -> bytes:
    """Encode a model or plain value for the wire."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        if content_type is ContentType.JSON:
            return json.dumps(value, default=_default, separators=(",", ":")).encode()
        return msgpack.packb(value, default=_default, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload: {exc}") from exc


def decode(data: bytes, content_type: ContentType = ContentType.MSGPACK) -> Any:
    """Decode wire bytes; malformed input raises :class:`CodecError`."""
    if not data:
        return {}
    try:
        if content_type is ContentType.JSON:
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData, UnicodeDecodeError) as exc:
        raise CodecError(
            f"malformed {content_type.value} payload: {exc}", details={"content_type": content_type.value}
        ) from exc
    except Exception as exc:  # msgpack raises a few odd types on garbage input
        raise CodecError(f"malformed {content_type.value} payload: {exc}") from exc


def decode_mapping(data: bytes, content_type: ContentType = ContentType.MSGPACK) -> dict[str, Any]:
    """Decode and insist on a mapping at the top level."""
    value = decode(data, content_type)
    if not isinstance(value, dict):
        raise CodecError(f"payload must be a map, got {type(value).__name__}")
    return value
