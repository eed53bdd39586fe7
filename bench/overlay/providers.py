"""One class per data path under test. A :class:`Provider` sets its path up between the two VNAs
of a :class:`~bench.overlay.topo.BenchPath` (both ends started, tunnel device bridged with the
VNA's LAN leg) and tears it down again; the harness runs one provider at a time.

Adding a path is a small class::

    class MyTunnel(BridgedOverlay):
        key = "mine"
        label = "My tunnel"

        def start(self, ctx: BenchContext) -> None:
            for me, peer in ctx.pairs():
                self.add_tap(ctx, me.vna, "mytap0")
                self.spawn(ctx, me.vna, "mytunneld", ["mytunneld", "--remote", str(peer.vna_wan.ip)])

Everything runs inside lab namespaces (``Lab.spawn``/``Lab.exec``); daemons are stopped in
``teardown`` and, whatever happens, by ``Lab.down()``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import structlog

from bench.overlay import sysinfo, topo
from bench.overlay.topo import BenchPath, Side
from deploy.lab import Lab, LabError

log = structlog.get_logger("bench.overlay")

REPO = Path(__file__).resolve().parents[2]
#: The overlay bridge the harness creates in each VNA (the LAN leg and the tunnel device are its ports).
BRIDGE = "sfbench0"
VXLAN_DEV = "sfvx0"
VXLAN_VNI = 4242
OPENVPN_TAP = "sfovpn0"
OPENVPN_PORT = 1194
TINC_TAP = "sftinc0"
TINC_PORT = 655
SKYFERRY_TAP = "sfdp0"
SKYFERRY_PORT = 7000
#: UDP socket buffers asked of OpenVPN and tinc: what Skyferry's datagram link asks for
#: (``vna_agent.dataplane.datagram.SOCKET_BUFFER``). With the OS default (208 KiB) the receiving
#: daemon's socket overflows whenever the 2-CPU machine schedules it late, and every inner TCP
#: retransmit comes from there (Udp RcvbufErrors in the VNA namespace).
UDP_SOCKET_BUFFER = 8 << 20


class ProviderError(Exception):
    """A provider could not be set up (the run records it and goes on with the next one)."""


@dataclass
class BenchContext:
    """What a provider needs: the lab, the path, a scratch directory that lives for the whole run."""

    lab: Lab
    path: BenchPath
    work: Path
    ready_timeout: float = 20.0

    def pairs(self) -> Iterator[tuple[Side, Side]]:
        """(this side, the other side) for side a, then side b."""
        yield self.path.a, self.path.b
        yield self.path.b, self.path.a


@dataclass
class Daemon:
    """A tunnel daemon started in a VNA; its CPU time and peak RSS are read from ``/proc``."""

    name: str
    host: str
    proc: subprocess.Popen[Any]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        return sysinfo.proc_cpu_seconds(self.pid)

    def max_rss_kib(self) -> int | None:
        return sysinfo.proc_status_kib(self.pid, "VmHWM")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds; always reaps it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``pred`` until true; :class:`ProviderError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise ProviderError(f"timed out after {timeout:.0f}s waiting for {what}")


class Provider(ABC):
    """A data path between host a and host b.

    Life cycle per measurement: ``setup(ctx)`` (both ends running, bridged into the LANs, the
    destination answering pings), the harness measures, ``teardown(ctx)``. ``prepare(ctx)``
    runs once per benchmark run before the first setup (keys, certificates).
    """

    key: ClassVar[str]
    label: ClassVar[str]
    #: Frames cross an overlay between the LANs (the plain path is routed host to host).
    overlay: ClassVar[bool] = True
    #: Short description of the configuration for the report.
    config_note: ClassVar[str] = ""

    def __init__(self) -> None:
        self.daemons: list[Daemon] = []
        self.info: dict[str, Any] = {}

    def missing(self) -> str | None:
        """Why this provider cannot run on this machine (``None``: it can)."""
        return None

    def prepare(self, ctx: BenchContext) -> None:  # noqa: B027 - optional hook
        """One-time preparation (keys, certificates); default: nothing."""

    @abstractmethod
    def setup(self, ctx: BenchContext) -> None:
        """Start both ends, bridge them into the LANs, return once the destination answers."""

    @abstractmethod
    def teardown(self, ctx: BenchContext) -> None:
        """Stop every daemon and remove every device ``setup`` made (idempotent, best effort)."""

    def source(self, ctx: BenchContext) -> str:
        """Host that runs the iperf3 client and the pings."""
        return ctx.path.a.host

    def destination(self, ctx: BenchContext) -> str:
        """Address of host b that the traffic goes to."""
        return str(ctx.path.b.lan_addr.ip)

    # -- helpers for subclasses ----------------------------------------------------------------------------

    def spawn(self, ctx: BenchContext, host: str, name: str, argv: Sequence[str], **popen: Any) -> Daemon:
        """Start a daemon in ``host``'s namespace, output to ``<work>/<name>-<host>.log``."""
        log_path = ctx.work / f"{name}-{host}.log"
        out = log_path.open("wb")
        proc = ctx.lab.spawn(host, list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **popen)
        daemon = Daemon(name=name, host=host, proc=proc, log_path=log_path, _log=out)
        self.daemons.append(daemon)
        return daemon

    def stop_daemons(self) -> None:
        for d in self.daemons:
            d.stop()

    def check_daemons(self) -> None:
        for d in self.daemons:
            if not d.alive():
                tail = d.log_text().strip().splitlines()[-5:]
                raise ProviderError(f"{d.name} in {d.host} exited {d.proc.returncode}: {' | '.join(tail)}")

    def wait_ping(self, ctx: BenchContext) -> None:
        """Until one echo from host a to the destination comes back (checks the daemons meanwhile)."""
        src, dst = self.source(ctx), self.destination(ctx)

        def answered() -> bool:
            self.check_daemons()
            return ctx.lab.ping(src, dst, count=1, timeout=0.5).ok

        wait_until(answered, ctx.ready_timeout, f"{dst} to answer {src} over {self.key}", interval=0.2)


