"""The VNA agent's desired configuration on disk: ``<state-dir>/state.json``.

The accepted ``SwitchCreate`` / ``SegmentJoin`` / ``TunnelAdd`` requests, in the order they were
accepted, written whole after every change that took effect and before the agent replies. A write
is atomic: a temporary file in the same directory, fsync, rename over ``state.json``, fsync of the
directory; a crash at any instant leaves the old file or the new one, never a mix. On start the
agent re-applies it (:meth:`vna_agent.agent.VnaAgent.restore`): the bridges are still in the kernel
(adopted), the tunnels died with the process (re-created with the same identity and peer keys).

A file that cannot be read or parsed is moved aside as ``state.json.corrupt-<UTC time>`` and the
agent starts empty, loudly (an error log line and :attr:`LoadResult.error`), so that the next
command does not overwrite the only copy and a restart loop cannot lose it either.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.errors import ErrorCode, SkyferryError
from bus.vna import SegmentJoin, SwitchCreate, TunnelAdd

log = structlog.get_logger(__name__)

STATE_FILE = "state.json"
FORMAT_VERSION = 1


class AgentStateError(SkyferryError):
    """The agent's state file could not be used."""

    code = ErrorCode.INTERNAL


class StateFileCorrupt(AgentStateError):
    """``state.json`` exists but cannot be read or is not a valid state (it is moved aside)."""


class StateWriteFailed(AgentStateError):
    """``state.json`` could not be written; the command that needed it did not take effect."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class JoinRecord(BaseModel):
    """One accepted segment join and the port it made on the switch (a VLAN join's device name)."""

    model_config = ConfigDict(extra="forbid")
    port: str
    request: SegmentJoin


class DesiredState(BaseModel):
    """Everything the agent was asked to keep, in the order it was accepted."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=FORMAT_VERSION)
    vna_id: str
    switches: dict[str, SwitchCreate] = Field(default_factory=dict)
    joins: list[JoinRecord] = Field(default_factory=list)
    tunnels: dict[str, TunnelAdd] = Field(default_factory=dict)

    def join(self, overlay_id: str, port: str) -> JoinRecord | None:
        """The join record for ``port`` on ``overlay_id``, if any."""
        return next((j for j in self.joins if j.request.overlay_id == overlay_id and j.port == port), None)

    def drop_join(self, overlay_id: str, port: str) -> bool:
        """Forget the join of ``port`` on ``overlay_id``; ``True`` if there was one."""
        before = len(self.joins)
        self.joins = [j for j in self.joins if not (j.request.overlay_id == overlay_id and j.port == port)]
        return len(self.joins) != before

    def drop_switch(self, overlay_id: str) -> None:
        """Forget a switch with its joins and tunnels."""
        self.switches.pop(overlay_id, None)
        self.joins = [j for j in self.joins if j.request.overlay_id != overlay_id]
        self.tunnels = {k: t for k, t in self.tunnels.items() if t.overlay_id != overlay_id}


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`StateStore.load` found: the state, and where a bad file was moved to."""

    state: DesiredState
    error: StateFileCorrupt | None = None
    quarantined: Path | None = None


class StateStore:
    """Reads and atomically rewrites ``state.json`` in a state directory."""

    def __init__(self, state_dir: Path, vna_id: str) -> None:
        self.dir = state_dir
        self.vna_id = vna_id
        self.path = state_dir / STATE_FILE

    def read(self) -> DesiredState | None:
        """The stored state (``None`` if there is no file yet); raises :class:`StateFileCorrupt`."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileCorrupt(f"cannot read {self.path}: {exc}", details={"path": str(self.path)}) from exc
        try:
            state = DesiredState.model_validate_json(raw)
        except ValidationError as exc:
            raise StateFileCorrupt(
                f"{self.path} is not a valid VNA agent state: {exc.error_count()} error(s), first: "
                f"{exc.errors()[0]['msg']}",
                details={"path": str(self.path), "size": len(raw)},
            ) from exc
        if state.version != FORMAT_VERSION:
            raise StateFileCorrupt(
                f"{self.path} has format version {state.version}, this agent reads {FORMAT_VERSION}",
                details={"path": str(self.path), "version": state.version},
            )
        if state.vna_id != self.vna_id:
            raise StateFileCorrupt(
                f"{self.path} belongs to VNA {state.vna_id!r}, not {self.vna_id!r}",
                details={"path": str(self.path), "vna_id": state.vna_id},
            )
        return state

    def load(self) -> LoadResult:
        """The stored state, or an empty one; a bad file is moved aside (raises only if it cannot be).

        Raises:
            StateFileCorrupt: the file is bad and could not be moved aside either (starting empty
                would overwrite it at the next command).
        """
        for stale in self.dir.glob(f".{STATE_FILE}.*.tmp"):  # a write cut short by a crash
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            state = self.read()
        except StateFileCorrupt as err:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{stamp}")
            try:
                os.replace(self.path, aside)
                _fsync_dir(self.dir)
            except OSError as exc:
                log.error("state_file_corrupt", path=str(self.path), error=err.message, moved_aside=False)
                raise StateFileCorrupt(
                    f"{err.message}; and it cannot be moved aside: {exc}", details=err.details
                ) from exc
            log.error(
                "state_file_corrupt",
                path=str(self.path),
                error=err.message,
                moved_aside=str(aside),
                consequence="starting with no switches, joins or tunnels; re-send the configuration",
            )
            return LoadResult(DesiredState(vna_id=self.vna_id), err, aside)
        return LoadResult(state if state is not None else DesiredState(vna_id=self.vna_id))

    def save(self, state: DesiredState) -> None:
        """Replace ``state.json`` atomically (temp file, fsync, rename, fsync the directory).

        Raises:
            StateWriteFailed: the file could not be written (the old one is left as it was).
        """
        data = state.model_dump_json(indent=1).encode()
        tmp: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
            _fsync_dir(self.dir)
        except OSError as exc:
            raise StateWriteFailed(f"cannot write {self.path}: {exc}", details={"path": str(self.path)}) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
