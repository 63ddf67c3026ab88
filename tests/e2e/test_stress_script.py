"""scripts/stress_test.py --quick: the benchmark keeps working (its numbers are not judged here).

Speed lives in the script's own output, measured against "off" in the same run; this test
only checks that a real quick run writes the JSON and the table with every field, and that
the values are sane (positive, ordered, every snapshot accounted for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "stress_test.py"

ROW_FIELDS = {
    "mode", "every", "repeats", "steps", "mean_ms", "p50_ms", "p99_ms", "max_ms", "mean_x_off", "p50_x_off",
    "p99_x_off", "max_x_off", "collect_taken_mean_ms", "collect_x_off", "hook_collect_mean_ms", "hook_x_floor",
    "trainer_peak_mb", "trainer_added_mb", "start_s", "stop_s", "delivered", "built_by",
}
TELEMETRY_MODES = ("drop", "block", "sync", "budget", "worker-drop", "worker-block")
PRESET_FIELDS = {
    "preset", "num_params", "state_bytes", "slot_bytes", "floor_ms", "off_mean_ms", "idle_hook_added_ns", "rows",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    out = tmp_path_factory.mktemp("stress")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "stress.json").read_text()), (out / "stress.md").read_text(), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_writes_every_field(quick_run: tuple[dict[str, Any], str, str]) -> None:
    """Both presets get an off baseline, a floor, and a row per mode (drop, block, sync, budget,
    worker-drop, worker-block) and interval with every reported field; rows whose records the
    worker built report its memory, and the worker-* rows are the worker's, sync's the trainer's."""
    result, _, _ = quick_run
    assert {p["preset"] for p in result["presets"]} == {"conv", "wide"}
    assert result["env"]["threads"] >= 1 and result["env"]["quick"] is True
    for preset in result["presets"]:
        assert not PRESET_FIELDS - preset.keys()
        modes = {(r["mode"], r["every"]) for r in preset["rows"]}
        assert {("off", None), ("floor", 1)} | {(m, e) for m in TELEMETRY_MODES for e in (2,)} == modes
        for row in preset["rows"]:
            assert not ROW_FIELDS - row.keys(), row["mode"]
        async_rows = [r for r in preset["rows"] if r["built_by"] == ["worker"]]
        assert all({"worker_peak_mb", "worker_added_mb", "snapshots_dropped"} <= r.keys() for r in async_rows)
        assert {r["mode"] for r in async_rows} >= {"worker-drop", "worker-block"}
        assert all(r["built_by"] == ["trainer"] for r in preset["rows"] if r["mode"] == "sync")
    assert result["targets"] and all({"target", "where", "value", "limit", "met"} <= t.keys() for t in result["targets"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_values_are_sane(quick_run: tuple[dict[str, Any], str, str]) -> None:
    """Latencies are positive and ordered, the hook is cheap between collections, no snapshot is lost."""
    result, _, _ = quick_run
    for preset in result["presets"]:
        assert preset["slot_bytes"] == preset["state_bytes"] > 0
        assert preset["floor_ms"] > 0 and preset["off_mean_ms"] > 0
        assert 0 <= preset["idle_hook_added_ns"] < 1e6  # a modulo, not a millisecond (timing is not judged)
        for row in preset["rows"]:
            assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
            assert row["mean_ms"] > 0 and row["steps"] > 0
            if row["mode"] in TELEMETRY_MODES:
                assert row["start_s"] > 0 and row["stop_s"] >= 0
                assert row["snapshots_taken"] >= 1 and row["all_clean"] is True
                assert row["collections"] > 0
                assert 0 < row["delivered"] <= 1
            else:
                assert row["delivered"] is None
            if row["mode"] in ("sync", "block", "worker-block"):  # inline, or waiting for a slot: nothing dropped, all delivered
                assert row["snapshots_dropped"] == 0 and row["delivered"] == 1
                assert row["hook_collect_mean_ms"] > 0
            if row["mode"] in ("drop", "budget", "worker-drop") and row["dropped_in_measured"] < row["collections"]:
                assert row["hook_collect_mean_ms"] > 0  # (a quick step is shorter than the worker's work)
            if row["built_by"] == ["worker"]:
                assert row["worker_peak_mb"] > 0
    for seg in result["segments"]:
        if "summary" in seg:  # every snapshot taken was written by stop(), and the share delivered is what is on disk
            assert seg["summary"]["records_written"] == seg["summary"]["snapshots_taken"] == seg["record_count"]
            assert seg["delivered"] == seg["records_in_window"] / seg["collections"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_prints_one_line_per_segment_and_a_table(quick_run: tuple[dict[str, Any], str, str]) -> None:
    """The console shows a summary line per segment; stress.md holds a table per preset and the targets."""
    result, md, stdout = quick_run
    assert sum(1 for line in stdout.splitlines() if " steps mean " in line) == len(result["segments"])
    assert md.count("| mode | every |") == 2 and md.count("| every | drop (built by ") == 2
    assert "block / sync (mean)" in md and "| delivered |" in md
    assert "Targets (issue 27" in md and "python scripts/stress_test.py --quick" in md
    targets = {t["target"] for t in result["targets"]}
    assert "budget 0.05: mean step / off (every 2)" in targets
    assert any(t.startswith("default (drop, budget auto 0.10): mean step / off (every 2, ") for t in targets)
