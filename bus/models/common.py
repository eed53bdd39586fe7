"""Shared field types, validators and base records of the Skyferry data model."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Hashable, Iterable, Set
from enum import StrEnum
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    IPvAnyAddress,
    IPvAnyNetwork,
    PlainSerializer,
    SecretStr,
    StringConstraints,
    field_serializer,
    field_validator,
)

from bus.errors import ErrorCode, SkyferryError

__all__ = [
    "ALLOWED_URI_SCHEMES",
    "ID_PATTERN",
    "SECRET_MASK",
    "AccessControlEntry",
    "AccessControls",
    "Cidr",
    "Credentials",
    "CronSchedule",
    "Description",
    "Id",
    "IpAddress",
    "MacAddress",
    "ModelError",
    "Name",
    "Priority",
    "Record",
    "Right",
    "Status",
    "StatusLevel",
    "Timestamp",
    "UnicastMacAddress",
    "Uri",
    "VlanId",
    "find_duplicates",
    "in_declaration_order",
    "require_unique",
]

T = TypeVar("T", bound=Hashable)


class ModelError(SkyferryError, ValueError):
    """Base class of every error raised by the data model and map import/export.

    A :class:`~bus.errors.SkyferryError` (code ``validation``) so that bad user input
    is a typed error everywhere, and a ``ValueError`` so that pydantic validators
    may raise it and report it as a validation error.
    """

    code = ErrorCode.VALIDATION

    def __str__(self) -> str:
        return self.message


# Ids double as NATS subject tokens (sf.evt.<aggregate>.<id>), hence no '.', '*', '>' or spaces.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Description = Annotated[str, StringConstraints(max_length=4096)]
VlanId = Annotated[int, Field(ge=1, le=4094)]
Priority = Annotated[int, Field(ge=0, le=1000)]
# Naive datetimes are ambiguous between data centers in different time zones.
Timestamp = AwareDatetime


# --- MAC addresses -------------------------------------------------------------------------------

_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")


def _normalise_mac(value: str) -> str:
    if not _MAC_RE.match(value):
        raise ValueError(f"{value!r} is not a MAC address (expected six hex octets such as 52:54:00:12:34:56)")
    return value.replace("-", ":").lower()


def _require_unicast(value: str) -> str:
    if int(value[:2], 16) & 0x01:
        raise ValueError(f"{value} is a multicast MAC address; a server interface needs a unicast one")
    return value


MacAddress = Annotated[str, AfterValidator(_normalise_mac), Field(examples=["52:54:00:12:34:56"])]
UnicastMacAddress = Annotated[MacAddress, AfterValidator(_require_unicast)]


# --- IP addresses and networks -------------------------------------------------------------------

IpAddress = IPvAnyAddress


def _reject_host_bits(value: Any) -> Any:
    # pydantic's own message for 10.1.1.5/24 is "not a valid network", which hides the real mistake.
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                return value
            raise ValueError(f"{value} has host bits set; did you mean {loose}?") from None
    return value


# Host bits are an error rather than silently masked: a typo in a subnet must not move a network.
Cidr = Annotated[IPvAnyNetwork, BeforeValidator(_reject_host_bits)]


# --- URIs ----------------------------------------------------------------------------------------

ALLOWED_URI_SCHEMES = frozenset({"nats", "https", "tcp", "udp", "ssh", "s3", "file"})
_URI_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f]")


def _check_uri(value: str) -> str:
    if _URI_FORBIDDEN.search(value):
        raise ValueError("URI must not contain whitespace or control characters")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_URI_SCHEMES:
        allowed = ", ".join(sorted(ALLOWED_URI_SCHEMES))
        raise ValueError(f"URI scheme {parts.scheme!r} is not one of {allowed}")
    if not value[len(parts.scheme) :].startswith("://"):
        raise ValueError(f"URI must have the form {scheme}://...")
    if scheme == "file":
        if not parts.path:
            raise ValueError("file URI needs a path")
    elif not parts.hostname:
        raise ValueError(f"{scheme} URI needs a host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"URI has an invalid port: {exc}") from None
    return value


# A plain str (not AnyUrl) so that the exported text is exactly the imported text.
Uri = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(_check_uri),
    Field(examples=["nats://vna1.example.net:4222", "s3://images/lib1"]),
]


# --- Cron schedules ------------------------------------------------------------------------------

_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
# (label, lowest, highest, names mapped to lowest + index)
_CRON_FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
]
_CRON_ITEM = re.compile(r"^(?P<range>\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(?P<step>[0-9]+))?$")


def _cron_value(token: str, label: str, low: int, high: int, names: list[str]) -> int:
    if token.upper() in names:
        return low + names.index(token.upper())
    if not token.isdigit():
        raise ValueError(f"cron {label} value {token!r} is not a number")
    number = int(token)
    if not low <= number <= high:
        raise ValueError(f"cron {label} value {number} is outside {low}-{high}")
    return number


def _check_cron(value: str) -> str:
    fields = value.split()
    if len(fields) != 5:
        raise ValueError(f"cron schedule needs 5 fields (minute hour day month weekday), got {len(fields)}")
    for field, (label, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in field.split(","):
            match = _CRON_ITEM.match(item)
            if not match:
                raise ValueError(f"cron {label} field {field!r} is malformed")
            step = match.group("step")
            if step is not None and int(step) == 0:
                raise ValueError(f"cron {label} step must be positive")
            if match.group("range") == "*":
                continue
            first, _, last = match.group("range").partition("-")
            start = _cron_value(first, label, low, high, names)
            if last and _cron_value(last, label, low, high, names) < start:
                raise ValueError(f"cron {label} range {match.group('range')!r} is reversed")
    return value


CronSchedule = Annotated[
    str, StringConstraints(max_length=256), AfterValidator(_check_cron), Field(examples=["30 2 * * 1-5"])
]


# --- Records -------------------------------------------------------------------------------------


class Record(BaseModel):
    """Base of every map record: unknown fields are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class Right(StrEnum):
    """A right an access-control entry grants on a resource."""

    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    CONTROL = "control"


