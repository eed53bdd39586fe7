"""A small run of the event-store benchmark: its correctness checks hold (timings are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_events as be

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def backends() -> tuple[str, ...]:
    return ("sqlite", "postgres") if await be.pg_reachable(PG_URL) else ("sqlite",)


async def test_small_run_checks_hold(tmp_path: Path, backends: tuple[str, ...]) -> None:
    cfg = be.Config(
        events=500,
        events_always=300,
        repeat=1,
        aggregates=40,
        writers=2,
        inflight=4,
        paced_rates=(1_000,),
        paced_seconds=0.3,
        sync=("always", "2m"),
        backends=backends,
        pg_url=PG_URL,
        commands=40,
        clients=2,
        sample=6,
        results_dir=None,
    )
    result = await be.run_benchmark(cfg)
    rep = result["repeats"][0]
    for sync, events in (("always", 300), ("2m", 500)):
        for backend in backends:
            run = rep[be.run_key(backend, sync)]
            checks = run["checks"]
            assert checks["stream"] == {"messages": events, "last_seq": events, "ok": True}
            assert checks["conflict"]["refused"] == {"first_position": True, "zero": True}
            assert checks["conflict"]["stream_unchanged"]
            assert checks["folds"] == {"checked": 6, "ok": True, "mismatches": []}
            assert checks["rebuild"]["ok"], checks["rebuild"]
            assert checks["rebuild"]["events_rows"] == [events, events]
            assert checks["rebuild"]["count_ok"]
            assert checks["lag_matched"]
            assert checks["ok"]
            assert run["append"]["events"] == events and run["raw"]["events"] == events
            assert run["store_to_raw"] > 0
            assert run["catch_up"]["per_s"] > 0
            for paced in run["paced"]:  # every paced append's commit was seen by the hook
                assert paced["lag"]["events"] == paced["events"] > 0
            assert run["rebuild"]["events"] == events
        if sync == "always":
            assert any(p["kind"] == "sustain" for p in run["paced"])
    commands = rep["commands"]
    assert commands["commands"] == 40
    assert commands["checks"]["stale_refused"]
    assert commands["checks"]["stream_messages"] == commands["checks"]["expected_messages"]
    assert result["summary"]["checks_ok"]
    assert "sqlite@2m.append_per_s" in result["summary"]
    assert "sqlite@always.store_to_raw" in result["summary"]

    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    be.write_section(out, be.render_markdown(result))
    be.write_section(out, be.render_markdown(result))  # replaced, not appended
    text = out.read_text()
    assert text.count(be.MARK_START) == 1 and text.count(be.MARK_END) == 1
    assert "keep me" in text and "<!-- other:end -->" in text
    assert "all passed" in text


def test_write_section_creates_the_file(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    be.write_section(out, f"{be.MARK_START}\nfigures\n{be.MARK_END}\n")
    text = out.read_text()
    assert text.startswith("# Skyferry benchmarks") and "figures" in text


def test_percentiles() -> None:
    values = [float(i) for i in range(1, 101)]
    assert be.percentile(values, 50) == 50.0
    assert be.percentile(values, 99) == 99.0
    assert be.dist_ms([0.001, 0.002]) == {"p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 2.0}
