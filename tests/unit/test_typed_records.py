"""Typed records: one decoder from the records file to analysis, checked against the schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from msgspec import UNSET

from train_telemetry.analysis import load_run, render_report, report_data
from train_telemetry.analysis.watch import RecordFollower
from train_telemetry.records import (
    RECORDS_FILE,
    ErrorEntry,
    HoldoutLogits,
    Record,
    RecordError,
    TelemetryCost,
    TrainMetrics,
    TypedRecord,
    decode_record,
    decode_typed_record,
    encode_record,
    error_entry,
    read_records,
    read_typed_records,
    to_strict_json_value,
)
from train_telemetry.testing import (
    PATHOLOGIES,
    add_metric,
    make_meta,
    make_records,
    make_resumed_records,
    write_run,
)


def _strict(value: object) -> str:
    """JSON text that tells 1 from 1.0 and keeps key order: equal text, equal record."""
    return json.dumps(to_strict_json_value(value))


def _lines(records: list[dict]) -> bytes:
    return b"".join(encode_record(r) for r in records)


@pytest.mark.parametrize("pathology", sorted(PATHOLOGIES))
def test_a_typed_record_gives_back_the_line_as_read_records_does(tmp_path: Path, pathology: str) -> None:
    """to_dict() of every decoded record equals read_records' dict: keys, their order, values and int/float."""
    records = add_metric(
        make_records(pathology, n=6, layers=True), "mean_abs_weight", lambda r: {"overall": r["seq"], "head": {"w": 0.5}}
    )
    directory = write_run(tmp_path / "run", records)
    plain, typed = read_records(directory), read_typed_records(directory)
    assert len(typed) == len(plain) == 6
    for as_dict, record in zip(plain, typed, strict=True):
        assert _strict(record.to_dict()) == _strict(as_dict)
        assert list(record) == list(as_dict)


def test_core_keys_are_typed_and_other_keys_are_metrics() -> None:
    """The core keys decode to the schema's types; a user metric's key lands in metrics, untouched."""
    (record,) = add_metric(make_records(n=5, layers=True)[3:4], "my_metric", lambda r: {"a": {"b": 2}})
    record["errors"] = [error_entry("activations", KeyError("fc1"))]
    typed = decode_typed_record(encode_record(record))
    assert isinstance(typed, Record)
    assert isinstance(typed.holdout_logits, HoldoutLogits)
    assert isinstance(typed.train, TrainMetrics)
    assert isinstance(typed.telemetry, TelemetryCost)
    assert typed.errors and all(isinstance(e, ErrorEntry) for e in typed.errors)
    assert typed.metrics == {"my_metric": {"a": {"b": 2}}}
    assert "my_metric" not in Record.__struct_fields__
    # Counts stay ints beside the percentages (what is written is what is read).
    assert typed.batch_stats is not UNSET and type(typed.batch_stats["batch_size"]) is int


def test_nan_and_inf_markers_come_back_as_floats_in_typed_fields() -> None:
    """The "NaN"/"Infinity"/"-Infinity" strings of a line are floats in the typed record."""
    record = make_records(n=2)[-1]
    record["gradient_norm"]["head"] = math.nan
    record["train"]["loss"] = math.inf
    record["holdout_logits"]["loss"] = -math.inf
    line = encode_record(record)
    assert b'"NaN"' in line and b'"Infinity"' in line and b'"-Infinity"' in line
    typed = decode_typed_record(line)
    assert typed.gradient_norm is not UNSET and math.isnan(typed.gradient_norm["head"] or 0.0)
    assert typed.train is not UNSET and typed.train.loss == math.inf
    assert typed.holdout_logits is not UNSET and typed.holdout_logits.loss == -math.inf


def test_a_dict_decodes_as_its_line_does() -> None:
    """decode_typed_record takes a line or a dict (read_records' or json.loads'), with the same result."""
    record = make_records(n=3)[-1]
    record["weight_norm"]["head"] = math.nan
    line = encode_record(record)
    from_line = decode_typed_record(line)
    for data in (json.loads(line), decode_record(line)):
        assert _strict(decode_typed_record(data).to_dict()) == _strict(from_line.to_dict())


