"""The newer silent-failure rules on synthetic runs: each names its failure with the numbers
that show it, and stays silent on the healthy look-alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import Diagnosis, diagnose, load_run
from train_telemetry.analysis.rules.outputs import loss_floor
from train_telemetry.testing import make_meta, make_records, make_summary, write_run


def judge(tmp_path: Path, records: list[dict[str, Any]], groups: tuple[str, ...] = ()) -> list[Diagnosis]:
    meta = make_meta()
    meta["groups"].update({g: {"num_params": 100, "num_tensors": 1} for g in groups})
    directory = write_run(tmp_path / "run", records, meta=meta, summary=make_summary(len(records)))
    return diagnose(load_run(directory))


def named(diagnoses: list[Diagnosis], code: str) -> list[Diagnosis]:
    return [d for d in diagnoses if d.code == code]


def set_lr(records: list[dict[str, Any]], lr_of: Any) -> None:
    """Both groups' LR at record i: lr_of(i) x their usual 1e-3 / 1e-2."""
    for i, r in enumerate(records):
        f = lr_of(i)
        r["learning_rates"] = {"group_0": 1e-3 * f, "group_1": 1e-2 * f, "backbone": 1e-3 * f, "head": 1e-2 * f}


# --- params_not_updated ------------------------------------------------------------------------


def test_a_layer_with_gradients_that_never_changes_is_named(tmp_path: Path) -> None:
    """The head gets gradients in every record but its weight delta is 0 (a head replaced after
    the optimizer was built): serious, the layer named, its gradient norms as evidence."""
    records = make_records("healthy", n=10, layers=True)
    for r in records[1:]:
        r["layers"]["weight_delta"]["head"] = 0.0
        r["layers"]["update_ratio"]["head"] = 0.0
    [found] = named(judge(tmp_path, records), "params_not_updated")
    assert found.severity == "serious" and found.subject == "head"
    assert "1 of 3 layers" in found.title and "2 other layers do change" in found.title
    assert all(e.values["layer_gradient_norm"] > 0 and e.values["layer_update_ratio"] == 0 for e in found.evidence)
    assert "optimizer" in found.hint


def test_layers_that_move_or_get_no_gradients_are_not_named(tmp_path: Path) -> None:
    """A healthy run, and a frozen backbone (no gradients: frozen_group's), are not named."""
    assert not named(judge(tmp_path / "a", make_records("healthy", n=10, layers=True)), "params_not_updated")
    assert not named(judge(tmp_path / "b", make_records("frozen_backbone", n=10, layers=True)), "params_not_updated")


def test_without_layers_the_unassigned_group_with_gradients_is_named(tmp_path: Path) -> None:
    """No ``layers`` key: parameters of no optimizer group ('unassigned') that get gradients
    and never change are named by that group."""
    records = make_records("healthy", n=8)
    for r in records:
        for family, value in (("gradient_norm", 0.3), ("weight_delta", 0.0), ("weight_norm", 4.0), ("update_ratio", 0.0)):
            r[family]["unassigned"] = value
    [found] = named(judge(tmp_path, records, groups=("unassigned",)), "params_not_updated")
    assert found.subject == "unassigned" and "never change in 8 records" in found.title


# --- probabilities_as_logits -------------------------------------------------------------------


def softmax_outputs(records: list[dict[str, Any]]) -> None:
    for r in records:
        rows = []
        for row in r["holdout_logits"]["logits"]:
            exps = [math.exp(v) for v in row]
            rows.append([e / sum(exps) for e in exps])
        r["holdout_logits"]["logits"] = rows


