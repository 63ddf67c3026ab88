"""The report: the text summary users read, and the JSON that says the same thing."""

from __future__ import annotations

import json
import math
from pathlib import Path

from train_telemetry.analysis import load_run, render_report, report_data, report_json
from train_telemetry.testing import make_meta, make_records, write_pathology, write_run


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
