"""Application map records and the application life cycle."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Self

from pydantic import AliasChoices, BeforeValidator, Field, model_validator

from bus.models.common import (
    AccessControls,
    Cidr,
    Credentials,
    CronSchedule,
    Description,
    Id,
    IpAddress,
    ModelError,
    Name,
    Priority,
    Record,
    Status,
    Timestamp,
    UnicastMacAddress,
    Uri,
    find_duplicates,
    require_unique,
)

__all__ = [
    "ALLOWED_TRANSITIONS",
    "AddressRange",
    "Application",
    "ApplicationMap",
    "ApplicationNetwork",
    "ApplicationState",
    "BootProtocol",
    "CaptureMode",
    "Database",
    "DatabaseMigrateMode",
    "Image",
    "ImageLibrary",
    "InterfaceName",
    "InvalidTransition",
    "NetworkInterface",
    "Node",
    "NodePool",
    "NodePoolInterface",
    "PrefixLength",
    "Server",
    "can_transition",
    "check_transition",
]

DEFAULT_PRIORITY = 100


class ApplicationState(StrEnum):
    """Operational state of an application (values as written in the design)."""

    DISCOVERING = "discovering"
    TEMPLATE = "template"
    DEPLOYING = "deploying"
    OFF = "off"
    BOOTING = "booting"
    FENCED = "fenced"
    RUNNING = "running"
    SCALING = "scaling"
    CAPTURING = "capturing"
    SHUTTING_DOWN = "shutting-down"
    DELETING = "deleting"


_S = ApplicationState

# The reference describes each state and says the allowed transitions are "shown in" a figure that is
# not part of its text, so each edge below is derived from the prose it cites.
ALLOWED_TRANSITIONS: Mapping[ApplicationState, frozenset[ApplicationState]] = MappingProxyType(
    {
        # The mapper discovers applications "currently running"; their servers may also be found powered off.
        _S.DISCOVERING: frozenset({_S.RUNNING, _S.OFF}),
        # "deploying a new copy of an application from the template"; a template can be deleted.
        _S.TEMPLATE: frozenset({_S.DEPLOYING, _S.DELETING}),
        # Deployed resources are "provisioned but not running" (off) or rebooted onto the image at once
        # (booting); a failed deploy is rolled back by deleting what was provisioned.
        _S.DEPLOYING: frozenset({_S.OFF, _S.BOOTING, _S.DELETING}),
        # Off resources can be brought on line, captured offline, or terminated.
        _S.OFF: frozenset({_S.BOOTING, _S.CAPTURING, _S.DELETING}),
        # Booting ends on the alternate (fence) overlays when fencing, else on the production overlays.
        _S.BOOTING: frozenset({_S.FENCED, _S.RUNNING, _S.SHUTTING_DOWN}),
        # Cutover "switch[es] the servers from the fenced to the production overlay networks".
        _S.FENCED: frozenset({_S.RUNNING, _S.SHUTTING_DOWN}),
        # Running: scale node pools, capture images (migration, DR, template), stream images directly to
        # new resources ("migrating ... directly from a running application"), be fenced at cutover
        # ("switch the servers onto alternate overlay networks"), or power off.
        _S.RUNNING: frozenset({_S.SCALING, _S.CAPTURING, _S.DEPLOYING, _S.FENCED, _S.SHUTTING_DOWN}),
        # Scaling changes the number of running copies and returns to running.
        _S.SCALING: frozenset({_S.RUNNING}),
        # After a capture the application returns to where it was (running or off), goes on to deploy the
        # captured images (migration), or the map is "converted to a template".
        _S.CAPTURING: frozenset({_S.RUNNING, _S.OFF, _S.DEPLOYING, _S.TEMPLATE}),
        # "powering off the application resources" ends with everything off.
        _S.SHUTTING_DOWN: frozenset({_S.OFF}),
        # "terminating all resources": the map is removed afterwards, so nothing follows.
        _S.DELETING: frozenset(),
    }
)


class InvalidTransition(ModelError):
    """An application state change that the life cycle does not allow."""

    def __init__(self, old: ApplicationState, new: ApplicationState) -> None:
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[old])) or "nothing"
        super().__init__(f"application cannot go from {old} to {new} (allowed from {old}: {allowed})")
        self.old = old
        self.new = new


def can_transition(old: ApplicationState, new: ApplicationState) -> bool:
    """Whether the life cycle allows old -> new (a state never transitions to itself)."""
    return new in ALLOWED_TRANSITIONS[old]


def check_transition(old: ApplicationState, new: ApplicationState) -> None:
    """Raise InvalidTransition unless the life cycle allows old -> new."""
    if not can_transition(old, new):
        raise InvalidTransition(old, new)


class CaptureMode(StrEnum):
    """How server images of an application are captured."""

    FULL = "full"
    INCREMENTAL = "incremental"
    SNAPSHOT = "snapshot"


class Application(Record):
    """Identity, placement and state of one complex application."""

    id: Id
    name: Name
    description: Description = ""
    parent_id: Id | None = None
    access_controls: AccessControls = []
    default_placement: Id | None = None
    state: ApplicationState = ApplicationState.TEMPLATE
    status: Status = Status()
    capture_mode: CaptureMode = CaptureMode.FULL
    image_library: Id | None = None

    @model_validator(mode="after")
    def _not_own_parent(self) -> Self:
        if self.parent_id == self.id:
            raise ValueError("an application cannot be its own parent")
        return self

    def transition_to(self, new: ApplicationState) -> None:
        """Change state, enforcing the life cycle."""
        check_transition(self.state, new)
        self.state = new


class ImageLibrary(Record):
    """Storage that holds captured server images."""

    id: Id
    name: Name
    location: Uri
    credentials: Credentials | None = None
    access_controls: AccessControls = []


class Image(Record):
    """A server image captured into a library, with its capture and sync schedules."""

    id: Id
    name: Name | None = None
    library_id: Id
    source_server: Id
    capture_date: Timestamp | None = None
    capture_schedule: CronSchedule | None = None
    last_sync_date: Timestamp | None = None
    sync_schedule: CronSchedule | None = None
    sync_options: dict[str, str] = {}
    access_controls: AccessControls = []

    @model_validator(mode="after")
    def _sync_after_capture(self) -> Self:
        if self.capture_date and self.last_sync_date and self.last_sync_date < self.capture_date:
            raise ValueError("last_sync_date is before capture_date")
        return self


class Server(Record):
    """An actual deployed server that runs a workload of the application."""

    id: Id
    name: Name | None = None
    resource_domain: Id
    size: Annotated[str, Field(min_length=1, max_length=128)]
    source_image: Id | None = None
    deploy_date: Timestamp | None = None
    primary_mac: UnicastMacAddress | None = None
    access_controls: AccessControls = []


class BootProtocol(StrEnum):
    """How an interface gets its address."""

    STATIC = "static"
    DHCP = "dhcp"


# Linux IFNAMSIZ allows 15 characters; '.' and ':' appear in VLAN and alias names (eth0.10, eth0:1).
InterfaceName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.:-]{0,14}$")]


def _prefix_from_mask(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().removeprefix("/")
        if text.isdigit():
            return int(text)
        try:
            mask = int(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{value!r} is neither a prefix length nor a dotted netmask") from None
        inverted = mask ^ 0xFFFFFFFF
        if inverted & (inverted + 1):
            raise ValueError(f"netmask {value} is not contiguous")
        return bin(mask).count("1")
    return value


PrefixLength = Annotated[int, BeforeValidator(_prefix_from_mask), Field(ge=0, le=128)]


class NetworkInterface(Record):
    """How one network interface of a node is configured and which application network it is on."""

    name: InterfaceName
    application_network: Id
    boot_protocol: BootProtocol = BootProtocol.STATIC
    address: IpAddress | None = None
    # Accepts "mask: 255.255.255.0" or a prefix length; always stored as the prefix length.
    prefix_len: PrefixLength | None = Field(default=None, validation_alias=AliasChoices("prefix_len", "mask"))
    gateway: IpAddress | None = None
    mac: UnicastMacAddress | None = None

    @model_validator(mode="after")
    def _check_addressing(self) -> Self:
        if self.boot_protocol is BootProtocol.STATIC and (self.address is None or self.prefix_len is None):
            raise ValueError(f"interface {self.name}: static addressing needs an address and a prefix length")
        if self.address is None:
            if self.gateway is not None:
                raise ValueError(f"interface {self.name}: a gateway needs an address")
            return self
        if self.prefix_len is None:
            return self
        if self.prefix_len > self.address.max_prefixlen:
            raise ValueError(f"interface {self.name}: prefix /{self.prefix_len} is too long for {self.address}")
        subnet = ipaddress.ip_network((self.address, self.prefix_len), strict=False)
        if (
            subnet.version == 4
            and self.prefix_len <= 30
            and self.address
            in (
                subnet.network_address,
                subnet.broadcast_address,
            )
        ):
            raise ValueError(f"interface {self.name}: {self.address} is not a host address of {subnet}")
        if self.gateway is not None:
            if self.gateway.version != self.address.version or self.gateway not in subnet:
                raise ValueError(f"interface {self.name}: gateway {self.gateway} is outside {subnet}")
            if self.gateway == self.address:
                raise ValueError(f"interface {self.name}: gateway equals the interface address")
        return self

    def subnet(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """The subnet given by address and prefix length, if both are known."""
        if self.address is None or self.prefix_len is None:
            return None
        return ipaddress.ip_network((self.address, self.prefix_len), strict=False)


class Node(Record):
    """One workload of the application: a deployed server, or an image to deploy one from."""

    id: Id
    name: Name
    server_id: Id | None = None
    source_image: Id | None = None
    image_sync_date: Timestamp | None = None
    node_pool_id: Id | None = None
    placement: Id | None = None
    deploy_priority: Priority = DEFAULT_PRIORITY
    capture_priority: Priority = DEFAULT_PRIORITY
    deploy_profile: str | None = None
    keep_image_after_migrate: bool = False
    interfaces: list[NetworkInterface] = []

    @model_validator(mode="after")
    def _check_node(self) -> Self:
        # A deployed application's node points at its server, a template's at the image to deploy.
        if (self.server_id is None) == (self.source_image is None):
            raise ValueError(f"node {self.id}: exactly one of server_id and source_image must be set")
        if self.image_sync_date is not None and self.source_image is None:
            raise ValueError(f"node {self.id}: image_sync_date needs source_image")
        require_unique((i.name for i in self.interfaces), f"interface name in node {self.id!r}")
        return self


class AddressRange(Record):
    """An inclusive range of addresses a node pool allocates from."""

    start: IpAddress
    end: IpAddress

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.start.version != self.end.version:
            raise ValueError(f"address range {self.start}-{self.end} mixes IPv4 and IPv6")
        if int(self.start) > int(self.end):
            raise ValueError(f"address range start {self.start} is after end {self.end}")
        return self


class NodePoolInterface(Record):
    """Interface template of a node pool: addresses come from a range instead of being fixed."""

    name: InterfaceName
    application_network: Id
    boot_protocol: BootProtocol = BootProtocol.STATIC
    address_range: AddressRange | None = None

    @model_validator(mode="after")
    def _static_needs_range(self) -> Self:
        if self.boot_protocol is BootProtocol.STATIC and self.address_range is None:
            raise ValueError(f"pool interface {self.name}: static addressing needs an address range")
        return self


class NodePool(Record):
    """A set of servers deployed from the same image, scaled between min_nodes and max_nodes."""

    id: Id
    name: Name | None = None
    prime_node: Id
    min_nodes: Annotated[int, Field(ge=0)] = 0
    max_nodes: Annotated[int, Field(ge=0)] = 1
    source_image: Id | None = None
    image_sync_date: Timestamp | None = None
    placement: Id | None = None
    deploy_priority: Priority = DEFAULT_PRIORITY
    deploy_profile: str | None = None
    interfaces: list[NodePoolInterface] = []

    @model_validator(mode="after")
    def _check_pool(self) -> Self:
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"node pool {self.id}: max_nodes {self.max_nodes} < min_nodes {self.min_nodes}")
        require_unique((i.name for i in self.interfaces), f"interface name in node pool {self.id!r}")
        return self


class ApplicationNetwork(Record):
    """An application's view of a network: its production overlay and optional fence overlay."""

    id: Id
    name: Name
    production_overlay_id: Id
    fence_overlay_id: Id | None = None
    subnet: Cidr | None = None

    @model_validator(mode="after")
    def _fence_differs(self) -> Self:
        if self.fence_overlay_id == self.production_overlay_id:
            raise ValueError(f"application network {self.id}: fence overlay must differ from production")
        return self


