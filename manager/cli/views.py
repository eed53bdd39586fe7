"""Tables of the Skyferry records: what people see for maps, domains and applications."""

from __future__ import annotations

from typing import Any

from bus.models import ApplicationMap, NetworkDomain, NetworkMap
from manager.cli.output import Column, Output

OVERLAY_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("VNI", "vni"),
    Column("Policy", "optimisation_policy"),
    Column("Description", "description"),
)
DOMAIN_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("VNAs", "#vnas"),
    Column("Resource domains", "#resource_domains"),
    Column("Overlays joined", "#local_overlay_networks"),
    Column("Description", "description"),
)
VNA_COLUMNS = (
    Column("Id", "id"),
    Column("Type", "type"),
    Column("State", "state"),
    Column("External address", "external_address"),
    Column("API", "api_uri"),
)
RESOURCE_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("Vendor", "vendor"),
    Column("Kind", "kind"),
    Column("API", "api_uri"),
)
LOCAL_OVERLAY_COLUMNS = (
    Column("Overlay", "overlay_id"),
    Column("VLANs", "vlan_ids"),
    Column("Tunnel server", "provide_tunnel_server"),
    Column("Mode", "tunnel_mode"),
    Column("Trusted", "trusted"),
    Column("Peers", "peer_uris"),
)
APP_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("State", "state"),
    Column("Status", "status.level"),
    Column("Capture", "capture_mode"),
    Column("Placement", "default_placement"),
)
NODE_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("Server", "server_id"),
    Column("Image", "source_image"),
    Column("Placement", "placement"),
    Column("Deploy prio", "deploy_priority"),
    Column("Interfaces", "#interfaces"),
)
APP_NETWORK_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "name"),
    Column("Production overlay", "production_overlay_id"),
    Column("Fence overlay", "fence_overlay_id"),
    Column("Subnet", "subnet"),
)
USER_COLUMNS = (
    Column("Id", "id"),
    Column("Name", "display_name"),
    Column("Groups", "groups"),
    Column("Authorisations", "authorisations"),
    Column("Disabled", "disabled"),
)
INTERFACE_COLUMNS = (
    Column("Node", "node"),
    Column("Server", "server"),
    Column("Placement", "placement"),
    Column("Interface", "name"),
    Column("Network", "application_network"),
    Column("Address", "cidr"),
    Column("Gateway", "gateway"),
    Column("MAC", "mac"),
)


def _with_domain(domains: list[NetworkDomain], attr: str) -> list[dict[str, Any]]:
    return [{"domain": d.id, **item.model_dump(mode="json")} for d in domains for item in getattr(d, attr)]


def render_domains(out: Output, domains: list[NetworkDomain]) -> None:
    """Domains, then their VNAs, resource domains and local overlay networks."""
    dom = (Column("Domain", "domain"),)
    out.table("Network domains", DOMAIN_COLUMNS, domains)
    out.table("VNAs", dom + VNA_COLUMNS, _with_domain(domains, "vnas"))
    out.table("Resource domains", dom + RESOURCE_COLUMNS, _with_domain(domains, "resource_domains"))
    out.table("Local overlay networks", dom + LOCAL_OVERLAY_COLUMNS, _with_domain(domains, "local_overlay_networks"))


def render_network_map(out: Output, nm: NetworkMap) -> None:
    """Overlays and domains of a network map."""
    out.table("Overlay networks", OVERLAY_COLUMNS, nm.overlays)
    render_domains(out, nm.domains)


def interface_rows(am: ApplicationMap) -> list[dict[str, Any]]:
    """One row per node interface (a node without interfaces still gets a row)."""
    rows: list[dict[str, Any]] = []
    for node in am.nodes:
        base = {"node": node.id, "node_name": node.name, "server": node.server_id or node.source_image}
        base["placement"] = node.placement
        if not node.interfaces:
            rows.append(base)
        for i in node.interfaces:
            row = {**base, **i.model_dump(mode="json")}
            row["cidr"] = f"{i.address}/{i.prefix_len}" if i.address and i.prefix_len is not None else i.address
            rows.append(row)
    return rows


def render_app_map(out: Output, am: ApplicationMap, version: int | None = None) -> None:
    """An application: identity and state, networks, nodes with their interfaces, and the rest."""
    app = am.application.model_dump(mode="json")
    if version is not None:
        app["version"] = version
    out.mapping(app, title=f"Application {am.application.id}")
    out.table("Application networks", APP_NETWORK_COLUMNS, am.networks)
    out.table("Nodes and interfaces", INTERFACE_COLUMNS, interface_rows(am))
    if am.node_pools:
        cols = (Column("Id", "id"), Column("Prime node", "prime_node"), Column("Min", "min_nodes"))
        out.table("Node pools", (*cols, Column("Max", "max_nodes"), Column("Placement", "placement")), am.node_pools)
    if am.servers:
        cols = (Column("Id", "id"), Column("Name", "name"), Column("Resource domain", "resource_domain"))
        out.table("Servers", (*cols, Column("Size", "size"), Column("Primary MAC", "primary_mac")), am.servers)
    if am.databases:
        cols = (Column("Id", "id"), Column("Node", "node_id"), Column("Migrate mode", "migrate_mode"))
        out.table("Databases", (*cols, Column("Target", "target_location")), am.databases)
