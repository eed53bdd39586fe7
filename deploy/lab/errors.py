"""The lab's error tree, under Skyferry's root error.

::

    SkyferryError
    └── LabError                      anything the lab could not do
        ├── LabSpecError              the YAML/spec is invalid (names, addresses, references)
        ├── LabNotFound               unknown host, NIC, site or LAN
        ├── LabStateError             state directory not owned by this lab, lab not up
        ├── LabPermissionError        not root, or no ``ip netns``
        ├── CapabilityMissing         the kernel lacks a feature the spec asks for
        ├── NetlinkFailure            a netlink call failed (``errno`` in details)
        └── LabCommandError           a command in a namespace failed to start
            └── LabCommandTimeout     ... or did not finish in time
"""

from __future__ import annotations

from bus.errors import ErrorCode, SkyferryError


class LabError(SkyferryError):
    """Root of the lab's errors."""

    code = ErrorCode.INTERNAL


class LabSpecError(LabError):
    """The lab description is invalid."""

    code = ErrorCode.VALIDATION


class LabNotFound(LabError):
    """A host, NIC, site or LAN that the lab does not have."""

    code = ErrorCode.NOT_FOUND


class LabStateError(LabError):
    """The lab is not in a state that allows the operation (or its state dir is not its own)."""

    code = ErrorCode.INVALID_STATE


class LabPermissionError(LabError):
    """The lab needs root and the ``ip`` tool with network namespace support."""

    code = ErrorCode.FORBIDDEN


class CapabilityMissing(LabError):
    """The kernel lacks a feature the spec asks for (e.g. VLAN trunks)."""

    code = ErrorCode.UNAVAILABLE


class NetlinkFailure(LabError):
    """A netlink request failed; ``details`` carry the errno, namespace and operation."""


class LabCommandError(LabError):
    """A command could not be run inside a lab namespace."""


class LabCommandTimeout(LabCommandError):
    """A command inside a lab namespace did not finish in time."""

    code = ErrorCode.TIMEOUT
    retryable = True
