"""Sagas: multi-step jobs (migrations, network changes, key rotation) with compensation.

A plan (:class:`SagaPlan`) is data; :class:`SagaCoordinator` drives it, recording every
transition as an event (``skyferry.v1.saga.*``) and rebuilding :class:`SagaState` from them
after a crash; :class:`SagaService` is its ``saga`` bus service; ``python -m
manager.saga.worker`` runs it as a process. :mod:`manager.saga.testing` holds the test kit.
"""

from manager.saga.clock import Clock, SystemClock
from manager.saga.coordinator import SagaCoordinator
from manager.saga.errors import (
    InvalidPlan,
    LeaseHeld,
    LeaseLost,
    SagaError,
    SagaExists,
    SagaHistoryError,
    SagaNotFound,
    SagaStateError,
)
from manager.saga.events import EVENT_TYPES, SagaEvent, SagaProgress, StepError
from manager.saga.leases import LEASE_BUCKET, KvLeases, Lease, LeaseManager, MemoryLeases
from manager.saga.plan import ActionRef, RetryPolicy, SagaPlan, StepSpec
from manager.saga.service import SagaService, SagaSummary, SagaView
from manager.saga.state import SagaState, SagaStatus, StepState, StepStatus, fold
from manager.saga.transport import BusTransport, StepTransport, classify

__all__ = [
    "EVENT_TYPES",
    "LEASE_BUCKET",
    "ActionRef",
    "BusTransport",
    "Clock",
    "InvalidPlan",
    "KvLeases",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "LeaseManager",
    "MemoryLeases",
    "RetryPolicy",
    "SagaCoordinator",
    "SagaError",
    "SagaEvent",
    "SagaExists",
    "SagaHistoryError",
    "SagaNotFound",
    "SagaPlan",
    "SagaProgress",
    "SagaService",
    "SagaState",
    "SagaStateError",
    "SagaStatus",
    "SagaSummary",
    "SagaView",
    "StepError",
    "StepSpec",
    "StepState",
    "StepStatus",
    "StepTransport",
    "SystemClock",
    "classify",
    "fold",
]