class DatabaseMigrateMode(StrEnum):
    """How a database used by a node moves with it."""

    LEAVE_BEHIND = "leave-behind"
    EXTERNAL_MIRROR = "external-mirror"
    SYNC = "sync"


class Database(Record):
    """A database a node uses and how it migrates."""

    id: Id
    node_id: Id
    migrate_mode: DatabaseMigrateMode = DatabaseMigrateMode.LEAVE_BEHIND
    target_location: str | None = None

    @model_validator(mode="after")
    def _mirror_needs_target(self) -> Self:
        # An externally mirrored database has a new address that the deploy profile must carry.
        if self.migrate_mode is DatabaseMigrateMode.EXTERNAL_MIRROR and not self.target_location:
            raise ValueError(f"database {self.id}: external-mirror needs target_location")
        return self


class ApplicationMap(Record):
    """Everything that describes one complex application (one file per application)."""

    application: Application
    networks: list[ApplicationNetwork] = []
    nodes: list[Node] = []
    node_pools: list[NodePool] = []
    databases: list[Database] = []
    servers: list[Server] = []
    images: list[Image] = []
    image_libraries: list[ImageLibrary] = []

    @model_validator(mode="after")
    def _check_map(self) -> Self:
        for items, what in (
            (self.networks, "application network id"),
            (self.nodes, "node id"),
            (self.node_pools, "node pool id"),
            (self.databases, "database id"),
            (self.servers, "server id"),
            (self.images, "image id"),
            (self.image_libraries, "image library id"),
        ):
            require_unique((item.id for item in items), what)
        self._check_references()
        self._check_addresses()
        return self

    def _check_references(self) -> None:
        networks = {n.id for n in self.networks}
        nodes = {n.id for n in self.nodes}
        pools = {p.id for p in self.node_pools}
        servers = {s.id for s in self.servers}
        images = {i.id for i in self.images}
        problems: list[str] = []
        for node in self.nodes:
            problems += [
                f"node {node.id} interface {i.name} -> network {i.application_network}"
                for i in node.interfaces
                if i.application_network not in networks
            ]
            if node.server_id is not None and node.server_id not in servers:
                problems.append(f"node {node.id} -> server {node.server_id}")
            if node.source_image is not None and node.source_image not in images:
                problems.append(f"node {node.id} -> image {node.source_image}")
            if node.node_pool_id is not None and node.node_pool_id not in pools:
                problems.append(f"node {node.id} -> node pool {node.node_pool_id}")
        for pool in self.node_pools:
            if pool.prime_node not in nodes:
                problems.append(f"node pool {pool.id} -> prime node {pool.prime_node}")
            if pool.source_image is not None and pool.source_image not in images:
                problems.append(f"node pool {pool.id} -> image {pool.source_image}")
            problems += [
                f"node pool {pool.id} interface {i.name} -> network {i.application_network}"
                for i in pool.interfaces
                if i.application_network not in networks
            ]
        problems += [f"database {db.id} -> node {db.node_id}" for db in self.databases if db.node_id not in nodes]
        if problems:
            raise ValueError(f"dangling references: {'; '.join(problems)}")

    def _check_addresses(self) -> None:
        subnets = {n.id: n.subnet for n in self.networks}
        problems: list[str] = []
        for node in self.nodes:
            for i in node.interfaces:
                subnet = subnets[i.application_network]
                if i.address is not None and subnet is not None and i.address not in subnet:
                    problems.append(f"node {node.id} {i.name} address {i.address} is outside {subnet}")
        for pool in self.node_pools:
            for pi in pool.interfaces:
                subnet = subnets[pi.application_network]
                rng = pi.address_range
                if rng is not None and subnet is not None and not (rng.start in subnet and rng.end in subnet):
                    problems.append(f"node pool {pool.id} {pi.name} range {rng.start}-{rng.end} is outside {subnet}")
        for network in self.networks:
            on_network = [
                i.address
                for node in self.nodes
                for i in node.interfaces
                if i.application_network == network.id and i.address is not None
            ]
            problems += [f"address {a} used twice on network {network.id}" for a in find_duplicates(on_network)]
        macs = [i.mac for node in self.nodes for i in node.interfaces if i.mac is not None]
        problems += [f"MAC {mac} used by more than one interface" for mac in find_duplicates(macs)]
        primary = [s.primary_mac for s in self.servers if s.primary_mac is not None]
        problems += [f"MAC {mac} is the primary MAC of more than one server" for mac in find_duplicates(primary)]
        if problems:
            raise ValueError("; ".join(problems))