def test_probability_outputs_with_a_loss_above_the_floor_are_named(tmp_path: Path) -> None:
    """Every holdout row sums to 1 in [0, 1] and the train loss (0.7 -> 0.45) stays above the
    two-class floor log(e + 1) - 1 = 0.313: softmax before CrossEntropyLoss, serious."""
    records = make_records("healthy", n=12)
    softmax_outputs(records)
    for i, r in enumerate(records):
        r["train"]["loss"] = 0.7 - 0.02 * i
    [found] = named(judge(tmp_path, records), "probabilities_as_logits")
    assert found.severity == "serious"
    assert "floor 0.313" in found.title
    assert all(e.values["row_sum_max_error"] < 1e-6 and e.values["min_output"] >= 0 for e in found.evidence)
    assert "Softmax" in found.hint


def test_probabilities_whose_loss_goes_below_the_floor_are_the_right_pairing(tmp_path: Path) -> None:
    """The same outputs with a train loss reaching 0.05 (NLLLoss on log-probabilities, which
    has no floor) are not named; nor are raw logits."""
    records = make_records("healthy", n=12)
    softmax_outputs(records)
    for i, r in enumerate(records):
        r["train"]["loss"] = 0.7 * math.exp(-i / 3)
    assert not named(judge(tmp_path / "a", records), "probabilities_as_logits")
    assert not named(judge(tmp_path / "b", make_records("healthy", n=12)), "probabilities_as_logits")


def test_the_loss_floor_is_the_cross_entropy_of_a_one_hot_probability_vector() -> None:
    """log(e + C - 1) - 1: CE of logits one-hot on the right class, C classes (1: a sigmoid)."""
    for classes in (2, 10):
        logits = [1.0] + [0.0] * (classes - 1)
        ce = -logits[0] + math.log(sum(math.exp(v) for v in logits))
        assert loss_floor(classes) == pytest.approx(ce)
    assert loss_floor(1) == pytest.approx(math.log(1 + math.exp(-1)))


# --- poor_initial_scale ------------------------------------------------------------------------


def with_activations(records: list[dict[str, Any]], first: dict[str, dict[str, Any]], later: dict[str, dict[str, Any]]) -> None:
    for i, r in enumerate(records):
        r["activations"] = first if i < 3 else later


HEALTHY_ACTS = {"body.1": {"kind": "relu", "mean": 0.2, "std": 0.3, "dead_fraction": 0.1, "positive_fraction": 0.5},
                "norm": {"kind": "norm", "mean": 0.0, "std": 40.0}}  # fmt: skip


def test_relu_activations_far_above_unit_scale_at_the_start_are_named(tmp_path: Path) -> None:
    """A ReLU layer at RMS ~36 in the first records (raw inputs in the hundreds): serious,
    the layer and its mean/std named; a norm layer at std 40 is left out (its own scale)."""
    records = make_records("healthy", n=12)
    with_activations(records, {**HEALTHY_ACTS, "body.1": {**HEALTHY_ACTS["body.1"], "mean": 20.0, "std": 30.0}}, HEALTHY_ACTS)
    [found] = named(judge(tmp_path, records), "poor_initial_scale")
    assert found.severity == "serious" and found.subject == "body.1"
    assert "RMS 36.1" in found.title and [e.values["std"] for e in found.evidence] == [30.0] * 3


def test_tanh_saturated_from_the_start_is_a_warning_below_half(tmp_path: Path) -> None:
    """A tanh layer with 45% of its values in the tails from step 0: a warning."""
    records = make_records("healthy", n=12)
    tanh = {"t": {"kind": "tanh", "mean": 0.0, "std": 0.8, "saturated_fraction": 0.45}}
    with_activations(records, tanh, tanh)
    [found] = named(judge(tmp_path, records), "poor_initial_scale")
    assert found.severity == "warning" and "45% of its values in the flat tails" in found.title


