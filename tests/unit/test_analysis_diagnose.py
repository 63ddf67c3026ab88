"""The diagnoses on synthetic runs: each pathology is named with evidence, healthy runs are not flagged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import Diagnosis, diagnose, is_serious, load_run
from train_telemetry.analysis.rules import RULES
from train_telemetry.analysis.rules.gradients import EXPLODING_UPDATE_RATIO
from train_telemetry.testing import (
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
    """A few drops are info; a third of the snapshots dropped is a warning, unless the overhead
    budget skipped every one of them."""
    records = make_records(n=30)
    few = make_summary(30, dropped=1)
    run = load_run(write_run(tmp_path / "few", records, meta=make_meta(), summary=few))
    assert [(d.code, d.severity) for d in diagnose(run)] == [("dropped_snapshots", "info")]
    many = make_summary(30, dropped=15)
    run = load_run(write_run(tmp_path / "many", records, meta=make_meta(), summary=many))
    assert [(d.code, d.severity) for d in diagnose(run)] == [("dropped_snapshots", "warning")]
    # the same drops, every one skipped by the overhead budget: as configured, so info, and the
    # hint names the budget
    skipped = many | {"snapshots_skipped": 15}
    run = load_run(write_run(tmp_path / "skipped", records, meta=make_meta(), summary=skipped))
    (found,) = diagnose(run)
    assert (found.code, found.severity) == ("dropped_snapshots", "info") and "overhead_budget" in found.hint


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


# --- silent bugs -------------------------------------------------------------------------


def _not_zeroed(records: list[dict[str, Any]], *, plateau: bool = False) -> list[dict[str, Any]]:
    """The records' gradient norms as a sum over steps: ~linear in the step, or stuck once the loss is ~0."""
    for i, record in enumerate(records):
        step = record["batch_idx"] or 1
        level = 0.05 * min(step, 100) if plateau else 0.05 * step
        for key in ("overall", "backbone", "head"):
            record["gradient_norm"][key] = level * (1 + 0.01 * (i % 3))
        if plateau:
            record["train"]["loss"] = 0.7 * 0.5**i
    return records


def test_gradients_not_zeroed_growing_with_the_step_is_named(tmp_path: Path) -> None:
    """Gradient norms growing in proportion to the step with a falling loss are gradients_not_zeroed."""
    (found,) = [
        d
        for d in _run(tmp_path, _not_zeroed(make_records(n=12)))
        if d.code == "gradients_not_zeroed"
    ]
    assert found.severity == "serious" and "zero_grad" in found.hint
    assert "sum of every batch's gradients" in found.title
    assert all(e.values["gradient_norm"] > 0 for e in found.evidence)


def test_gradients_not_zeroed_stuck_after_the_loss_reached_zero_is_named(tmp_path: Path) -> None:
    """A summed gradient that grows, then holds within 1% while the loss goes to ~0, is named."""
    records = _not_zeroed(make_records(n=12, every=20), plateau=True)
    codes = _codes(_run(tmp_path, records))
    assert "gradients_not_zeroed" in codes


def test_gradients_not_zeroed_works_collecting_every_step(tmp_path: Path) -> None:
    """With collect_every_n 1 (steps 1, 2, 3, ...) the sum's growth is found too."""
    records = make_records(n=30, every=1)
    for record in records:
        record["batch_idx"] += 1
    codes = _codes(_run(tmp_path, _not_zeroed(records), collect_every_n=1))
    assert "gradients_not_zeroed" in codes


def test_exploding_gradients_are_not_gradients_not_zeroed(tmp_path: Path) -> None:
    """Exponential growth ending in Inf, and growth the loss shares 10x, are not a missing zero_grad."""
    run = load_run(write_pathology(tmp_path / "exploding", "exploding"))
    assert "gradients_not_zeroed" not in _codes(diagnose(run))
    records = _not_zeroed(make_records(n=12))
    for i, record in enumerate(records):
        record["train"]["loss"] = 0.5 * 2**i
    assert "gradients_not_zeroed" not in _codes(_run(tmp_path, records))


def _activations(records: list[dict[str, Any]], kind: str, field: str, values: list[float]) -> None:
    for record, v in zip(records, values, strict=True):
        record["activations"] = {
            "backbone.1": {"kind": kind, "mean": 0.1, "std": 1.0, field: v},
            "head.1": {"kind": kind, "mean": 0.1, "std": 1.0, field: 0.05},
        }


def test_dying_relu_names_the_layer_and_the_step_it_began(tmp_path: Path) -> None:
    """A ReLU layer whose dead fraction rises from 5% to 90% at step 100 is named with that step."""
    records = make_records(n=12)
    _activations(records, "relu", "dead_fraction", [0.05] * 5 + [0.9] * 7)
    (found,) = [d for d in _run(tmp_path, records) if d.code == "dying_relu"]
    assert found.subject == "backbone.1" and "since step 100" in found.title
    assert found.severity == "serious" and found.evidence[-1].values["dead_fraction"] == 0.9


