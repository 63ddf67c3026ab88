"""The diagnoses on synthetic runs: each pathology is named with evidence, healthy runs are not flagged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import Diagnosis, diagnose, is_serious, load_run
from train_telemetry.analysis.diagnose import EXPLODING_UPDATE_RATIO
from train_telemetry.analysis.synthetic import (
    PATHOLOGIES,
    make_meta,
    make_records,
    make_summary,
    write_pathology,
    write_run,
)

# Serious diagnoses that a pathology may bring along because it causes them (a run whose
# gradients explode also stops learning). Anything else serious is a false positive.
CONSEQUENCES: dict[str, set[str]] = {
    "prediction_collapse": {"no_learning"},
    "exploding": {"nonfinite", "no_learning"},
    "nan_loss": {"no_learning"},
}


def _codes(diagnoses: list[Diagnosis], severity: str | None = None) -> list[str]:
    return [d.code for d in diagnoses if severity is None or d.severity == severity]


def _run(tmp_path: Path, records: list[dict[str, Any]], **meta: Any) -> list[Diagnosis]:
    directory = write_run(
        tmp_path / "run", records, meta=make_meta(**meta), summary=make_summary(len(records))
    )
    return diagnose(load_run(directory))


@pytest.mark.parametrize("pathology", [p for p in PATHOLOGIES if p != "healthy"])
def test_each_pathology_is_named_and_nothing_unrelated_is_serious(
    tmp_path: Path, pathology: str
) -> None:
    """Every injected pathology yields its code, and no serious code it does not explain."""
    expected, _ = PATHOLOGIES[pathology]
    diagnoses = diagnose(load_run(write_pathology(tmp_path / pathology, pathology)))
    assert expected in _codes(diagnoses)
    unrelated = set(_codes(diagnoses, "serious")) - {expected} - CONSEQUENCES.get(pathology, set())
    assert not unrelated, [d.title for d in diagnoses]
    found = next(d for d in diagnoses if d.code == expected)
    assert found.evidence and found.hint and found.title


@pytest.mark.parametrize("seed", range(8))
def test_healthy_noisy_runs_get_no_diagnosis(tmp_path: Path, seed: int) -> None:
    """Healthy runs with different noise draws and lengths get no diagnosis at all."""
    for n in (3, 6, 12, 40):
        directory = write_pathology(tmp_path / f"run{n}", "healthy", n=n, seed=seed)
        assert diagnose(load_run(directory)) == [], n


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_short_runs_get_no_trend_diagnosis(tmp_path: Path, n: int) -> None:
    """With fewer records than a trend needs, even a no-learning run is not judged."""
    diagnoses = _run(tmp_path, make_records("no_learning", n=n))
    assert not {"no_learning", "overfitting", "exploding_gradients", "vanishing_gradients"} & set(
        _codes(diagnoses)
    )


def test_frozen_group_evidence_shows_missing_grads_and_zero_delta(tmp_path: Path) -> None:
    """A frozen backbone's evidence lists steps with gradient_norm None and weight_delta 0."""
    diagnoses = diagnose(load_run(write_pathology(tmp_path / "run", "frozen_backbone")))
    frozen = [d for d in diagnoses if d.code == "frozen_group"]
    assert [d.subject for d in frozen] == ["backbone"]
    assert "no gradients reach it" in frozen[0].title
    assert "weights did not change" in frozen[0].title
    later = [e for e in frozen[0].evidence if "weight_delta" in e.values]
    assert later and all(
        e.values["gradient_norm"] is None and e.values["weight_delta"] == 0 for e in later
    )
    assert frozen[0].evidence[-1].step == 220


def test_lr_ratio_mismatch_says_observed_and_expected(tmp_path: Path) -> None:
    """A 100x head LR against expected_lr_ratios {backbone: 1, head: 10} is reported as 100x vs 10x."""
    diagnoses = diagnose(load_run(write_pathology(tmp_path / "run", "head_lr_100x")))
    (mismatch,) = [d for d in diagnoses if d.code == "lr_ratio_mismatch"]
    assert mismatch.severity == "serious"
    assert "100x" in mismatch.title and "expected 10x" in mismatch.title
    assert all(math.isclose(e.values["ratio"], 100.0) for e in mismatch.evidence)


