"""Handshake flood benchmark (issue 9): what refusing unknown-peer handshakes costs, and that a flood
does not starve the data path.

Three figures:

* **refusal rate of one core** (``bench/handshake_flood.c`` over the sans-IO core, no system calls):
  1-byte ``01`` datagrams, right-size initiations with a wrong mac1, initiations with a *valid* mac1
  from a non-peer address (who knows the public key can make one), PIECEs of unknown sessions; and
  how many of the valid-mac1 ones still reach Python per second (the token bucket's rate);
* **Python's cost per handshake that reaches it** (``consume_initiation`` on a valid-mac1 forgery,
  which fails at the first AEAD after one X25519, and on a genuine one), hence the CPU per second a
  flood can cost Python at most;
* **the data path under a flood**, end to end on loopback: two datagram pumps carry 1400-byte frames
  while another process sprays the receiving pump's port with valid-mac1 initiations, paced
  (``--flood-rates``, default 20,000/s) and as fast as it can; frames per second delivered with and
  without the flood, the handshakes per second refused and that reached Python (drained with
  ``take()`` every 10 ms), and the receiving pump thread's CPU. On a 2-core machine the unpaced
  flooder takes a core itself: compare the pump's CPU, not only the frames.

Run (never two benchmarks at once; see ``bench/README.md``)::

    flock /tmp/skyferry-bench.lock .venv/bin/python -m bench.bench_handshake_flood --seconds 5

Prints one JSON object and keeps it in ``bench/results/handshake-flood-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from vna_agent.dataplane import handshake as hs
from vna_agent.dataplane.errors import HandshakeAuthError
from vna_agent.dataplane.keys import StaticKeyPair
from vna_agent.dataplane.record import RecordSession

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "vna_agent" / "dataplane"
BUILD = ROOT / "build" / "bench"
RESULTS = ROOT / "bench" / "results"
FRAME = 1400


def build_refusal_bench() -> Path:
    """Compile bench/handshake_flood.c with the core (-O2, as setup.py builds the extension)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / "handshake_flood"
    src = [ROOT / "bench" / "handshake_flood.c", CORE / "_fastpath_core.c"]
    cmd = ["cc", "-O2", "-std=c99", "-Wall", "-Wextra", f"-I{CORE}", *map(str, src), "-lcrypto", "-o", str(out)]
    subprocess.run(cmd, check=True)
    return out


