"""The records file: strict JSON lines, non-finite values, torn tails."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from train_telemetry.records import encode_record, read_records, repair_torn_tail


def write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "telemetry.jsonl").write_bytes(b"".join(encode_record(r) for r in records))
    return path


def test_nonfinite_values_round_trip_and_lines_stay_strict_json(tmp_path: Path) -> None:
    """NaN/+-Inf are written as strings json.loads accepts and read back as floats."""
    run = write_run(tmp_path / "r", [{"batch_idx": 1, "gradient_norm": {"overall": math.nan, "a": math.inf, "b": -math.inf, "c": 1.5}}])
    line = (run / "telemetry.jsonl").read_text()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    (rec,) = read_records(run)
    g = rec["gradient_norm"]
    assert math.isnan(g["overall"]) and g["a"] == math.inf and g["b"] == -math.inf and g["c"] == 1.5


def test_a_torn_last_line_is_skipped_and_repaired(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial line: the reader skips it and repair truncates it."""
    run = write_run(tmp_path / "r", [{"batch_idx": i} for i in range(3)])
    whole = (run / "telemetry.jsonl").stat().st_size
    with open(run / "telemetry.jsonl", "ab") as f:
        f.write(encode_record({"batch_idx": 3, "x": [1, 2, 3]})[:9])
    assert [r["batch_idx"] for r in read_records(run)] == [0, 1, 2]
    assert repair_torn_tail(run / "telemetry.jsonl") == 9
    assert (run / "telemetry.jsonl").stat().st_size == whole


def test_a_whole_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    """A last record that lacks only its newline is still read."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "telemetry.jsonl").write_bytes(encode_record({"batch_idx": 1}) + b'{"batch_idx": 2}')
    assert [r["batch_idx"] for r in read_records(run)] == [1, 2]


def test_a_missing_run_says_what_was_expected(tmp_path: Path) -> None:
    """Reading a directory without records names the file it looked for."""
    with pytest.raises(FileNotFoundError, match="telemetry.jsonl"):
        read_records(tmp_path)
