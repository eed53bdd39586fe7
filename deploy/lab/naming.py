"""Names of everything the lab creates, deterministic from the prefix and the spec.

Namespaces are ``<prefix>-<host id>``; interface names are short and only
unique inside their namespace (no lab link ever lives in the root namespace).
See ``README.md`` for the full table.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from deploy.lab.errors import LabSpecError

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")
IFNAMSIZ = 15

UNDERLAY_BRIDGE = "br-net"
EDGE_UPLINK = "inet0"
VNA_WAN = "wan"
VNA_TRUNK = "trunk"
WAN_LAN = "wan"
CLOUD_LAN = "vpc"
TRUNK_BRIDGE = "br-trunk"


def random_prefix() -> str:
    """A fresh prefix: ``sf`` and 4 random hex digits."""
    return "sf" + secrets.token_hex(2)


def prefix_for(key: str) -> str:
    """A stable prefix for a key (e.g. a spec file path): ``sf`` and 4 hex digits of its hash."""
    return "sf" + hashlib.sha256(key.encode()).hexdigest()[:4]


def check_prefix(prefix: str) -> str:
    """Validate a prefix: 2 to 8 chars, ``[a-z][a-z0-9]*``."""
    if not PREFIX_RE.match(prefix):
        raise LabSpecError(f"bad lab prefix {prefix!r}: want [a-z][a-z0-9]{{1,7}}", details={"prefix": prefix})
    return prefix


def check_ifname(name: str) -> str:
    """Validate a Linux interface name (at most 15 chars, no slash/space/colon)."""
    if not name or len(name) > IFNAMSIZ or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise LabSpecError(f"bad interface name {name!r}", details={"ifname": name})
    return name


def derived_mac(*parts: str) -> str:
    """A locally administered unicast MAC derived from ``parts`` (stable across runs and prefixes)."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def edge_host(site: str) -> str:
    """Host id of a site's edge router."""
    return f"{site}-edge"


def switch_host(site: str) -> str:
    """Host id of a site's switch namespace (the LAN bridges)."""
    return f"{site}-sw"


def lan_bridge(lan: str) -> str:
    """Bridge of a LAN inside its site's switch namespace."""
    return f"br-{lan}"


def host_port(host: str, index: int) -> str:
    """Switch-side port of NIC ``index`` of a server or VNA."""
    return f"{host}-{index}"


def edge_port(lan: str) -> str:
    """Switch-side port of the edge router's leg on ``lan``."""
    return f"rt-{lan}"


class Names:
    """Namespace names for one lab prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = check_prefix(prefix)

    def ns(self, host: str) -> str:
        """Namespace of a host id."""
        return f"{self.prefix}-{host}"

    def owns(self, ns: str) -> bool:
        """Whether a namespace name belongs to this lab."""
        return ns.startswith(self.prefix + "-")