def test_lr_ratio_within_tolerance_is_not_flagged(tmp_path: Path) -> None:
    """LRs matching expected_lr_ratios up to rounding are not a mismatch."""
    records = make_records(n=5)
    for record in records:
        record["learning_rates"]["head"] = record["learning_rates"]["group_1"] = 1.05e-2
    assert _run(tmp_path, records, expected_lr_ratios={"backbone": 1, "head": 10}) == []


def test_expected_lr_ratio_naming_an_unknown_group_is_a_warning(tmp_path: Path) -> None:
    """A typo in expected_lr_ratios (a group the optimizer lacks) is a warning naming it."""
    diagnoses = _run(tmp_path, make_records(n=5), expected_lr_ratios={"backbon": 1, "head": 10})
    (warning,) = [d for d in diagnoses if d.code == "lr_ratio_mismatch"]
    assert warning.severity == "warning" and "'backbon'" in warning.title


def test_lr_warmup_from_zero_is_not_a_frozen_group(tmp_path: Path) -> None:
    """An LR of 0 only in the first record (warm-up) does not make the group frozen."""
    records = make_records(n=6)
    records[0]["learning_rates"].update(group_0=0.0, backbone=0.0, group_1=0.0, head=0.0)
    assert _run(tmp_path, records) == []


def test_few_single_class_batches_of_size_two_are_chance(tmp_path: Path) -> None:
    """Binary batches of 2 are single-class half the time by chance; that is not flagged."""
    records = make_records(n=12)
    for i, record in enumerate(records):
        pct = (0.0, 50.0, 100.0, 50.0)[i % 4]
        record["batch_stats"] = {"winner_0_pct": pct, "winner_1_pct": 100 - pct, "batch_size": 2}
    assert "single_class_batches" not in _codes(_run(tmp_path, records))


def test_nan_values_are_found_without_a_nonfinite_list(tmp_path: Path) -> None:
    """A NaN weight norm is reported even when the record carries no nonfinite list."""
    records = make_records(n=5)
    records[3]["weight_norm"]["head"] = math.nan
    (found,) = [d for d in _run(tmp_path, records) if d.code == "nonfinite"]
    assert found.severity == "serious"
    assert found.evidence[0].step == 60
    assert math.isnan(found.evidence[0].values["weight_norm.head"])


def test_huge_update_ratio_is_an_explosion(tmp_path: Path) -> None:
    """Weights moving far more than their own norm between collections is reported as exploding."""
    records = make_records(n=4)
    records[1]["update_ratio"]["head"] = EXPLODING_UPDATE_RATIO * 13
    (found,) = [d for d in _run(tmp_path, records) if d.code == "exploding_gradients"]
    assert found.subject == "head" and "130x their own norm" in found.title


def test_a_rise_from_near_zero_gradients_is_not_an_explosion(tmp_path: Path) -> None:
    """Gradients ~1e-17 early (loss ~0 on easy batches) then ~1 are not an explosion."""
    records = make_records(n=9)
    for i, record in enumerate(records):
        record["gradient_norm"]["backbone"] = 1e-17 if 1 <= i <= 3 else 1.0
    assert "exploding_gradients" not in _codes(_run(tmp_path, records))


def test_gradients_dying_to_exactly_zero_are_vanishing(tmp_path: Path) -> None:
    """A group whose gradient becomes exactly 0 while the loss has not converged is reported."""
    records = make_records(n=9)
    for record in records[3:]:
        record["gradient_norm"]["backbone"] = 0.0
    (found,) = [d for d in _run(tmp_path, records) if d.code == "vanishing_gradients"]
    assert found.subject == "backbone" and "exactly 0" in found.title


def test_loss_recovering_from_divergence_is_not_learning(tmp_path: Path) -> None:
    """Train loss falling 50 -> 0.69 with train accuracy at chance is no learning, not overfitting."""
    records = make_records("no_learning", n=9)
    for i, record in enumerate(records):
        record["train"]["loss"] = 50.0 if i < 3 else 0.69
    codes = _codes(_run(tmp_path, records))
    assert "no_learning" in codes and "overfitting" not in codes