def test_saturated_tanh_is_named(tmp_path: Path) -> None:
    """A tanh layer with 80% of its outputs saturated late in the run is saturated_activations."""
    records = make_records(n=9)
    _activations(records, "tanh", "saturated_fraction", [0.1, 0.3, 0.5] + [0.8] * 6)
    (found,) = [d for d in _run(tmp_path, records) if d.code == "saturated_activations"]
    assert found.subject == "backbone.1" and "80%" in found.title


def test_healthy_activations_are_not_flagged(tmp_path: Path) -> None:
    """ReLUs with 20% dead units and tanh layers 30% saturated get no diagnosis."""
    records = make_records(n=9)
    _activations(records, "relu", "dead_fraction", [0.2] * 9)
    assert _run(tmp_path / "relu", records) == []
    _activations(records, "tanh", "saturated_fraction", [0.3] * 9)
    assert _run(tmp_path / "tanh", records) == []


def _mode(
    records: list[dict[str, Any]], training: list[int], change: list[float | None], bn: int = 2
) -> None:
    for record, t, c in zip(records, training, change, strict=True):
        record["model_mode"] = {"training": t, "batchnorm_layers": bn, "batchnorm_stat_change": c}


def test_training_in_eval_mode_is_named(tmp_path: Path) -> None:
    """model.training 0 at every collection of a model with BatchNorm is a serious eval_mode_training."""
    records = make_records(n=8)
    _mode(records, [0] * 8, [None] + [0.0] * 7)
    found = [
        d
        for d in _run(tmp_path, records)
        if d.code in ("eval_mode_training", "frozen_batchnorm_stats")
    ]
    assert [(d.code, d.severity) for d in found] == [("eval_mode_training", "serious")]
    assert "since step 0" in found[0].title


def test_frozen_batchnorm_statistics_are_named(tmp_path: Path) -> None:
    """BatchNorm stats that never change in train mode are frozen_batchnorm_stats."""
    records = make_records(n=8)
    _mode(records, [1] * 8, [None] + [0.0] * 7)
    (found,) = [d for d in _run(tmp_path, records) if d.code == "frozen_batchnorm_stats"]
    assert found.severity == "warning" and "momentum" in found.hint


def test_healthy_model_mode_is_not_flagged(tmp_path: Path) -> None:
    """Train mode with BN stats moving 1e-2 per collection, and one eval-mode record, are fine."""
    records = make_records(n=8)
    _mode(records, [1] * 7 + [0], [None] + [1e-2] * 7)
    assert _run(tmp_path, records) == []


def test_loss_oscillating_with_growing_amplitude_is_unstable(tmp_path: Path) -> None:
    """A train loss swinging ever wider around its level is unstable_training."""
    records = make_records(n=15)
    for i, record in enumerate(records):
        record["train"]["loss"] = 0.7 + (0.02 + 0.15 * i) * (-1) ** i
    (found,) = [d for d in _run(tmp_path, records) if d.code == "unstable_training"]
    assert found.severity == "serious" and "train loss" in found.title


def test_noisy_converged_loss_is_not_unstable(tmp_path: Path) -> None:
    """A loss at ~0.01 spiking to 0.2 on a hard batch is not unstable."""
    records = make_records(n=15)
    for i, record in enumerate(records):
        record["train"]["loss"] = (0.7 - 0.05 * i) if i < 7 else (0.2 if i % 2 else 0.01)
    assert "unstable_training" not in _codes(_run(tmp_path, records))


def test_train_loss_stalled_above_the_holdout_best_is_non_convergence(tmp_path: Path) -> None:
    """A train loss stuck at 0.6 while the holdout reached 0.2 is non_convergence."""
    records = make_records(n=12)
    for i, record in enumerate(records):
        record["train"]["loss"] = 0.65 if i < 3 else 0.6 + 0.01 * (i % 2)
        record["holdout_logits"]["loss"] = 0.2 + 0.01 * i
    (found,) = [d for d in _run(tmp_path, records) if d.code == "non_convergence"]
    assert found.severity == "serious" and "0.2" in found.title


def test_non_convergence_leaves_a_holdout_at_chance_to_no_learning(tmp_path: Path) -> None:
    """With the holdout at chance the stalled run is no_learning, not also non_convergence."""
    codes = _codes(diagnose(load_run(write_pathology(tmp_path / "run", "no_learning"))))
    assert "no_learning" in codes and "non_convergence" not in codes


