"""The agent's state file: round trip, atomic replacement, a bad file moved aside (no lab needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bus.errors import SkyferryError
from bus.vna import PeerKey, SegmentJoin, SwitchCreate, TunnelAdd
from vna_agent.state import (
    STATE_FILE,
    DesiredState,
    JoinRecord,
    StateFileCorrupt,
    StateStore,
    StateWriteFailed,
)

KEY = "A" * 43 + "="


def sample(vna: str = "vna1") -> DesiredState:
    return DesiredState(
        vna_id=vna,
        switches={"ov1": SwitchCreate(overlay_id="ov1", mtu=1400)},
        joins=[JoinRecord(port="lan1", request=SegmentJoin(overlay_id="ov1", interface="lan1"))],
        tunnels={
            "t1": TunnelAdd(
                overlay_id="ov1",
                tunnel_id="t1",
                role="client",
                connect="192.0.2.1:7000",
                peer=PeerKey(name="vna2", public_key=KEY),
            )
        },
    )


def test_a_saved_state_reads_back_equal(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state", "vna1")
    assert store.load().state == DesiredState(vna_id="vna1")  # no file yet: empty, no error
    store.save(sample())
    again = StateStore(tmp_path / "state", "vna1").load()
    assert again.state == sample() and again.error is None
    assert list(again.state.tunnels) == ["t1"]


def test_a_save_replaces_the_file_by_rename_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "vna1")
    store.save(DesiredState(vna_id="vna1"))
    inode = os.stat(store.path).st_ino
    store.save(sample())
    assert os.stat(store.path).st_ino != inode  # a new file renamed over the old, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path, "vna1")
    store.save(sample())
    before = store.path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StateWriteFailed, match="No space left"):
        store.save(DesiredState(vna_id="vna1"))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # the temp file is gone too
    assert isinstance(StateWriteFailed("x"), SkyferryError) and StateWriteFailed.retryable


def test_a_temp_file_left_by_a_crash_mid_write_is_ignored_and_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "vna1")
    store.save(sample())
    (tmp_path / f".{STATE_FILE}.abc123.tmp").write_text('{"version": 1, "vna_id": "vn')  # cut short
    loaded = store.load()
    assert loaded.state == sample() and loaded.error is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


@pytest.mark.parametrize(
    "content",
    [
        b'{"version": 1, "vna_id": "vna1", "switches": {"ov1": {"overlay_id": "ov1", "mt',  # truncated
        b"\x00\x00\x00\x00",  # zeroed blocks after a power loss
        b'{"version": 1, "vna_id": "vna1", "switches": {"ov1": {"overlay_id": "ov1", "mtu": 10}}}',  # invalid mtu
        b'{"version": 99, "vna_id": "vna1"}',  # from a newer agent
        b'{"version": 1, "vna_id": "other"}',  # another VNA's state dir
    ],
)
def test_a_corrupt_file_is_moved_aside_loudly_and_the_agent_starts_empty(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    store = StateStore(tmp_path, "vna1")
    with pytest.raises(StateFileCorrupt):
        store.read()
    with capture_logs() as logs:
        loaded = store.load()
    assert loaded.state == DesiredState(vna_id="vna1")
    assert isinstance(loaded.error, StateFileCorrupt) and isinstance(loaded.error, SkyferryError)
    assert loaded.quarantined is not None and loaded.quarantined.name.startswith(f"{STATE_FILE}.corrupt-")
    assert loaded.quarantined.read_bytes() == content  # kept, byte for byte, for the operator
    assert not store.path.exists()
    (line,) = [e for e in logs if e["event"] == "state_file_corrupt"]
    assert line["log_level"] == "error" and line["moved_aside"] == str(loaded.quarantined)
    store.save(sample())  # the next command writes a fresh file next to the kept one
    assert store.load().state == sample()
    assert loaded.quarantined.read_bytes() == content


def test_an_unreadable_file_that_cannot_be_moved_aside_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path, "vna1")
    store.path.mkdir()  # reading a directory fails with an OSError

    def refuse(src: object, dst: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with capture_logs() as logs, pytest.raises(StateFileCorrupt, match="cannot be moved aside"):
        store.load()
    assert [e["log_level"] for e in logs if e["event"] == "state_file_corrupt"] == ["error"]
