"""The production topology runs what the embedded stack runs: the shipped units, as separate processes.

``deploy/install.sh --no-system`` makes the keys, NATS users and env files in a temporary config
directory; every daemon (nats-server, manager, saga coordinator, VNA agent) is started from its
``deploy/systemd`` unit's own ExecStart/Environment/EnvironmentFile lines with ``/etc/skyferry``,
``/var/lib/skyferry`` and ``/opt/skyferry/.venv/bin`` pointed at temporary paths (as
``install.sh --etc/--var/--prefix`` rewrites them). nats-server runs the shipped ``single.conf``
with only its listen address, monitor port and store directory changed. The VNA agent drives its data
plane in a network namespace the test makes (``SKYFERRY_VNA_OPTS=--netns`` in ``vna.env``).

An operator starts a saga with the CLI and the admin key the install script made; its steps create
two overlays in the manager (compensation: delete) and their switches on the VNA (compensation:
remove). Every process is SIGKILLed once and restarted while the saga runs, each at a point the
saga's own state shows (no fixed sleeps; a participant that is down is what holds the saga there):
the VNA agent is started only once the first switch step retries; the manager is killed while the
saga waits for the agent, so overlay B retries; then the agent (holding switch A) and the
coordinator (mid-step: overlay B started, no result) are killed, the coordinator restarted; then
nats-server; then the manager comes back, then the agent. The saga must end ``completed`` without a
compensation, with one ``created`` event per overlay (signed by the coordinator's service account)
and one bridge per overlay, created once, in the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from bus import subjects
from bus.client import Identity, request_raw
from bus.connection import Bus, BusConfig
from bus.server import find_binary, free_port
from deploy import keys as install_keys
from manager.store import JetStreamRecorder
from tests.deploy.units import Unit, load_unit
from tests.e2e.overlay_fixtures import needs_root
from tests.e2e.waiting import until as _until
from vna_agent.agent import short_name

REPO = Path(__file__).resolve().parents[2]
SHIPPED_NATS = REPO / "deploy" / "nats" / "single.conf"
WAIT_S = 60.0
POLL_S = 0.1
T = TypeVar("T")

pytestmark = [pytest.mark.slow, needs_root, pytest.mark.timeout(300)]


def _die_with_the_test() -> None:
    """In the child: SIGKILL when the test process dies, so a killed test leaves no daemon behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Daemon:
    """One unit's daemon as a child process (its own process group, so SIGKILL leaves nothing behind)."""

    def __init__(self, unit: Unit, log: Path, base_env: dict[str, str]) -> None:
        self.unit = unit
        self.log = log
        self.base_env = base_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**self.base_env, **self.unit.env()}
        argv = self.unit.argv(env)
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_the_test,
            )

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.unit.name} is not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def assert_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"{self.unit.name} exited with {self.proc.returncode if self.proc else None}; see {self.log}"
        )