def test_causes_are_listed_before_their_symptoms(tmp_path: Path) -> None:
    """A frozen group is listed before the no-learning it causes."""
    records = make_records("no_learning", n=9)
    for record in records:
        record["gradient_norm"]["backbone"] = None
        record["weight_delta"]["backbone"] = 0.0 if record["seq"] else None
    codes = _codes(_run(tmp_path, records))
    assert codes.index("frozen_group") < codes.index("no_learning")


def test_evidence_carries_epoch_and_batch_idx_when_batch_idx_restarts(tmp_path: Path) -> None:
    """Evidence names the monotonic step and the record's own epoch and batch_idx."""
    records = make_records("frozen_backbone", n=6)
    for i, record in enumerate(records):
        record["epoch"], b = divmod(i, 3)
        record["batch_idx"] = (b + 1) * 10
    (frozen,) = [d for d in _run(tmp_path, records) if d.code == "frozen_group"]
    last = frozen.evidence[-1]
    assert (last.step, last.epoch, last.batch_idx) == (60, 1, 30)


def test_crashed_run_is_an_incomplete_run_unless_still_running(tmp_path: Path) -> None:
    """No summary.json and a torn tail give an incomplete_run warning; a watched run does not."""
    directory = write_run(tmp_path / "run", make_records(n=4), meta=make_meta(), torn_tail=True)
    run = load_run(directory)
    (found,) = [d for d in diagnose(run) if d.code == "incomplete_run"]
    assert found.severity == "warning"
    assert "no summary.json" in found.title and "torn line" in found.title
    assert "incomplete_run" not in _codes(diagnose(run, finished=False))
    assert not is_serious(diagnose(run))


def test_unclean_stop_is_reported(tmp_path: Path) -> None:
    """summary.json with clean false and a non-zero worker exit code is an incomplete run."""
    records = make_records(n=4)
    summary = make_summary(4) | {"clean": False, "worker_exitcode": -9}
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta(), summary=summary))
    (found,) = [d for d in diagnose(run) if d.code == "incomplete_run"]
    assert "not clean" in found.title and "code -9" in found.title


def test_dropped_snapshots_fraction_sets_severity(tmp_path: Path) -> None:
    """A few drops are info; a third of the snapshots dropped is a warning."""
    records = make_records(n=30)
    few = make_summary(30, dropped=1)
    run = load_run(write_run(tmp_path / "few", records, meta=make_meta(), summary=few))
    assert [(d.code, d.severity) for d in diagnose(run)] == [("dropped_snapshots", "info")]
    many = make_summary(30, dropped=15)
    run = load_run(write_run(tmp_path / "many", records, meta=make_meta(), summary=many))
    assert [(d.code, d.severity) for d in diagnose(run)] == [("dropped_snapshots", "warning")]


def test_slow_learning_with_holdout_at_chance_is_not_overfitting(tmp_path: Path) -> None:
    """Train accuracy creeping 0.53 -> 0.67 with a 50-example holdout at chance is no_learning, not overfitting."""
    records = make_records("no_learning", n=12)
    for i, record in enumerate(records):
        record["train"]["accuracy"] = 0.53 + 0.14 * i / 11
    codes = _codes(_run(tmp_path, records))
    assert "no_learning" in codes and "overfitting" not in codes


def test_batches_of_only_one_class_are_single_class(tmp_path: Path) -> None:
    """Batches that only ever hold class 0, while the holdout has both classes, are flagged."""
    records = make_records(n=8)
    for record in records:
        record["batch_stats"] = {"winner_0_pct": 100.0, "winner_1_pct": 0.0, "batch_size": 32}
    codes = _codes(_run(tmp_path, records), "serious")
    assert "single_class_batches" in codes and "data_imbalance" in codes


def test_gradient_surge_with_the_loss_is_a_warning_about_the_data(tmp_path: Path) -> None:
    """Gradients 200x up together with a 1000x train loss surge are a warning, not a serious explosion."""
    records = make_records(n=12)
    for i, record in enumerate(records):
        surge = i >= 8
        record["gradient_norm"]["backbone"] = 30.0 if surge else 0.15
        record["train"]["loss"] = 10.0 if surge else 0.01
    (found,) = [d for d in _run(tmp_path, records) if d.code == "exploding_gradients"]
    assert found.severity == "warning" and "a loss surge" in found.title
    assert "what changed in the data" in found.hint
