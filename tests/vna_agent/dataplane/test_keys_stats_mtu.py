"""Keys and allow-list, frame accounting, MTU report, endpoint config."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from vna_agent.dataplane.endpoint import EndpointConfig, parse_hostport
from vna_agent.dataplane.errors import KeyFileError, UnknownPeer
from vna_agent.dataplane.keys import Peer, PeerAllowList, PublicKey, StaticKeyPair, generate_psk, load_psk, save_psk
from vna_agent.dataplane.mtu import report
from vna_agent.dataplane.stats import GSO_TCPV4, gso_segments, parse_frame
from vna_agent.dataplane.tunnel import Role, TunnelMode
from vna_agent.dataplane.wire import VNET_HDR


def test_key_files_round_trip_with_0600(tmp_path: Path) -> None:
    key = StaticKeyPair.generate()
    path = tmp_path / "vna.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = StaticKeyPair.load(path)
    assert loaded.public == key.public
    assert PublicKey.from_b64(key.public.b64()) == key.public
    psk = generate_psk()
    save_psk(psk, tmp_path / "psk")
    assert load_psk(tmp_path / "psk") == psk


def test_key_files_refused_when_loose_or_malformed(tmp_path: Path) -> None:
    path = tmp_path / "vna.key"
    StaticKeyPair.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="group/others"):
        StaticKeyPair.load(path)
    with pytest.raises(KeyFileError):
        PublicKey.from_b64("not base64!!")
    with pytest.raises(KeyFileError):
        PublicKey.from_b64("AAAA")
    with pytest.raises(KeyFileError):
        StaticKeyPair.load(tmp_path / "missing")


def test_allow_list() -> None:
    a, b = StaticKeyPair.generate(), StaticKeyPair.generate()
    allow = PeerAllowList([Peer("a", a.public)])
    assert a.public in allow and b.public not in allow
    assert allow.require(a.public).name == "a"
    with pytest.raises(UnknownPeer):
        allow.require(b.public)
    allow.remove(a.public)
    assert len(allow) == 0


def _tcp_superpacket(segments: int, mss: int = 1448) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    ip = bytes([0x45, 0]) + b"\0" * 7 + bytes([6]) + b"\0\0" + bytes([10, 77, 0, 1, 10, 77, 0, 2])
    tcp = b"\0" * 12 + bytes([0x80]) + b"\0" * 19  # data offset 8 words = 32 bytes
    vnet = VNET_HDR.pack(1, GSO_TCPV4, 14 + 20 + 32, mss, 14 + 20, 16)
    return vnet + eth + ip + tcp + b"x" * (segments * mss - 100)


def test_gso_segments_from_virtio_header() -> None:
    assert gso_segments(_tcp_superpacket(44), True) == 44
    assert gso_segments(_tcp_superpacket(1), True) == 1
    assert gso_segments(b"\0" * 10 + b"f" * 60, True) == 1
    assert gso_segments(_tcp_superpacket(44), False) == 1


def test_parse_frame_for_flow_hook() -> None:
    info = parse_frame(_tcp_superpacket(3), True)
    assert info is not None
    assert (info.src_mac, info.dst_mac) == ("04:04:04:04:04:04", "02:02:02:02:02:02")
    assert (info.src_ip, info.dst_ip, info.proto, info.segments) == ("10.77.0.1", "10.77.0.2", 6, 3)
    arp = b"\xff" * 6 + b"\x02" * 6 + struct.pack("!H", 0x0806) + b"\0" * 28
    info = parse_frame(arp, False)
    assert info is not None and info.ethertype == 0x0806 and info.src_ip is None
    assert parse_frame(b"short", False) is None


def test_mtu_report() -> None:
    dg = report("datagram", 1500)
    # 1500 - 20 IP - 8 UDP - 16 header - 16 tag - 10 virtio - 14 Ethernet
    assert dg.unsplit_mtu == 1416 and dg.overlay_mtu == 65535 and dg.strategy == "split-records-in-tunnel"
    assert report("plain-datagram", 1500, encrypted=False, vnet=False).unsplit_mtu == 1442
    assert report("vxlan", 1500).overlay_mtu == 1450
    assert report("vxlan", 1500, ipv6=True).overlay_mtu == 1430
    st = report("stream", 1500)
    assert st.overlay_mtu == 65535 and st.strategy == "tcp-stream"
    with pytest.raises(ValueError):
        report("carrier-pigeon", 1500)


def test_endpoint_config_validation() -> None:
    k = StaticKeyPair.generate()
    cfg = EndpointConfig.model_validate(
        {"mode": "stream", "connect": "[::1]:7000", "private_key": k.private_b64(), "peer_public_key": k.public.b64()}
    )
    tc = cfg.tunnel_config()
    assert tc.role == Role.CLIENT and tc.address == ("::1", 7000) and tc.mode == TunnelMode.STREAM
    with pytest.raises(ValueError):
        EndpointConfig.model_validate({"mode": "stream", "connect": "h:1"})  # no keys
    with pytest.raises(ValueError):
        EndpointConfig.model_validate({"mode": "plain", "connect": "h:1", "listen": "h:2"})
    with pytest.raises(ValueError):
        EndpointConfig.model_validate({"mode": "vxlan", "bridge": "br0"})
    assert parse_hostport("10.0.0.1:80") == ("10.0.0.1", 80)
    with pytest.raises(ValueError):
        parse_hostport("nohost")


def test_cli_keys_and_mtu(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from vna_agent.dataplane import __main__ as cli

    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)  # keep the session's logging set-up
    main = cli.main

    key = tmp_path / "k"
    assert main(["--log-level", "ERROR", "genkey", str(key)]) == 0
    pub = capsys.readouterr().out.strip()
    assert main(["--log-level", "ERROR", "pubkey", str(key)]) == 0
    assert capsys.readouterr().out.strip() == pub == StaticKeyPair.load(key).public.b64()
    assert main(["--log-level", "ERROR", "mtu", "--mode", "datagram", "--path-mtu", "9000"]) == 0
    assert '"unsplit_mtu": 8916' in capsys.readouterr().out
    os.chmod(key, 0o644)
    assert main(["--log-level", "ERROR", "pubkey", str(key)]) == 1
