"""Network map records: overlay networks and the network domains that implement them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator

from bus.models.common import (
    AccessControls,
    Credentials,
    Description,
    Id,
    IpAddress,
    Name,
    Record,
    Uri,
    VlanId,
    require_unique,
)

__all__ = [
    "VNA",
    "LocalOverlayNetwork",
    "NetworkDomain",
    "NetworkMap",
    "OptimisationPolicy",
    "OverlayNetwork",
    "ResourceDomain",
    "ResourceKind",
    "ResourceVendor",
    "TunnelMode",
    "VnaState",
    "VnaType",
]


class OptimisationPolicy(StrEnum):
    """Policy the VNM uses to choose the topology linking the VNAs of an overlay."""

    BALANCED = "balanced"
    MIN_LATENCY = "min-latency"
    MAX_THROUGHPUT = "max-throughput"
    MIN_COST = "min-cost"


class OverlayNetwork(Record):
    """A layer-2 network that spans network domains (e.g. OVNET 10)."""

    id: Id
    name: Name
    description: Description = ""
    vni: Annotated[int, Field(ge=1, le=16_777_215)] | None = None
    optimisation_policy: OptimisationPolicy = OptimisationPolicy.BALANCED
    access_controls: AccessControls = []


class VnaType(StrEnum):
    """How a VNA is implemented."""

    VNA = "vna"
    HYPERVISOR_SWITCH = "hypervisor-switch"
    CLOUD_GATEWAY = "cloud-gateway"


class VnaState(StrEnum):
    """Life-cycle state of a VNA."""

    PLANNED = "planned"
    DEPLOYING = "deploying"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    DECOMMISSIONED = "decommissioned"


class VNA(Record):
    """A virtual network appliance deployed in a network domain.

    It has no access controls of its own: the domain's apply.
    """

    id: Id
    type: VnaType = VnaType.VNA
    state: VnaState = VnaState.PLANNED
    external_address: IpAddress | None = None
    api_uri: Uri | None = None
    credentials: Credentials | None = None


class ResourceVendor(StrEnum):
    """Vendor / driver of a pool of server resources."""

    LAB = "lab"
    PHYSICAL = "physical"
    LIBVIRT = "libvirt"
    VMWARE = "vmware"
    OPENSTACK = "openstack"
    AWS = "aws"
    AZURE = "azure"
    GCP = "gcp"


class ResourceKind(StrEnum):
    """Kind of infrastructure behind a resource domain."""

    PRIVATE_DC = "private-dc"
    PUBLIC_CLOUD = "public-cloud"
    HYPERVISOR = "hypervisor"
    PHYSICAL = "physical"


class ResourceDomain(Record):
    """A pool of server resources managed through one API."""

    id: Id
    name: Name
    vendor: ResourceVendor
    kind: ResourceKind
    api_uri: Uri | None = None
    credentials: Credentials | None = None
    vendor_attributes: dict[str, str] = {}
    access_controls: AccessControls = []


class TunnelMode(StrEnum):
    """How tunnel segments of a local overlay network carry frames."""

    STREAM = "stream"
    DATAGRAM = "datagram"
    VXLAN = "vxlan"
    PLAIN = "plain"


def _unique_vlans(vlans: list[int]) -> list[int]:
    require_unique(vlans, "VLAN id")
    return vlans


def _unique_uris(uris: list[str]) -> list[str]:
    require_unique(uris, "peer URI")
    return uris


class LocalOverlayNetwork(Record):
    """How one overlay network is implemented inside a network domain."""

    overlay_id: Id
    vlan_ids: Annotated[list[VlanId], AfterValidator(_unique_vlans)] = []
    provide_tunnel_server: bool = False
    peer_uris: Annotated[list[Uri], AfterValidator(_unique_uris)] = []
    tunnel_mode: TunnelMode = TunnelMode.STREAM
    # Untrusted is the safe default: tunnel traffic is then authenticated and encrypted.
    trusted: bool = False


class NetworkDomain(Record):
    """An isolated network environment (data center, cloud region) with its VNAs and resources."""

    id: Id
    name: Name
    description: Description = ""
    access_controls: AccessControls = []
    vnas: list[VNA] = []
    resource_domains: list[ResourceDomain] = []
    local_overlay_networks: list[LocalOverlayNetwork] = []

    @model_validator(mode="after")
    def _check_unique(self) -> Self:
        require_unique((vna.id for vna in self.vnas), f"VNA id in domain {self.id!r}")
        require_unique((rd.id for rd in self.resource_domains), f"resource domain id in domain {self.id!r}")
        require_unique((rd.name for rd in self.resource_domains), f"resource domain name in domain {self.id!r}")
        require_unique(
            (lon.overlay_id for lon in self.local_overlay_networks),
            f"local overlay network for overlay in domain {self.id!r}",
        )
        # A VLAN joined to two overlays would bridge them together.
        require_unique(
            (vlan for lon in self.local_overlay_networks for vlan in lon.vlan_ids),
            f"VLAN joined to more than one overlay in domain {self.id!r}",
        )
        return self


class NetworkMap(Record):
    """The global overlay networks and every network domain of the hybrid cloud."""

    overlays: list[OverlayNetwork] = []
    domains: list[NetworkDomain] = []

    @model_validator(mode="after")
    def _check_map(self) -> Self:
        require_unique((o.id for o in self.overlays), "overlay id")
        require_unique((o.name for o in self.overlays), "overlay name")
        require_unique((o.vni for o in self.overlays if o.vni is not None), "overlay VNI")
        require_unique((d.id for d in self.domains), "network domain id")
        require_unique((d.name for d in self.domains), "network domain name")
        # Resource domain and VNA ids are unique throughout the hybrid cloud, not just per domain.
        require_unique((r.id for d in self.domains for r in d.resource_domains), "resource domain id")
        require_unique((v.id for d in self.domains for v in d.vnas), "VNA id")
        known = {o.id for o in self.overlays}
        dangling = [
            f"{d.id}/{lon.overlay_id}"
            for d in self.domains
            for lon in d.local_overlay_networks
            if lon.overlay_id not in known
        ]
        if dangling:
            raise ValueError(f"local overlay networks refer to unknown overlays: {', '.join(dangling)}")
        return self

    def overlay(self, overlay_id: str) -> OverlayNetwork:
        """The overlay with this id (KeyError if absent)."""
        for overlay in self.overlays:
            if overlay.id == overlay_id:
                return overlay
        raise KeyError(overlay_id)

    def domain(self, domain_id: str) -> NetworkDomain:
        """The network domain with this id (KeyError if absent)."""
        for domain in self.domains:
            if domain.id == domain_id:
                return domain
        raise KeyError(domain_id)
