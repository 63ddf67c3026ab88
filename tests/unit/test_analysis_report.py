"""The report: the text summary users read, and the JSON that says the same thing."""

from __future__ import annotations

import json
import math
from pathlib import Path

from train_telemetry.analysis import (
    load_run,
    render_comparison,
    render_report,
    report_data,
    report_json,
)
from train_telemetry.testing import (
    add_metric,
    make_meta,
    make_records,
    write_pathology,
    write_resumed_run,
    write_run,
)


def _strict_loads(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_healthy_report_covers_every_section(tmp_path: Path) -> None:
    """A healthy run's report shows coverage, per-group trends, LR ratio, holdout, batches, cost, no problems."""
    text = render_report(report_data(load_run(write_pathology(tmp_path / "run", "healthy"))))
    assert "steps 0 .. 220 (epochs 0 .. 2): 12 records, collected every 20 steps" in text
    for needle in (
        "gradient norm",
        "weight delta",
        "update/weight",
        "learning rate",
        "LR relative to 'backbone': head 10x (expected 10x)",
        "holdout (50 examples, 2 classes, chance 0.5)",
        "train batches",
        "batch balance ('winner', batch size 32, 12 batches recorded)",
        "single-class batches: 0 of 12",
        "12 snapshots taken, 12 records written, 0 dropped, 0 metric errors",
        "status: stopped cleanly",
        "Diagnoses: none (no problems found)",
    ):
        assert needle in text, needle
    backbone_rows = [line for line in text.splitlines() if line.startswith("    backbone ")]
    assert len(backbone_rows) == 5  # grad, delta, weight norm, update ratio, LR: once each
    assert "group_0" not in text


def test_serious_diagnosis_shows_severity_evidence_and_hint(tmp_path: Path) -> None:
    """A frozen backbone is listed as SERIOUS with its evidence steps and a hint line."""
    text = render_report(
        report_data(load_run(write_pathology(tmp_path / "run", "frozen_backbone")))
    )
    diagnoses = text[text.index("Diagnoses") :]
    assert "Diagnoses (1 serious):" in diagnoses
    assert "SERIOUS  frozen_group: group 'backbone' is frozen" in diagnoses
    assert "step 220: gradient_norm=none, lr=0.001, weight_delta=0" in diagnoses
    assert "hint: if unintended: check requires_grad" in diagnoses


def test_json_is_strict_and_matches_the_text(tmp_path: Path) -> None:
    """--json data is strict JSON and carries the same diagnoses, steps and summary as the text."""
    data = report_data(load_run(write_pathology(tmp_path / "run", "head_lr_100x")))
    parsed = _strict_loads(report_json(data))
    assert isinstance(parsed, dict)
    assert parsed["serious"] is True
    assert [d["code"] for d in parsed["diagnoses"]] == ["lr_ratio_mismatch"]
    assert parsed["diagnoses"][0]["evidence"][0] == {
        "step": 0,
        "epoch": 0,
        "batch_idx": 0,
        "values": {"lr.head": 0.1, "lr.backbone": 0.001, "ratio": 100.0},
    }
    assert parsed["summary"]["lr_ratios"]["observed"]["head"] == 100.0
    assert parsed["summary"]["lr_ratios"]["expected"]["head"] == 10.0
    assert parsed["diagnoses"][0]["title"] in render_report(data)


def test_nan_values_are_strings_in_json_and_named_in_text(tmp_path: Path) -> None:
    """A NaN train loss is "NaN" in the JSON and shown as NaN in the nonfinite diagnosis."""
    data = report_data(load_run(write_pathology(tmp_path / "run", "nan_loss")))
    parsed = _strict_loads(report_json(data))
    assert isinstance(parsed, dict)
    nonfinite = next(d for d in parsed["diagnoses"] if d["code"] == "nonfinite")
    assert nonfinite["evidence"][0]["values"]["train.loss"] == "NaN"
    assert parsed["summary"]["train"]["loss"]["last"] == "NaN"
    text = render_report(data)
    assert "train.loss=NaN" in text and "first at step 120" in text


def test_crashed_run_reports_what_it_has(tmp_path: Path) -> None:
    """A run with a torn tail and no summary.json still gets a full report that says so."""
    directory = write_run(tmp_path / "run", make_records(n=6), meta=make_meta(), torn_tail=True)
    data = report_data(load_run(directory))
    text = render_report(data)
    assert "6 records" in text
    assert "status: no summary.json (crashed, killed, or still running)" in text
    assert "torn line" in text
    assert "WARNING  incomplete_run" in text
    assert data["serious"] is False


def test_run_without_run_json_or_train_metrics_gets_notes(tmp_path: Path) -> None:
    """Missing run.json and train metrics are pointed out instead of silently skipping checks."""
    records = make_records(n=4)
    for record in records:
        del record["train"]
    text = render_report(report_data(load_run(write_run(tmp_path / "run", records))))
    assert "note: no run.json" in text
    assert "note: no train loss/accuracy recorded: pass loss=" in text


def test_ascii_only_report_has_no_other_characters(tmp_path: Path) -> None:
    """ascii_only draws trends with ASCII so the report prints on any console."""
    text = render_report(
        report_data(load_run(write_pathology(tmp_path / "run", "healthy"))), ascii_only=True
    )
    assert text.isascii()


def test_empty_run_says_no_records(tmp_path: Path) -> None:
    """A run that has written no records yet reports that instead of failing."""
    directory = write_run(tmp_path / "run", [], meta=make_meta())
    data = report_data(load_run(directory))
    assert "no records yet" in render_report(data)
    assert data["diagnoses"] == []


def test_summary_numbers_match_the_records(tmp_path: Path) -> None:
    """The summary's first/last/median per group are the records' own values."""
    run = load_run(write_pathology(tmp_path / "run", "healthy"))
    stats = report_data(run)["summary"]["groups"]["head"]["gradient_norm"]
    values = [r["gradient_norm"]["head"] for r in run.records]
    assert stats["first"] == values[0] and stats["last"] == values[-1]
    assert math.isclose(stats["max"], max(values))


def _metric_run(tmp_path: Path, pathology: str = "healthy") -> Path:
    """A run whose records carry a made-up metric, a 12-module one, and the per-layer breakdown."""
    records = add_metric(
        make_records(pathology, layers=True),
        "mean_abs_weight",
        lambda r: {"overall": 0.5 + r["seq"], "backbone": 0.25, "head": 2.0},
    )
    records = add_metric(records, "activations", lambda r: {f"fc{i}": {"mean": float(i)} for i in range(12)})
    return write_run(tmp_path / "run", records, meta=make_meta())


def test_report_shows_any_metric_with_first_last_min_max(tmp_path: Path) -> None:
    """A metric the code does not know is listed leaf by leaf with first, last, min and max."""
    text = render_report(report_data(load_run(_metric_run(tmp_path))))
    section = text[text.index("other metrics") :]
    assert section.splitlines()[0].split() == ["other", "metrics", "first", "last", "min", "max"]
    assert "  mean_abs_weight\n" in section
    rows = [line.split() for line in section.splitlines()[2:5]]
    assert rows == [
        ["overall", "0.5", "11.5", "0.5", "11.5"],
        ["backbone", "0.25", "0.25", "0.25", "0.25"],
        ["head", "2", "2", "2", "2"],
    ]


def test_report_bounds_a_metric_with_many_values_and_json_carries_all(tmp_path: Path) -> None:
    """A 12-value metric shows its 10 largest last values in the text; --json has all 12 and the layers."""
    data = report_data(load_run(_metric_run(tmp_path)))
    text = render_report(data)
    assert "activations (12 values; the 10 largest last values, all in --json)" in text
    assert "fc11.mean" in text and "fc2.mean" in text and "fc1.mean" not in text
    parsed = _strict_loads(report_json(data))
    assert isinstance(parsed, dict)
    metrics = parsed["summary"]["metrics"]
    assert len(metrics["activations"]) == 12
    assert metrics["mean_abs_weight"]["overall"] == {
        "n": 12, "first": 0.5, "last": 11.5, "last_step": 220, "min": 0.5, "max": 11.5, "nonfinite": 0,
    }
    assert set(metrics["layers"]) >= {"gradient_norm.head", "weight_norm.backbone.0", "update_ratio.backbone.2"}
    assert "  layers" not in text.split("per layer")[1]  # the layers have their own table instead


def test_report_has_a_per_layer_table_ranked_by_gradient_norm(tmp_path: Path) -> None:
    """The last record's layers are a table of grad norm, weight norm and update ratio, largest grad first, Inf on top."""
    run = load_run(_metric_run(tmp_path, "exploding"))
    text = render_report(report_data(run))
    table = text[text.index("  per layer at step 220 (by gradient norm)") :].splitlines()
    assert table[1].split() == ["layer", "grad", "norm", "weight", "norm", "update/weight"]
    last = run.records[-1]["layers"]
    assert [row.split()[0] for row in table[2:5]] == ["head", "backbone.0", "backbone.2"]
    assert table[2].split()[1:3] == ["Inf", "5.1"]
    assert table[3].split()[1] == f"{last['gradient_norm']['backbone.0']:.2e}"
    summary = report_data(run)["summary"]["layers"]
    assert summary["step"] == 220 and summary["layers"] == 3
    assert summary["rows"][0] == {"layer": "backbone.0", **{f: v["backbone.0"] for f, v in last.items()}}


def test_a_resumed_run_says_where_it_resumed_and_what_was_superseded(tmp_path: Path) -> None:
    """One line names the segments, the resume step and the superseded count; --json carries them."""
    run = load_run(write_resumed_run(tmp_path / "run", n=10, resume_at=7, n_after=6))
    data = report_data(run)
    text = render_report(data)
    assert "2 segments: resumed at step 140; 3 earlier records superseded by the resumed run" in text
    assert "steps 0 .. 240 (epochs 0 .. 2): 13 records" in text
    summary = _strict_loads(report_json(data))["summary"]  # type: ignore[index]
    assert summary["run"]["resumes"] == [140]
    assert summary["run"]["superseded"] == 3
    assert [(s["segment"], s["first_step"], s["first_index"]) for s in summary["run"]["segments"]] == [
        (0, 0, 0),
        (1, 140, 7),
    ]
    assert summary["run"]["segments"][1]["started"] == "2025-01-01T00:01:10"
    assert summary["run"]["seq_gaps"] == 0


def test_worker_restarts_are_shown_with_the_collector_health(tmp_path: Path) -> None:
    """The summary's worker_restarts and the records written after one; nothing lost when all were written."""
    run = load_run(write_resumed_run(tmp_path / "run", n_after=6, restart_at=2))
    data = report_data(run)
    assert "    worker restarted 1 time (4 records written after a restart); nothing lost" in render_report(data)
    telemetry = _strict_loads(report_json(data))["summary"]["telemetry"]  # type: ignore[index]
    assert telemetry["worker_restarts"] == 1 and telemetry["records_after_restart"] == 4
    assert run.summary is not None
    run.summary["worker_restarts"], run.summary["snapshots_taken"] = 2, run.summary["records_written"] + 1
    assert "worker restarted 2 times (4 records written after a restart); 1 snapshots not written" in render_report(
        report_data(run)
    )


def test_a_run_never_resumed_or_restarted_has_no_such_lines(tmp_path: Path) -> None:
    """A plain run's report mentions neither segments nor worker restarts."""
    data = report_data(load_run(write_pathology(tmp_path / "run", "healthy")))
    text = render_report(data)
    assert "segments" not in text and "restarted" not in text
    assert data["summary"]["run"]["resumes"] == [] and data["summary"]["run"]["superseded"] == 0
    assert data["summary"]["telemetry"]["worker_restarts"] == 0


def test_comparison_has_a_resumed_at_row_only_when_a_run_was_resumed(tmp_path: Path) -> None:
    """render_comparison shows where each run resumed ('-' for one that never did)."""
    resumed = report_data(load_run(write_resumed_run(tmp_path / "a", n=10, resume_at=7, n_after=6)))
    plain = report_data(load_run(write_pathology(tmp_path / "b", "healthy")))
    row = [line for line in render_comparison([resumed, plain]).splitlines() if line.startswith("resumed at")]
    assert row and row[0].split()[2:] == ["140", "-"]
    assert "resumed at" not in render_comparison([plain, plain])


def test_the_report_says_who_built_the_records_and_why_inline(tmp_path: Path) -> None:
    """telemetry.built_by of the records (and run.json's mode_reason when the trainer built
    them all) appear with the collector's health; records without it (older runs) add no line."""
    run = load_run(write_pathology(tmp_path / "run", "healthy"))
    assert "records built by" not in render_report(report_data(run))
    reason = "training on the CPU with 2 torch threads on 2 cores: no core is left for a worker"
    run.meta = {**(run.meta or {}), "mode_reason": reason}
    for record in run.records:
        record.telemetry.built_by = "trainer"
    data = report_data(run)
    text = render_report(data)
    assert f"    records built by the training thread (inline): {reason}" in text
    assert "; build on the training thread " in text and "worker lag" not in text
    assert data["summary"]["telemetry"]["built_by"] == ["trainer"]
    run.records[-1].telemetry.built_by = "worker"  # a resumed run that changed mode
    assert "    records built by the training thread (inline) and the worker process\n" in render_report(report_data(run))
