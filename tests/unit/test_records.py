"""The records file: strict JSON lines, non-finite values, torn tails."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from train_telemetry.records import (
    CORE_KEYS,
    GROUP_FAMILIES,
    OVERALL,
    RecordError,
    decode_record,
    encode_record,
    error_entry,
    nonfinite_keys,
    read_records,
    repair_torn_tail,
    validate_record,
)
from train_telemetry.testing import PATHOLOGIES, add_metric, make_records, make_resumed_records


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


@pytest.mark.parametrize("pathology", sorted(PATHOLOGIES))
def test_synthetic_records_match_the_schema_after_a_round_trip(pathology: str) -> None:
    """Every synthetic record, with layers and a user metric, validates as written and as read back."""
    records = add_metric(
        make_records(pathology, n=6, layers=True), "mean_abs_weight", lambda r: {OVERALL: 0.5, "head": {"w": 1}}
    )
    for record in records:
        validate_record(record)
        validate_record(decode_record(encode_record(record)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_idx": "3"}, r"Expected `int`, got `str` - at `\$.batch_idx`"),
        ({"train": {"loss": "low"}}, r"at `\$.train.loss`"),
        ({"errors": [{"where": "holdout_logits"}]}, r"missing required field `type` - at `\$.errors\[0\]`"),
        ({"my_metric": [1.0, 2.0]}, r"\$.my_metric: a metric's value must be a dict"),
        ({"my_metric": {"a": {"b": "high"}}}, r"\$.my_metric.a.b: expected a number"),
        ({"my_metric": {"a": True}}, r"\$.my_metric.a: expected a number"),
        ({"segment": "1"}, r"Expected `int`, got `str` - at `\$.segment`"),
        ({"restarts": 1.5}, r"Expected `int`, got `float` - at `\$.restarts`"),
    ],
)
def test_validate_record_names_the_bad_key(change: dict, message: str) -> None:
    """A record that breaks the schema raises RecordError naming the key path."""
    record = make_records(n=2)[-1] | change
    with pytest.raises(RecordError, match=message):
        validate_record(record)


def test_a_record_missing_a_core_key_is_rejected() -> None:
    """batch_idx, epoch, seq, timestamp, time and schema are required."""
    record = make_records(n=2)[-1]
    del record["seq"]
    with pytest.raises(RecordError, match="seq"):
        validate_record(record)
    assert {"batch_idx", "layers", "activations", *GROUP_FAMILIES} <= CORE_KEYS


def test_nonfinite_keys_covers_any_metric_and_skips_lists_and_bookkeeping() -> None:
    """NaN/Inf anywhere in a metric dict is named by its dotted path; logits lists and telemetry are not scanned."""
    record = make_records(n=2)[-1]
    record["gradient_norm"]["head"] = math.inf
    record["gradient_norm"][OVERALL] = math.inf
    record["train"]["loss"] = math.nan
    record["holdout_logits"]["loss"] = math.nan
    record["holdout_logits"]["logits"][0] = [math.nan, 1.0]
    record["telemetry"]["worker_lag_ms"] = math.nan
    record["time"] = math.nan
    record["layers"] = {"gradient_norm": {"fc1": -math.inf, "fc2": 1.0}}
    record["my_metric"] = {"a": {"b": math.nan}, "c": None}
    assert nonfinite_keys(record) == [
        "gradient_norm.overall",
        "gradient_norm.head",
        "train.loss",
        "holdout_logits.loss",
        "layers.gradient_norm.fc1",
        "my_metric.a.b",
    ]


def test_error_entry_carries_where_type_and_message() -> None:
    """An errors entry names where it failed, the exception type and its message."""
    assert error_entry("holdout_logits", KeyError("img1")) == {
        "where": "holdout_logits",
        "type": "KeyError",
        "message": "'img1'",
    }


def test_resume_and_restart_keys_are_bookkeeping_in_the_schema() -> None:
    """segment and restarts validate as core keys and are never scanned for NaN."""
    records = make_resumed_records(n=4, resume_at=2, n_after=3, restart_at=1)
    assert [r["segment"] for r in records] == [0] * 4 + [1] * 3
    assert [r.get("restarts", 0) for r in records] == [0] * 5 + [1] * 2
    assert [r["seq"] for r in records] == list(range(7))
    for record in records:
        validate_record(record)
        validate_record(decode_record(encode_record(record)))
        assert {"segment", "restarts"} <= CORE_KEYS
        assert not any(k.split(".")[0] in {"segment", "restarts"} for k in nonfinite_keys(record))