@pytest.mark.parametrize("seed", range(4))
def test_healthy_runs_with_layers_and_activations_get_no_diagnosis(
    tmp_path: Path, seed: int
) -> None:
    """Healthy runs carrying layers, activations and model_mode keys get no diagnosis."""
    records = make_records(n=12, seed=seed, layers=True)
    _activations(records, "relu", "dead_fraction", [0.1] * 12)
    _mode(records, [1] * 12, [None] + [2e-2] * 11)
    assert _run(tmp_path, records) == []


@pytest.mark.parametrize(
    ("pathology", "code", "phrase"),
    [
        ("exploding", "exploding_gradients", "starts in layer 'backbone.0'"),
        ("vanishing", "vanishing_gradients", "lost at layer 'backbone.2'"),
        ("frozen_backbone", "frozen_group", "first frozen layer 'backbone.0'"),
    ],
)
def test_gradient_diagnoses_name_the_layer_where_they_start(
    tmp_path: Path, pathology: str, code: str, phrase: str
) -> None:
    """With per-layer records, exploding/vanishing/frozen name the layer and add it to the evidence."""
    directory = write_pathology(tmp_path / pathology, pathology, layers=True)
    found = next(
        d for d in diagnose(load_run(directory)) if d.code == code and d.subject == "backbone"
    )
    assert phrase in found.title
    assert found.evidence[-1].values["layer"] in ("backbone.0", "backbone.2")


@pytest.mark.parametrize("pathology", list(PATHOLOGIES))
def test_each_rule_alone_finds_what_diagnose_reports_for_its_code(
    tmp_path: Path, pathology: str
) -> None:
    """A rule's check() on its own returns the diagnoses that diagnose() reports under its code
    (diagnose() shares what rules of one family compute; that changes nothing they find)."""
    run = load_run(write_pathology(tmp_path / pathology, pathology, layers=True))
    reported = diagnose(run)
    for rule in RULES:
        alone = [(d.severity, d.subject, d.title) for d in rule.check(run)]
        assert sorted(alone) == sorted(
            (d.severity, d.subject, d.title) for d in reported if d.code == rule.code
        ), rule.code


def _clipped(records: list[dict[str, Any]], pre_clip: list[float], loss: list[float]) -> None:
    """Clipping at max_norm 1.0 with ``pre_clip`` as the overall norm before it, and ``loss``."""
    for record, v, train_loss in zip(records, pre_clip, loss, strict=True):
        record["gradient_norm_pre_clip"] = {"overall": v, "backbone": 0.5 * v, "head": 0.85 * v}
        record["gradient_clipping"] = {"max_norm": 1.0, "pre_clip_norm": v}
        record["gradient_norm"] = {g: min(1.0, v) * f for g, f in (("overall", 1.0), ("backbone", 0.5), ("head", 0.85))}
        record["train"]["loss"] = train_loss


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("held at max_norm, loss falling", True),
        ("held at max_norm, loss flat", False),  # an LR too small: the gradient itself stays there
        ("far above max_norm, loss falling", False),  # a max_norm set below the gradients' size
        ("falling below max_norm", False),  # one batch's gradient following the loss down
        # every batch above max_norm from the first step (nanoGPT at its own clip of 1.0): held
        # there with zero_grad too, so nothing shows a sum
        ("held at max_norm from the first record, loss falling", False),
    ],
)
def test_a_gradient_sum_held_at_the_clipping_threshold_is_gradients_not_zeroed(
    tmp_path: Path, case: str, named: bool
) -> None:
    """Under clipping the never-zeroed sum is rescaled to max_norm in place each step: a
    pre-clip norm at max_norm (1.0-1.3) in every record after the first while the train loss
    falls 0.7 -> 0.2 is gradients_not_zeroed when the first record (one batch's gradient) was
    under max_norm; the same norms with a flat loss, or above max_norm from the first record,
    norms 6-8x max_norm, or norms falling below max_norm with the loss are not."""
    n = 15
    records = make_records(n=n)
    falling = [0.7 * (1 - 0.75 * i / (n - 1)) for i in range(n)]
    held = [0.6] + [1.0 + 0.3 * (i % 3) / 2 for i in range(1, n)]
    pre_clip, loss = {
        "held at max_norm, loss falling": (held, falling),
        "held at max_norm, loss flat": (held, [0.7 + 0.01 * (i % 2) for i in range(n)]),
        "far above max_norm, loss falling": ([6.0 + 2.0 * (i % 2) for i in range(n)], falling),
        "falling below max_norm": ([1.2 * (1 - 0.75 * i / (n - 1)) for i in range(n)], falling),
        "held at max_norm from the first record, loss falling": ([1.28] + held[1:], falling),
    }[case]
    _clipped(records, pre_clip, loss)
    found = [d for d in _run(tmp_path, records) if d.code == "gradients_not_zeroed"]
    assert bool(found) == named, [d.title for d in found]
    if named:
        assert found[0].severity == "serious" and "held at the clipping threshold" in found[0].title
