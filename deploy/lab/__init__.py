"""The lab: data centers, clouds, LANs and servers on one machine, from network namespaces,
veth pairs and bridges, built from a YAML description.

Public surface::

    Lab, BridgeRef, VethPort, PingResult          the builder (deploy.lab.builder)
    LabSpec, LanMode, load_spec, parse_spec       the description (deploy.lab.spec)
    Capabilities, KernelFeatures                  kernel features detected
    Topology, Role                                the plan, as data
    LabError and its family                       deploy.lab.errors
"""

from deploy.lab.builder import BridgeRef, Lab, VethPort
from deploy.lab.capabilities import Capabilities, KernelFeatures
from deploy.lab.errors import (
    CapabilityMissing,
    LabCommandError,
    LabCommandTimeout,
    LabError,
    LabNotFound,
    LabPermissionError,
    LabSpecError,
    LabStateError,
    NetlinkFailure,
)
from deploy.lab.procs import PingResult
from deploy.lab.spec import LabSpec, LanMode, load_spec, parse_spec
from deploy.lab.topology import Role, Topology

__all__ = [
    "BridgeRef",
    "Capabilities",
    "CapabilityMissing",
    "KernelFeatures",
    "Lab",
    "LabCommandError",
    "LabCommandTimeout",
    "LabError",
    "LabNotFound",
    "LabPermissionError",
    "LabSpec",
    "LabSpecError",
    "LabStateError",
    "LanMode",
    "NetlinkFailure",
    "PingResult",
    "Role",
    "Topology",
    "VethPort",
    "load_spec",
    "parse_spec",
]