def test_unit_scale_activations_or_a_first_step_that_moved_the_weights_are_not_named(tmp_path: Path) -> None:
    """Healthy scale is not named; nor is a large scale after a first step that moved the
    weights 1.2x their norm (the LR's doing, not the init's)."""
    records = make_records("healthy", n=12)
    with_activations(records, HEALTHY_ACTS, HEALTHY_ACTS)
    assert not named(judge(tmp_path / "a", records), "poor_initial_scale")
    records = make_records("healthy", n=12)
    with_activations(records, {"body.1": {**HEALTHY_ACTS["body.1"], "mean": 20.0, "std": 30.0}}, HEALTHY_ACTS)
    records[0]["update_ratio"] = {"overall": 1.2, "backbone": 1.2, "head": 1.2}
    assert not named(judge(tmp_path / "b", records), "poor_initial_scale")


# --- training_stalled --------------------------------------------------------------------------


def flat_loss(records: list[dict[str, Any]], level: float = 0.69) -> None:
    for i, r in enumerate(records):
        r["train"]["loss"] = level * (1 + 0.01 * ((i * 7) % 3 - 1))


def test_a_flat_loss_at_its_starting_level_with_a_nonzero_lr_is_a_stall(tmp_path: Path) -> None:
    """40 records of loss 0.69 +-1% at LRs 1e-3/1e-2: stalled, with the LRs and update ratios."""
    records = make_records("healthy", n=40)
    flat_loss(records)
    [found] = named(judge(tmp_path, records), "training_stalled")
    assert found.severity == "serious"
    assert "'backbone' 0.001" in found.title and "update/weight ratio" in found.title


def test_a_falling_loss_or_a_zero_lr_is_no_stall(tmp_path: Path) -> None:
    """The healthy falling loss is no stall; a flat loss at LR 0 is left to other rules."""
    assert not named(judge(tmp_path / "a", make_records("healthy", n=40)), "training_stalled")
    records = make_records("healthy", n=40)
    flat_loss(records)
    set_lr(records, lambda i: 0.0)
    assert not named(judge(tmp_path / "b", records), "training_stalled")


# --- the LR schedule ---------------------------------------------------------------------------


def test_an_lr_reaching_zero_with_most_of_the_run_to_go_is_named_per_group(tmp_path: Path) -> None:
    """A linear decay reaching 0 at 30% of the run: each group named, with the step it hit 0."""
    records = make_records("healthy", n=20)
    set_lr(records, lambda i: max(0.0, 1 - i / 6))
    found = named(judge(tmp_path, records), "lr_schedule_ends_early")
    assert [d.subject for d in found] == ["backbone", "head"]
    assert all(d.severity == "serious" and "at step 120" in d.title and "stayed there" in d.title for d in found)


def test_a_cyclic_schedule_touching_zero_early_is_named_and_a_full_cosine_is_not(tmp_path: Path) -> None:
    """A cosine with a period of 8 records touches 0 early and rises again: named as cyclic.
    A cosine over the whole run (0 only at the last record) is not."""
    records = make_records("healthy", n=24)
    set_lr(records, lambda i: 0.5 * (1 + math.cos(math.pi * (i % 8) / 4)))
    found = named(judge(tmp_path / "a", records), "lr_schedule_ends_early")
    assert found and "rose again" in found[0].title
    records = make_records("healthy", n=24)
    set_lr(records, lambda i: 0.5 * (1 + math.cos(math.pi * i / 23)))
    assert not named(judge(tmp_path / "b", records), "lr_schedule_ends_early")


def test_an_lr_still_rising_at_the_end_is_an_unfinished_warmup(tmp_path: Path) -> None:
    """An LR rising linearly over the whole run (a warm-up 10x the run): a warning per group.
    A warm-up over the first quarter, then constant, is not."""
    records = make_records("healthy", n=20)
    set_lr(records, lambda i: (i + 1) / 200)
    found = named(judge(tmp_path / "a", records), "lr_warmup_unfinished")
    assert [d.severity for d in found] == ["warning", "warning"] and "still rising" in found[0].title
    records = make_records("healthy", n=20)
    set_lr(records, lambda i: min(1.0, (i + 1) / 5))
    assert not named(judge(tmp_path / "b", records), "lr_warmup_unfinished")