def test_a_record_of_an_older_version_loads_with_its_fields_unset(tmp_path: Path) -> None:
    """Only the required keys (an old writer, every metric off): the optional fields are UNSET and the report renders."""
    old = [
        {"schema": 1, "batch_idx": 10 * i, "epoch": 0, "seq": i, "timestamp": "2025-01-01T00:00:00", "time": 1.0 + i}
        for i in range(3)
    ]
    typed = decode_typed_record(encode_record(old[0]))
    assert typed.gradient_norm is UNSET and typed.holdout_logits is UNSET and typed.telemetry is UNSET
    assert typed.metrics == {}
    run = load_run(write_run(tmp_path / "run", old))
    assert run.steps == [0, 10, 20]
    text = render_report(report_data(run))
    assert "steps 0 .. 20 (epochs 0 .. 0): 3 records" in text


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"train": {"loss": "low"}}, r"\$.train.loss"),
        ({"gradient_norm": {"head": "big"}}, r"\$.gradient_norm.head"),
        ({"errors": [{"where": "holdout_logits"}]}, r"\$.errors\[0\]"),
        ({"my_metric": [1.0, 2.0]}, r"\$.my_metric"),
        ({"my_metric": {"a": True}}, r"\$.my_metric.a"),
    ],
)
def test_a_record_off_the_schema_is_skipped_with_its_line_and_key_path(
    tmp_path: Path, change: dict, path: str
) -> None:
    """load_run skips the bad record with a warning naming file:line and the key path; the report still renders."""
    records = make_records(n=5)
    records[2] = records[2] | change
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / RECORDS_FILE).write_bytes(_lines(records))
    with pytest.raises(RecordError, match=path):
        decode_typed_record(encode_record(records[2]))
    with pytest.warns(UserWarning, match=rf"telemetry\.jsonl:3: skipped a record that does not match the schema: .*{path}"):
        run = load_run(directory)
    assert [r.seq for r in run.records] == [0, 1, 3, 4]
    assert "5 records" not in render_report(report_data(run))
    assert len(read_records(directory)) == 5  # the plain reader checks nothing


def test_a_corrupt_line_is_still_called_corrupt(tmp_path: Path) -> None:
    """A line that is not JSON is skipped as corrupt (not as off the schema), naming its line."""
    records = make_records(n=3)
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / RECORDS_FILE).write_bytes(encode_record(records[0]) + b"{not json\n" + _lines(records[1:]))
    with pytest.warns(UserWarning, match=r"telemetry\.jsonl:2: skipped a corrupt line"):
        typed = read_typed_records(directory)
    assert [r.seq for r in typed] == [0, 1, 2]


def test_watch_skips_a_record_off_the_schema_naming_its_line(tmp_path: Path) -> None:
    """The tail reader decodes into the same typed records and skips a bad one with its line number."""
    file = tmp_path / RECORDS_FILE
    records = make_records(n=3)
    records[1]["train"] = {"loss": "low"}
    file.write_bytes(_lines(records))
    with pytest.warns(UserWarning, match=rf"{RECORDS_FILE}:2: skipped a record .*\$.train.loss"):
        polled = RecordFollower(file).poll()
    assert all(isinstance(r, TypedRecord) for r in polled)
    assert [r.seq for r in polled] == [0, 2]


def test_a_loaded_run_holds_typed_records_readable_as_dicts(tmp_path: Path) -> None:
    """Run.records are TypedRecords; indexing them as dicts (older scripts) reads the values as written."""
    records = make_resumed_records(n=6, resume_at=4, n_after=3)
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta()))
    assert all(isinstance(r, TypedRecord) for r in (*run.records, *run.superseded))
    last = run.records[-1]
    assert last["gradient_norm"] == last.gradient_norm
    assert last.get("segment", 0) == last.segment == 1
    assert last.get("restarts", 0) == 0 and "restarts" not in last
    assert last["holdout_logits"] == records[-1]["holdout_logits"]
