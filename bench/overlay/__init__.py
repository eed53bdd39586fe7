"""Helpers of the overlay data-plane benchmark (``python -m bench.bench_overlay``, issue 4).

* :mod:`.topo` picks the two test hosts and VNAs out of a lab and gives the hosts a routed
  NIC for the plain-underlay figure;
* :mod:`.providers` sets up one overlay at a time between the two VNAs (the
  :class:`~.providers.Provider` interface, one class per tunnel kind);
* :mod:`.measure` runs iperf3 and the interleaved RTT probes, samples daemon CPU and memory;
* :mod:`.report` aggregates repeats into medians, ratios to OpenVPN and the markdown section;
* :mod:`.sysinfo` reads ``/proc`` and tool versions.
"""

from __future__ import annotations

from pathlib import Path

#: The benchmark's default lab: two data centers, one stretched LAN, underlay MTU 1600.
LAB_YAML = Path(__file__).with_name("lab-bench.yaml")

__all__ = ["LAB_YAML"]