@dataclass
class Topology:
    etc: Path
    var: Path
    url: str
    vna_id: str
    netns: str
    daemons: dict[str, Daemon]
    operator: Bus
    """CLI role, acting as the admin the install script made (what `skyferry` does)."""
    probe: Bus
    """Manager role, for the checks only (reading the stream, asking the agent)."""
    admin: Identity
    cli_env: dict[str, str] = field(default_factory=dict)

    def assert_all_running(self) -> None:
        for d in self.daemons.values():
            if d.starts:
                d.assert_running()

    async def saga(self, saga_id: str) -> dict[str, Any]:
        _, view = await request_raw(
            self.operator, subjects.command("saga", "show"), {"saga_id": saga_id}, identity=self.admin, timeout=2
        )
        assert isinstance(view, dict)
        return view

    async def cli(self, *args: str) -> Any:
        """Run ``skyferry -o json ARGS`` as an operator would; its parsed output."""
        keys = self.etc / "keys"
        cmd = [
            *(sys.executable, "-m", "manager.cli"),
            *("--server", self.url, "--nkey", str(keys / "cli.nk")),
            *("--user", install_keys.ADMIN, "--user-key", str(keys / "admin.nk"), "-o", "json", "--timeout", "10"),
            *args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, env=self.cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, f"skyferry {' '.join(args)} failed ({proc.returncode}): {err.decode()}"
        return json.loads(out)


async def until(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_S) -> T:
    """:func:`tests.e2e.waiting.until` with this module's timeout and poll interval."""
    return await _until(probe, what, timeout, POLL_S)


def _conf_lines_differing(a: str, b: str) -> list[tuple[str, str]]:
    la, lb = a.splitlines(), b.splitlines()
    assert len(la) == len(lb)
    return [(x.strip(), y.strip()) for x, y in zip(la, lb, strict=True) if x != y]


def _install(etc: Path, var: Path, port: int, mport: int, vna_id: str) -> None:
    run = subprocess.run(
        [
            *("bash", str(REPO / "deploy" / "install.sh"), "--etc", str(etc), "--var", str(var), "--no-system"),
            *("--", "--vna-id", vna_id, "--nats-url", f"nats://127.0.0.1:{port}"),
            *("--nats-listen", f"127.0.0.1:{port}", "--nats-http-port", str(mport)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stderr
    # The shipped single.conf, but for this host's listen address, monitor port and store.
    diff = _conf_lines_differing(SHIPPED_NATS.read_text(), (etc / "nats.conf").read_text())
    assert diff == [
        ('listen: "0.0.0.0:4222"', f'listen: "127.0.0.1:{port}"'),
        ("http_port: 8222", f"http_port: {mport}"),
        ('store_dir: "/var/lib/skyferry/nats"', f'store_dir: "{var / "nats"}"'),
    ]
    for name in install_keys.key_names():
        assert (etc / "keys" / f"{name}.nk").stat().st_mode & 0o777 == 0o600


@contextlib.asynccontextmanager
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    etc, var, logs = tmp_path / "etc", tmp_path / "var", tmp_path / "logs"
    var.mkdir()
    logs.mkdir()
    port, mport = free_port(), free_port()
    tag = secrets.token_hex(3)
    vna_id, netns = f"pt-vna-{tag}", f"sfpt-{tag}"
    _install(etc, var, port, mport, vna_id)
    with (etc / "vna.env").open("a") as f:  # what an operator of a lab VNA puts in vna.env
        f.write(f"SKYFERRY_VNA_OPTS=--netns {netns}\n")
    replace = {
        "/opt/skyferry/.venv/bin/nats-server": find_binary(),
        "/opt/skyferry/.venv/bin/python": sys.executable,
        "/etc/skyferry": str(etc),
        "/var/lib/skyferry": str(var),
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYFERRY_", "SF_"))}
    base_env |= {"PYTHONPATH": str(REPO), "SKYFERRY_ETC": str(etc), "SKYFERRY_HOME": str(tmp_path / "home")}
    units = {
        "nats": "skyferry-nats.service",
        "manager": "skyferry-manager.service",
        "saga": "skyferry-saga.service",
        "vna": "skyferry-vna-agent.service",
    }
    daemons = {k: Daemon(load_unit(u, replace), logs / f"{k}.log", base_env) for k, u in units.items()}
    subprocess.run(["ip", "netns", "add", netns], check=True)
    operator = probe = None
    try:
        daemons["nats"].start()
        keys = etc / "keys"
        url = f"nats://127.0.0.1:{port}"
        probe = await until(
            lambda: Bus.connect(BusConfig(servers=[url], name="pt-probe", nkey_seed_file=keys / "manager.nk")),
            "nats-server accepts connections",
        )
        for name in ("manager", "saga"):  # the VNA agent is started by the test, mid-saga
            daemons[name].start()
        operator = await Bus.connect(BusConfig(servers=[url], name="pt-operator", nkey_seed_file=keys / "cli.nk"))
        admin = Identity(install_keys.ADMIN, (keys / "admin.nk").read_text().strip())
        topo = Topology(etc, var, url, vna_id, netns, daemons, operator, probe, admin, cli_env=base_env)
        await ready(topo)
        yield topo
    finally:
        for d in reversed(daemons.values()):
            d.stop()
        for bus in (operator, probe):
            if bus is not None:
                await bus.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)


async def manager_ready(t: Topology) -> bool:
    _, who = await request_raw(t.operator, subjects.command("manager", "whoami"), {}, identity=t.admin, timeout=2)
    assert isinstance(who, dict)
    return True


async def saga_ready(t: Topology) -> bool:
    await request_raw(t.operator, subjects.command("saga", "list"), {}, identity=t.admin, timeout=2)
    return True


async def ready(t: Topology) -> None:
    await until(lambda: manager_ready(t), "the manager answers")
    await until(lambda: saga_ready(t), "the saga service answers")
    t.assert_all_running()


def plan(saga_id: str, vna_id: str, overlays: list[str]) -> dict[str, Any]:
    """Per overlay: create it in the manager, then its switch on the VNA; each undone by its compensation."""
    retry = {"max_attempts": 10_000, "initial_backoff_s": 0.1, "backoff_multiplier": 1.5, "max_backoff_s": 0.5}
    steps: list[dict[str, Any]] = []
    for ov in overlays:
        steps.append(
            {
                "step_id": f"overlay-{ov}",
                "depends_on": [steps[-1]["step_id"]] if steps else [],
                "action": {
                    "subject": "sf.cmd.manager.overlay_create",
                    "payload": {"record": {"id": ov, "name": f"overlay {ov}"}},
                },
                "compensation": {"subject": "sf.cmd.manager.overlay_delete", "payload": {"id": ov}},
                "retry": dict(retry),
                "timeout_s": 5,
            }
        )
        steps.append(
            {
                "step_id": f"switch-{ov}",
                "depends_on": [f"overlay-{ov}"],
                "action": {"subject": f"sf.agent.{vna_id}.switch_create", "payload": {"overlay_id": ov}},
                "compensation": {"subject": f"sf.agent.{vna_id}.switch_remove", "payload": {"overlay_id": ov}},
                "retry": dict(retry),
                "timeout_s": 5,
            }
        )
    return {"saga_id": saga_id, "name": "production topology", "steps": steps}


def _step(view: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in view["steps"] if s["step_id"] == step_id)


async def test_a_saga_survives_every_daemon_of_the_shipped_units_being_killed(tmp_path: Path) -> None:
    async with topology(tmp_path) as t:
        tag = t.vna_id.rsplit("-", 1)[1]
        saga_id, ov_a, ov_b = f"pt-{tag}", f"pt-a-{tag}", f"pt-b-{tag}"
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text(yaml.safe_dump(plan(saga_id, t.vna_id, [ov_a, ov_b])))
        started = await t.cli("saga", "start", str(plan_file))
        assert started["saga_id"] == saga_id
        d = t.daemons

        async def view_where(cond: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
            async def probe() -> dict[str, Any] | None:
                v = await t.saga(saga_id)
                assert v["status"] in ("running", "completed"), f"saga went {v['status']}: {v}"
                return v if cond(v) else None

            return await until(probe, what)

        def attempts(step: str, at_least: int = 2) -> Callable[[dict[str, Any]], bool]:
            return lambda v: _step(v, step)["attempts"] >= at_least

        # 1. The VNA agent is not started yet: the first overlay is created, its switch step retries.
        await view_where(attempts(f"switch-{ov_a}"), "switch A retried (no VNA agent yet)")
        assert _step(await t.saga(saga_id), f"overlay-{ov_a}")["status"] == "succeeded"

        # 2. Nothing of the saga is at the manager: kill it. The VNA agent starts: switch A is made,
        #    overlay B retries while the manager is down.
        d["manager"].kill()
        d["vna"].start()
        await view_where(attempts(f"overlay-{ov_b}"), "overlay B retried (manager down)")
        assert _step(await t.saga(saga_id), f"switch-{ov_a}")["status"] == "succeeded"

        # 3. The VNA agent, which holds switch A, between two of the saga's steps.
        d["vna"].kill()

        # 4. The coordinator, mid-step (overlay B started, no result): it resumes from the events.
        before = (await t.saga(saga_id))["position"]
        d["saga"].kill()
        d["saga"].start()
        await view_where(lambda v: v["position"] > before, "the restarted coordinator drives the saga")

        # 5. nats-server: the coordinator reconnects and keeps retrying overlay B.
        before = (await t.saga(saga_id))["position"]
        d["nats"].kill()
        d["nats"].start()
        await view_where(lambda v: v["position"] > before, "the saga moves again after nats-server restarted")

        # 6. The manager comes back: overlay B is created; switch B waits for the VNA agent.
        d["manager"].start()
        await view_where(attempts(f"switch-{ov_b}"), "switch B retried (VNA agent down)")
        assert _step(await t.saga(saga_id), f"overlay-{ov_b}")["status"] == "succeeded"

        # 7. The VNA agent comes back: the saga runs to its end.
        d["vna"].start()
        await view_where(lambda v: v["status"] == "completed", "the saga completed")
        t.assert_all_running()

        # What the operator sees.
        final = await t.cli("saga", "show", saga_id)
        assert final["status"] == "completed"
        assert not final["compensated"] and not final["failed_compensations"]
        assert all(s["status"] == "succeeded" and s["compensation_status"] is None for s in final["steps"])
        overlays = {o["record"]["id"] for o in await t.cli("overlay", "list")}
        assert {ov_a, ov_b} <= overlays

        # Every effect exactly once: one event per overlay, by the coordinator's service account...
        rec = JetStreamRecorder(t.probe)
        for ov in (ov_a, ov_b):
            events = await rec.read("overlay", ov)
            assert [e.event_type.rsplit(".", 1)[-1] for e in events] == ["created"], events
            assert events[0].actor == install_keys.SAGA_SIGNER
        saga_events = [e.event_type.rsplit(".", 1)[-1] for e in await rec.read("saga", saga_id)]
        assert saga_events.count("step_succeeded") == 4 and saga_events.count("completed") == 1
        assert not [e for e in saga_events if e.startswith("compensation")]
        # ... and one bridge per overlay in the VNA's namespace, created once over all agent runs.
        links = json.loads(
            subprocess.run(
                ["ip", "-n", t.netns, "-j", "link", "show", "type", "bridge"], capture_output=True, check=True
            ).stdout
        )
        bridges = sorted(link["ifname"] for link in links)
        wanted = sorted(short_name("sfo", ov) for ov in (ov_a, ov_b))
        assert bridges == wanted
        created = [
            line for line in d["vna"].log.read_text().splitlines() if re.search(r"\bevent=bridge_created\b", line)
        ]
        for name in wanted:
            assert len([line for line in created if f"bridge={name} " in line]) == 1, created
        assert {k: v.starts for k, v in d.items()} == {"nats": 2, "manager": 2, "saga": 2, "vna": 2}

        # The agent's own view: both switches, switch A restored from its state file after the
        # SIGKILL, switch B made by the saga. It keeps answering with them (an agent once stopped
        # answering about 3 s after its first switch), and a SIGTERM stops it cleanly.
        async def agent_status() -> dict[str, Any]:
            _, st = await request_raw(t.probe, subjects.agent(t.vna_id, "status"), {}, timeout=2)
            assert isinstance(st, dict)
            return st

        since = asyncio.get_running_loop().time()
        answers = 0
        while asyncio.get_running_loop().time() - since < 5.0:
            st = await agent_status()
            assert sorted(s["overlay_id"] for s in st["switches"]) == sorted((ov_a, ov_b)), st
            assert sorted(s["bridge"] for s in st["switches"]) == wanted
            answers += 1
            await asyncio.sleep(POLL_S)  # the poll interval, as in until()
        assert answers >= 5
        vna = d["vna"]
        vna.stop(timeout=10)
        assert vna.proc is not None and vna.proc.returncode == 0, f"the agent did not exit on SIGTERM; see {vna.log}"