def refusal_rates(seconds: float) -> dict[str, Any]:
    done = subprocess.run([str(build_refusal_bench()), str(seconds)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def python_costs(n: int = 200) -> dict[str, float]:
    """Microseconds Python spends on one initiation that passed the C gate: a forgery, a genuine one."""
    node, other = StaticKeyPair.generate(), StaticKeyPair.generate()
    genuine, _ = hs.create_initiation(other, node.public, sender_index=1, timestamp=hs.tai64n(1))
    body = genuine[:4] + os.urandom(len(genuine) - 20)
    forged = body + hs._mac1(node.public.raw, body)
    costs: dict[str, float] = {}
    for name, msg in (("forged_us", forged), ("genuine_us", genuine)):
        t0 = time.perf_counter()
        for _ in range(n):
            with contextlib.suppress(HandshakeAuthError):  # the forgery fails at its first AEAD
                hs.consume_initiation(node, msg)
        costs[name] = (time.perf_counter() - t0) / n * 1e6
    return costs


# -- end to end: two pumps over loopback UDP, a flood process on the side ---------------------------------


def _sessions() -> tuple[RecordSession, RecordSession, StaticKeyPair]:
    ini, resp = StaticKeyPair.generate(), StaticKeyPair.generate()
    msg, state = hs.create_initiation(ini, resp.public, sender_index=11, timestamp=hs.tai64n(1))
    reply, rkeys = hs.create_response(hs.consume_initiation(resp, msg), sender_index=22)
    return RecordSession(hs.consume_response(state, reply)), RecordSession(rkeys), resp


_FLOOD = textwrap.dedent(
    """
    import socket, sys, time
    msg, port, seconds, rate = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent, start = 0, time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for _ in range(256):
            try:
                s.sendto(msg, ("127.0.0.1", port))
                sent += 1
            except OSError:
                pass
        if rate:  # paced: sleep off the time the batch was early
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    print(sent)
    """
)


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _cpu_seconds(tid: int) -> float:
    """User + system CPU time of one thread of this process."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Link:
    """Pump A (sender) -> UDP on loopback -> pump B (receiver); frames go in at A's "TAP", out at B's."""

    def __init__(self) -> None:
        from vna_agent.dataplane import _fastpath  # type: ignore[attr-defined]

        a_sess, b_sess, b_node = _sessions()
        self.node = b_node
        self.a_tap, self.a_tap_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.b_tap, self.b_tap_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.a_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.b_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.a_sock, self.b_sock):
            s.bind(("127.0.0.1", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setblocking(False)
        for s in (self.a_tap, self.b_tap):
            s.setblocking(False)
        self.a: Any = _fastpath.Pump(self.a_tap.fileno(), self.a_sock.fileno(), False, False, 32768, 1432)
        self.b: Any = _fastpath.Pump(self.b_tap.fileno(), self.b_sock.fileno(), False, False, 32768, 1432)
        self.b.set_static(b_node.public.raw)
        self.a.set_sessions([a_sess.fastpath_row(0)])
        self.b.set_sessions([b_sess.fastpath_row(0)])
        self.a.set_peer(*self.b_sock.getsockname())
        self.b.set_peer(*self.a_sock.getsockname())
        self.a.start()
        before = _tasks()
        self.b.start()
        (self.b_tid,) = _tasks() - before  # pump B's forwarding thread, for its CPU time
        self.port = int(self.b_sock.getsockname()[1])

    def close(self) -> None:
        self.a.stop()
        self.b.stop()
        for s in (self.a_tap, self.a_tap_peer, self.b_tap, self.b_tap_peer, self.a_sock, self.b_sock):
            s.close()


def _measure(link: Link, seconds: float, flood: bytes | None, rate: float = 0.0) -> dict[str, Any]:
    stop = threading.Event()
    received = [0]

    def write() -> None:
        frame = os.urandom(FRAME)
        link.a_tap_peer.setblocking(True)
        while not stop.is_set():
            link.a_tap_peer.send(frame)

    def read() -> None:
        link.b_tap_peer.settimeout(0.2)
        while not stop.is_set():
            try:
                link.b_tap_peer.recv(65536)
                received[0] += 1
            except TimeoutError:
                continue

    flooder = None
    if flood is not None:
        cmd = [sys.executable, "-c", _FLOOD, flood.hex(), str(link.port), str(seconds + 1), str(rate)]
        flooder = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the flood is on before the measurement starts
    threads = [threading.Thread(target=write, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    link.b.take()
    before, events, t0, cpu0 = received[0], 0, time.monotonic(), _cpu_seconds(link.b_tid)
    drops0 = link.b.stats()["drops"]
    while time.monotonic() - t0 < seconds:
        time.sleep(0.01)
        events += sum(1 for e in link.b.take() if e[0] == 1)
    elapsed = time.monotonic() - t0
    cpu = _cpu_seconds(link.b_tid) - cpu0
    frames = received[0] - before
    drops = link.b.stats()["drops"]
    stop.set()
    for t in threads:
        t.join(2)
    sent = int(flooder.communicate()[0]) if flooder is not None else 0
    refused = drops["handshake"] - drops0["handshake"]
    return {
        "frames_per_s": round(frames / elapsed),
        "mbit_per_s": round(frames * FRAME * 8 / elapsed / 1e6),
        "flood_sent_per_s": round(sent / (seconds + 1)),
        "handshakes_refused_per_s": round(refused / elapsed),
        "handshakes_to_python_per_s": round(events / elapsed, 1),
        "receiving_pump_cpu_pct": round(100 * cpu / elapsed, 1),
    }


def data_path_under_flood(seconds: float, rates: list[float]) -> dict[str, Any]:
    """Quiet, then a valid-mac1 flood at each rate (0: as fast as one process sends)."""
    link = Link()
    try:
        body = bytes([1, 0, 0, 0]) + os.urandom(hs.INITIATION_LEN - 20)
        forged = body + hs._mac1(link.node.public.raw, body)  # valid mac1: the costliest flood to refuse
        result = {"quiet": _measure(link, seconds, None)}
        for rate in rates:
            result[f"flood_{int(rate) or 'max'}"] = _measure(link, seconds, forged, rate)
        return result
    finally:
        link.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_handshake_flood", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--flood-rates", default="20000,0", help="datagrams/s of each flood (0: unpaced)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "refusal_one_core": refusal_rates(args.seconds),
        "python_per_handshake": python_costs(),
        "data_path": data_path_under_flood(args.seconds, [float(r) for r in args.flood_rates.split(",")]),
    }
    limit = result["refusal_one_core"]["mac1_passed_per_s"]
    result["python_cpu_bound_pct"] = round(limit * result["python_per_handshake"]["genuine_us"] / 1e4, 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"handshake-flood-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