def in_declaration_order(values: Set[StrEnum]) -> list[StrEnum]:
    """Enum members sorted as declared: sets have no stable order, exports must be byte-stable."""
    return sorted(values, key=lambda member: list(type(member).__members__.values()).index(member))


PRINCIPAL_PATTERN = r"^(?:(?:user|group):[A-Za-z0-9][A-Za-z0-9_-]{0,63}|\*)$"


class AccessControlEntry(Record):
    """Grants a user ("user:<id>"), a group ("group:<id>") or everyone ("*") a set of rights."""

    principal: Annotated[str, StringConstraints(pattern=PRINCIPAL_PATTERN)]
    rights: Annotated[
        set[Right],
        Field(min_length=1),
        PlainSerializer(in_declaration_order, return_type=list[Right], when_used="json"),
    ]


def _unique_principals(entries: list[AccessControlEntry]) -> list[AccessControlEntry]:
    require_unique((entry.principal for entry in entries), "access control principal")
    return entries


AccessControls = Annotated[list[AccessControlEntry], AfterValidator(_unique_principals)]

SECRET_MASK = "**********"


class Credentials(Record):
    """Credentials for administering a VNA, an infrastructure API or an image store.

    The secret is exported as SECRET_MASK unless the serialisation context has
    ``include_secrets=True``; importing the mask yields ``secret=None``.
    """

    username: str | None = None
    secret: SecretStr | None = None
    key_ref: str | None = None

    @field_validator("secret", mode="before")
    @classmethod
    def _masked_is_absent(cls, value: Any) -> Any:
        return None if value == SECRET_MASK else value

    @field_serializer("secret", when_used="json")
    def _export_secret(self, secret: SecretStr | None, info: FieldSerializationInfo) -> str | None:
        if secret is None:
            return None
        context = info.context if isinstance(info.context, dict) else {}
        return secret.get_secret_value() if context.get("include_secrets") else SECRET_MASK


class StatusLevel(StrEnum):
    """Health of an application or component."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


class Status(Record):
    """Health level plus optional detail for warnings and errors."""

    level: StatusLevel = StatusLevel.OK
    detail: str = ""


# --- Uniqueness helpers --------------------------------------------------------------------------


def find_duplicates(values: Iterable[T]) -> list[T]:
    """Values that occur more than once, in order of their second occurrence."""
    seen: set[T] = set()
    duplicates: list[T] = []
    for value in values:
        if value in seen and value not in duplicates:
            duplicates.append(value)
        seen.add(value)
    return duplicates


def require_unique(values: Iterable[Hashable], what: str) -> None:
    """Raise ValueError naming every duplicated value."""
    duplicates = find_duplicates(values)
    if duplicates:
        shown = ", ".join(repr(str(value)) for value in duplicates)
        raise ValueError(f"duplicate {what}: {shown}")
