"""MAC conflict detection from a switch's forwarding database: moves, flapping (loops).

Fed by netlink FDB events (:mod:`vna_agent.fdbwatch`) as the bridge learns, or by snapshots.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from bus.vna import ConflictKind


@dataclass
class MacObservation:
    kind: ConflictKind
    mac: str
    ports: list[str]


@dataclass
class MacTracker:
    """Compares successive FDB snapshots of one switch.

    A MAC that changes port is a move (a server that moved, or a duplicate MAC);
    a MAC that changes port ``flap_count`` times within ``flap_window_s`` is a
    bridged loop between sites.
    """

    flap_count: int = 4
    flap_window_s: float = 5.0
    _where: dict[str, str] = field(default_factory=dict)
    _moves: dict[str, deque[float]] = field(default_factory=dict)
    _loop_reported: dict[str, float] = field(default_factory=dict)

    def observe(self, mac: str, port: str, now: float | None = None) -> MacObservation | None:
        """One learn/move of ``mac`` onto ``port`` (a netlink FDB event); what it means, if anything."""
        t = time.monotonic() if now is None else now
        prev = self._where.get(mac)
        self._where[mac] = port
        if prev is None or prev == port:
            return None
        moves = self._moves.setdefault(mac, deque())
        moves.append(t)
        while moves and t - moves[0] > self.flap_window_s:
            moves.popleft()
        if len(moves) >= self.flap_count:
            if t - self._loop_reported.get(mac, -1e9) > self.flap_window_s:
                self._loop_reported[mac] = t
                return MacObservation(ConflictKind.LOOP, mac, [prev, port])
            return None
        return MacObservation(ConflictKind.MAC_MOVED, mac, [prev, port])

    def forget(self, mac: str) -> None:
        """``mac`` left the table (aged out, flushed): its next learn is not a move."""
        self._where.pop(mac, None)

    def update(self, fdb: dict[str, str], now: float | None = None) -> list[MacObservation]:
        """Feed a snapshot ``{mac: port}``; return what changed."""
        t = time.monotonic() if now is None else now
        out = []
        for mac, port in fdb.items():
            obs = self.observe(mac, port, t)
            if obs is not None:
                out.append(obs)
        return out