def run(lab: Lab, host: str, *argv: str, check: bool = True, timeout: float = 10.0) -> str:
    """A bounded command in a lab host; stdout."""
    return lab.exec(host, list(argv), check=check, timeout=timeout).stdout


class PlainUnderlay(Provider):
    """(a) No overlay: host a to host b over routed NICs on their sites' wan subnets, through both
    edge routers and the internet bridge (the path every tunnel's outer packets take)."""

    key = "plain"
    label = "plain underlay (routed)"
    overlay = False
    config_note = "host-to-host routed over the underlay, no tunnel, host NIC MTU = LAN MTU"

    def setup(self, ctx: BenchContext) -> None:
        try:
            topo.add_routed_nics(ctx.lab, ctx.path)
            self.info["mtu"] = ctx.path.lan_mtu
            self.wait_ping(ctx)
        except BaseException:
            self.teardown(ctx)
            raise

    def teardown(self, ctx: BenchContext) -> None:
        try:
            topo.remove_routed_nics(ctx.lab, ctx.path)
        except LabError as exc:
            log.warning("bench.teardown", provider=self.key, error=str(exc))

    def destination(self, ctx: BenchContext) -> str:
        return str(ctx.path.b.routed.ip)


class BridgedOverlay(Provider):
    """Base of the overlays: a bridge in each VNA joins the VNA's LAN leg and the tunnel device."""

    def __init__(self) -> None:
        super().__init__()
        self._devices: list[tuple[str, str]] = []  # (host, ifname) to delete on teardown

    @abstractmethod
    def start(self, ctx: BenchContext) -> None:
        """Create the tunnel devices (ports of :data:`BRIDGE`) and start the daemons of both VNAs."""

    def ready(self, ctx: BenchContext) -> None:
        """Until the overlay carries traffic (default: host b answers a ping from host a)."""
        self.wait_ping(ctx)

    def setup(self, ctx: BenchContext) -> None:
        try:
            for me, _ in ctx.pairs():
                self.make_bridge(ctx, me)
            self.start(ctx)
            self.ready(ctx)
        except BaseException:
            self.teardown(ctx)
            raise

    def teardown(self, ctx: BenchContext) -> None:
        self.stop_daemons()
        for host, dev in reversed(self._devices):  # tunnel devices, then the bridges
            try:
                run(ctx.lab, host, "ip", "link", "del", dev, check=False)
            except LabError as exc:
                log.warning("bench.teardown", provider=self.key, host=host, dev=dev, error=str(exc))
        self._devices.clear()

    def make_bridge(self, ctx: BenchContext, side: Side) -> None:
        lab, leg = ctx.lab, ctx.lab.link(side.vna, ctx.path.lan)
        run(lab, side.vna, "ip", "link", "del", BRIDGE, check=False)  # a leftover of an aborted run
        run(lab, side.vna, "ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._devices.append((side.vna, BRIDGE))
        run(lab, side.vna, "ip", "link", "set", leg, "master", BRIDGE, "up")
        run(lab, side.vna, "ip", "link", "set", BRIDGE, "up")

    def add_port(self, ctx: BenchContext, host: str, dev: str) -> None:
        """Put ``dev`` into the bridge at the LAN MTU and bring it up."""
        run(ctx.lab, host, "ip", "link", "set", dev, "mtu", str(ctx.path.lan_mtu), "master", BRIDGE, "up")

    def add_tap(self, ctx: BenchContext, host: str, dev: str) -> None:
        """A persistent TAP device, bridged (the daemon attaches to it by name)."""
        run(ctx.lab, host, "ip", "link", "del", dev, check=False)
        run(ctx.lab, host, "ip", "tuntap", "add", "dev", dev, "mode", "tap")
        self._devices.append((host, dev))
        self.add_port(ctx, host, dev)


class KernelVxlan(BridgedOverlay):
    """(b) Kernel VXLAN between the VNAs' wan addresses (unencrypted; for trusted links)."""

    key = "vxlan"
    label = "kernel VXLAN"
    config_note = f"ip link type vxlan, VNI {VXLAN_VNI}, UDP 4789, unencrypted, no daemon (kernel CPU only)"

    def start(self, ctx: BenchContext) -> None:
        need = ctx.path.lan_mtu + 50
        if ctx.path.underlay_mtu < need:
            raise ProviderError(
                f"kernel VXLAN cannot split frames: needs underlay MTU >= {need}, lab has {ctx.path.underlay_mtu}"
            )
        for me, peer in ctx.pairs():
            local, remote = str(me.vna_wan.ip), str(peer.vna_wan.ip)
            run(ctx.lab, me.vna, "ip", "link", "del", VXLAN_DEV, check=False)
            run(
                ctx.lab,
                me.vna,
                *("ip", "link", "add", VXLAN_DEV, "type", "vxlan", "id", str(VXLAN_VNI)),
                *("local", local, "remote", remote, "dstport", "4789", "dev", "wan", "nolearning"),
            )
            self._devices.append((me.vna, VXLAN_DEV))
            self.add_port(ctx, me.vna, VXLAN_DEV)
        self.info["vni"] = VXLAN_VNI


def _openssl(*argv: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *argv], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise ProviderError(f"openssl {argv[0]} failed: {proc.stderr.strip()[:300]}")


class OpenVpnTap(BridgedOverlay):
    """(c) OpenVPN 2.6, peer-to-peer TLS (CA made with openssl, ECDSA P-256), TAP bridged into the
    LAN, data channel AES-256-GCM over UDP, no DCO (it has no TAP support)."""

    key = "openvpn"
    label = "OpenVPN TAP AES-256-GCM"
    config_note = (
        "openvpn p2p TLS (own CA, P-256), --dev-type tap, --data-ciphers AES-256-GCM, UDP, "
        f"--mssfix 0, --disable-dco, --sndbuf/--rcvbuf {UDP_SOCKET_BUFFER >> 20} MiB, defaults otherwise"
    )

    def missing(self) -> str | None:
        if sysinfo.tool("openvpn") is None:
            return "openvpn not installed (apt-get install openvpn)"
        if sysinfo.tool("openssl") is None:
            return "openssl not installed"
        return None

    def prepare(self, ctx: BenchContext) -> None:
        d = ctx.work / "openvpn"
        d.mkdir(exist_ok=True)
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=sf-bench-ca", cwd=d
        )
        for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
            (d / f"{role}.ext").write_text(
                f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage={eku}\n"
            )
            _openssl(
                "req", *ec, "-keyout", f"{role}.key", "-out", f"{role}.csr", "-subj", f"/CN=sf-bench-{role}", cwd=d
            )
            _openssl(
                *("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
                *("-out", f"{role}.crt", "-days", "2", "-extfile", f"{role}.ext"),
                cwd=d,
            )
        for f in d.glob("*.key"):
            f.chmod(0o600)

    def start(self, ctx: BenchContext) -> None:
        d = ctx.work / "openvpn"
        openvpn = sysinfo.tool("openvpn") or "openvpn"
        for (me, peer), role in zip(ctx.pairs(), ("client", "server"), strict=True):
            self.add_tap(ctx, me.vna, OPENVPN_TAP)
            other = "server" if role == "client" else "client"
            argv = [
                openvpn,
                *("--dev", OPENVPN_TAP, "--dev-type", "tap", "--proto", "udp"),
                *("--local", str(me.vna_wan.ip), "--lport", str(OPENVPN_PORT)),
                *("--remote", str(peer.vna_wan.ip), "--rport", str(OPENVPN_PORT)),
                f"--tls-{role}",
                *("--dh", "none", "--remote-cert-tls", other),
                *("--ca", str(d / "ca.crt"), "--cert", str(d / f"{role}.crt"), "--key", str(d / f"{role}.key")),
                *("--data-ciphers", "AES-256-GCM", "--data-ciphers-fallback", "AES-256-GCM"),
                *("--tun-mtu", str(ctx.path.lan_mtu), "--mssfix", "0", "--disable-dco"),
                *("--sndbuf", str(UDP_SOCKET_BUFFER), "--rcvbuf", str(UDP_SOCKET_BUFFER)),
                *("--ping", "10", "--ping-restart", "60", "--verb", "3", "--suppress-timestamps"),
            ]
            self.spawn(ctx, me.vna, "openvpn", argv)

    def ready(self, ctx: BenchContext) -> None:
        def initialised() -> bool:
            self.check_daemons()
            return all("Initialization Sequence Completed" in d.log_text() for d in self.daemons)

        wait_until(initialised, ctx.ready_timeout, "both OpenVPN ends to complete initialisation")
        ciphers = {m for d in self.daemons for m in re.findall(r"Data Channel: cipher '([^']+)'", d.log_text())}
        self.info["cipher"] = ",".join(sorted(ciphers)) or "unknown"
        if ciphers != {"AES-256-GCM"}:
            raise ProviderError(f"OpenVPN negotiated {self.info['cipher']!r}, expected AES-256-GCM")
        self.wait_ping(ctx)


class Tinc10Switch(BridgedOverlay):
    """(d) tinc 1.0 in switch mode, RSA-2048 host keys (``tincd -K``), TAP bridged into the LAN,
    AES-256-CBC + HMAC-SHA256 on the UDP packets (tinc 1.0's default would be Blowfish + SHA1)."""

    key = "tinc"
    label = "tinc 1.0 switch"
    config_note = (
        "tincd 1.0 Mode = switch, RSA-2048, Cipher = aes-256-cbc, Digest = sha256, "
        f"UDPRcvBuf/UDPSndBuf {UDP_SOCKET_BUFFER >> 20} MiB, PMTU discovery on (waited for before measuring)"
    )
    cipher = "aes-256-cbc"
    digest = "sha256"

    def missing(self) -> str | None:
        return None if sysinfo.tool("tincd") else "tincd not installed (apt-get install tinc)"

    def _dir(self, ctx: BenchContext, side: Side) -> Path:
        return ctx.work / "tinc" / side.vna

    def prepare(self, ctx: BenchContext) -> None:
        tincd = sysinfo.tool("tincd") or "tincd"
        for me, peer in ctx.pairs():
            d = self._dir(ctx, me)
            (d / "hosts").mkdir(parents=True, exist_ok=True)
            conf = [
                f"Name = {me.vna}",
                "Mode = switch",
                "DeviceType = tap",
                f"Interface = {TINC_TAP}",
                "AddressFamily = ipv4",
                f"BindToAddress = {me.vna_wan.ip}",
                f"Port = {TINC_PORT}",
                f"UDPRcvBuf = {UDP_SOCKET_BUFFER}",
                f"UDPSndBuf = {UDP_SOCKET_BUFFER}",
            ]
            if me is ctx.path.a:
                conf.append(f"ConnectTo = {peer.vna}")
            (d / "tinc.conf").write_text("\n".join(conf) + "\n")
            (d / "hosts" / me.vna).write_text(
                f"Address = {me.vna_wan.ip}\nPort = {TINC_PORT}\nCipher = {self.cipher}\nDigest = {self.digest}\n"
            )
            proc = subprocess.run(
                [tincd, "-c", str(d), "-K2048"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if proc.returncode != 0 or not (d / "rsa_key.priv").exists():
                raise ProviderError(f"tincd -K failed: {proc.stderr.strip()[:300]}")
        for me, peer in ctx.pairs():
            text = (self._dir(ctx, me) / "hosts" / me.vna).read_text()
            (self._dir(ctx, peer) / "hosts" / me.vna).write_text(text)

    def start(self, ctx: BenchContext) -> None:
        tincd = sysinfo.tool("tincd") or "tincd"
        for me, _ in reversed(list(ctx.pairs())):  # b (no ConnectTo) listens before a dials
            d = self._dir(ctx, me)
            self.add_tap(ctx, me.vna, TINC_TAP)
            argv = [tincd, "-c", str(d), "-D", "-d1", f"--pidfile={d / 'tincd.pid'}"]
            self.spawn(ctx, me.vna, "tincd", argv)
            if me is ctx.path.b:
                wait_until(lambda: "Ready" in self.daemons[-1].log_text(), ctx.ready_timeout, "tincd to listen")
        self.info["cipher"] = f"{self.cipher}+{self.digest}"

    def _pmtu(self, daemon: Daemon, peer: str) -> tuple[int, int, int] | None:
        """(pmtu, min, max) tincd knows for ``peer`` (SIGUSR2 makes it log its node list)."""
        found = re.findall(rf"^\s*{re.escape(peer)} at .* pmtu (\d+) \(min (\d+) max (\d+)\)", daemon.log_text(), re.M)
        if not found:
            return None
        pmtu, low, high = (int(x) for x in found[-1])
        return pmtu, low, high

    def ready(self, ctx: BenchContext) -> None:
        """Until host b answers, then until path MTU discovery lets full frames go over UDP: tinc 1.0
        sends a frame longer than the peer's discovered minimum MTU over the TCP meta connection."""
        self.wait_ping(ctx)
        want = ctx.path.lan_mtu + 14  # Ethernet frame of a full-size LAN packet
        peers = {ctx.path.a.vna: ctx.path.b.vna, ctx.path.b.vna: ctx.path.a.vna}

        def discovered() -> bool:
            self.check_daemons()
            for d in self.daemons:
                d.proc.send_signal(signal.SIGUSR2)
            time.sleep(0.2)
            found = {d.host: self._pmtu(d, peers[d.host]) for d in self.daemons}
            self.info["pmtu"] = {h: (f"{v[0]} (min {v[1]} max {v[2]})" if v else None) for h, v in found.items()}
            return all(v is not None and v[1] >= want for v in found.values())

        wait_until(discovered, ctx.ready_timeout + 20, f"tinc path MTU discovery to reach {want}", interval=0.5)


class SkyferryTunnel(BridgedOverlay):
    """(e)/(f) Skyferry's own encrypted tunnel, one ``python -m vna_agent.dataplane run`` endpoint
    per VNA (side b listens, side a connects); the endpoint opens its TAP and bridges it itself."""

    mode: ClassVar[str]
    #: TAP with VNET_HDR/TSO: the endpoint reads and seals up to 64 KiB superpackets instead of frames.
    offload: ClassVar[bool] = True
    #: Frames move in the native thread once keyed (``SKYFERRY_FASTPATH``); False: the Python data path.
    native: ClassVar[bool] = True

    def missing(self) -> str | None:
        main = REPO / "vna_agent" / "dataplane" / "__main__.py"
        if not main.exists() or '"run"' not in main.read_text():
            return "pending: vna_agent.dataplane has no runnable endpoint (python -m vna_agent.dataplane run)"
        return None

    def _cli(self, *argv: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-m", "vna_agent.dataplane", "--log-level", "WARNING", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise ProviderError(f"vna_agent.dataplane {argv[0]} failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout.strip()

    def _dir(self, ctx: BenchContext) -> Path:
        return ctx.work / "skyferry"

    def prepare(self, ctx: BenchContext) -> None:
        d = self._dir(ctx)
        d.mkdir(exist_ok=True)
        for me, _ in ctx.pairs():
            key = d / f"{me.vna}.key"
            if not key.exists():
                (d / f"{me.vna}.pub").write_text(self._cli("genkey", str(key)).splitlines()[-1])

    def endpoint_config(self, ctx: BenchContext, me: Side, peer: Side) -> dict[str, Any]:
        d = self._dir(ctx)
        server = ctx.path.b
        cfg: dict[str, Any] = {
            "name": f"bench-{self.mode}",
            "mode": self.mode,
            "bridge": BRIDGE,
            "tap": SKYFERRY_TAP,
            "mtu": ctx.path.lan_mtu,
            "offload": self.offload,
            "private_key_file": str(d / f"{me.vna}.key"),
            "peer_public_key": (d / f"{peer.vna}.pub").read_text().strip(),
            "status_file": str(d / f"{self.mode}-{me.vna}.status.json"),
            "status_interval": 0.2,
        }
        if me is server:
            cfg["listen"] = f"{me.vna_wan.ip}:{SKYFERRY_PORT}"
        else:
            cfg["connect"] = f"{server.vna_wan.ip}:{SKYFERRY_PORT}"
            if self.mode == "datagram":
                cfg["bind"] = f"{me.vna_wan.ip}:0"
        return cfg

    def start(self, ctx: BenchContext) -> None:
        d = self._dir(ctx)
        # the server (side b) first, then the client
        for me, peer in reversed(list(ctx.pairs())):
            cfg = self.endpoint_config(ctx, me, peer)
            Path(cfg["status_file"]).unlink(missing_ok=True)
            path = d / f"{self.mode}-{me.vna}.json"
            path.write_text(json.dumps(cfg, indent=2))
            path.chmod(0o600)
            run(ctx.lab, me.vna, "ip", "link", "del", SKYFERRY_TAP, check=False)
            self._devices.append((me.vna, SKYFERRY_TAP))  # the endpoint removes it; in case it does not
            argv = [sys.executable, "-m", "vna_agent.dataplane", "--log-level", "WARNING", "run", str(path)]
            env = {**os.environ, "PYTHONPATH": str(REPO), "SKYFERRY_FASTPATH": "1" if self.native else "0"}
            self.spawn(ctx, me.vna, f"skyferry-{self.mode}", argv, cwd=REPO, env=env)
            if me is ctx.path.b:
                time.sleep(0.3)

    def _status(self, ctx: BenchContext, side: Side) -> dict[str, Any] | None:
        try:
            data = json.loads((self._dir(ctx) / f"{self.mode}-{side.vna}.status.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def ready(self, ctx: BenchContext) -> None:
        def up() -> bool:
            self.check_daemons()
            return all((st := self._status(ctx, s)) is not None and st.get("state") == "up" for s, _ in ctx.pairs())

        wait_until(up, ctx.ready_timeout, f"both Skyferry {self.mode} endpoints to report state up")
        self.wait_ping(ctx)
        st = self._status(ctx, ctx.path.a) or {}
        self.info["offload"] = st.get("offload")
        self.info["fastpath"] = st.get("fastpath")
        if bool(st.get("fastpath")) != self.native:
            raise ProviderError(f"expected fastpath={self.native}, the endpoint reports {st.get('fastpath')}")
        mtu = st.get("mtu")
        if isinstance(mtu, dict):
            self.info["mtu_report"] = {k: mtu.get(k) for k in ("path_mtu", "overlay_mtu", "unsplit_mtu", "strategy")}

    def teardown(self, ctx: BenchContext) -> None:
        for side, _ in ctx.pairs():
            st = self._status(ctx, side)
            if st is not None:
                self.info.setdefault("final_status", {})[side.vna] = {
                    k: st.get(k)
                    for k in ("state", "drops", "handshakes", "connects", "disconnects", "frames_out", "frames_in")
                    if k in st
                }
        super().teardown(ctx)


class SkyferryStream(SkyferryTunnel):
    key = "stream"
    label = "Skyferry stream (TCP)"
    mode = "stream"
    config_note = (
        "python -m vna_agent.dataplane run, mode stream, encrypted, TAP offload, native fast path (dataplane defaults)"
    )


class SkyferryDatagram(SkyferryTunnel):
    key = "datagram"
    label = "Skyferry datagram (UDP)"
    mode = "datagram"
    config_note = (
        "python -m vna_agent.dataplane run, mode datagram, encrypted, TAP offload, native fast path "
        "(dataplane defaults)"
    )


class SkyferryStreamFrames(SkyferryStream):
    key = "stream-frames"
    label = "Skyferry stream, no offload"
    offload = False
    config_note = "as Skyferry stream but offload: false (one frame per TAP read, like OpenVPN and tinc)"


class SkyferryDatagramFrames(SkyferryDatagram):
    key = "datagram-frames"
    label = "Skyferry datagram, no offload"
    offload = False
    config_note = "as Skyferry datagram but offload: false (one frame per TAP read, like OpenVPN and tinc)"


class SkyferryStreamPython(SkyferryStream):
    key = "stream-py"
    label = "Skyferry stream, Python data path"
    native = False
    config_note = "as Skyferry stream but SKYFERRY_FASTPATH=0 (frames forwarded by the Python event loop)"


class SkyferryDatagramPython(SkyferryDatagram):
    key = "datagram-py"
    label = "Skyferry datagram, Python data path"
    native = False
    config_note = "as Skyferry datagram but SKYFERRY_FASTPATH=0 (frames forwarded by the Python event loop)"


PROVIDERS: dict[str, type[Provider]] = {
    p.key: p
    for p in (
        PlainUnderlay,
        KernelVxlan,
        OpenVpnTap,
        Tinc10Switch,
        SkyferryStream,
        SkyferryDatagram,
        SkyferryStreamFrames,
        SkyferryDatagramFrames,
        SkyferryStreamPython,
        SkyferryDatagramPython,
    )
}
#: What a run measures unless told otherwise: (a) to (f) of issue 4.
DEFAULT_PROVIDERS = ("plain", "vxlan", "openvpn", "tinc", "stream", "datagram")
