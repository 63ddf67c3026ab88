"""The spike rules on synthetic runs: ``loss_spike`` and ``gradient_spike`` name where a spike
began, whether it recovered, and the group whose update ratio rose first; noise is no spike."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import Diagnosis, diagnose, load_run
from train_telemetry.analysis.rules import spikes
from train_telemetry.testing import make_meta, make_records, make_summary, write_run

N = 80
AT = 50  # the record where a spike is injected


def lm_records(seed: int = 0, n: int = N) -> list[dict[str, Any]]:
    """A language-model-like run: one record per step, the loss falling 4.2 -> ~2.4 with 3%
    batch noise, gradient norms with 15% noise, steady update ratios."""
    rng = random.Random(seed)
    records = make_records("healthy", n=n, every=1, seed=seed)
    for i, r in enumerate(records):
        r["train"]["loss"] = (2.4 + 1.8 * math.exp(-i / 10)) * (1 + rng.uniform(-0.03, 0.03))
    return records


def run_of(tmp_path: Path, records: list[dict[str, Any]]) -> list[Diagnosis]:
    directory = write_run(tmp_path / "run", records, meta=make_meta(), summary=make_summary(len(records)))
    return diagnose(load_run(directory))


def found(diagnoses: list[Diagnosis], code: str) -> list[Diagnosis]:
    return [d for d in diagnoses if d.code == code]


def test_a_recovered_loss_spike_names_its_start_its_recovery_and_the_group_that_moved_first(
    tmp_path: Path,
) -> None:
    """An LR bump: the head's update ratio jumps at step AT, the loss doubles from AT + 1 for
    three steps and comes back: a warning at step AT + 1, recovered, 'head' named before it."""
    records = lm_records()
    records[AT]["update_ratio"]["head"] *= 20
    for i in (AT + 1, AT + 2, AT + 3):
        records[i]["train"]["loss"] *= 2.0
    diagnoses = run_of(tmp_path, records)
    [spike] = found(diagnoses, "loss_spike")
    assert spike.severity == "warning"
    assert spike.subject == f"step {AT + 1}"
    assert "recovered by step 54" in spike.title
    assert "'head' update ratio" in spike.title and f"from step {AT}" in spike.title
    assert spike.evidence[0].step == AT + 1
    assert any(e.values.get("group") == "head" and e.step == AT for e in spike.evidence)
    assert "LR" in spike.hint


def test_a_loss_that_jumps_and_stays_up_is_a_serious_diverged_spike(tmp_path: Path) -> None:
    """The loss triples from step AT to the end: serious, 'never came back'."""
    records = lm_records()
    for r in records[AT:]:
        r["train"]["loss"] *= 3.0
    [spike] = found(run_of(tmp_path, records), "loss_spike")
    assert spike.severity == "serious"
    assert spike.subject == f"step {AT}"
    assert "diverged" in spike.title and "never came back" in spike.title


def test_a_spike_that_turns_nan_diverged_and_nan_alone_is_no_spike() -> None:
    """A jump then NaN: a spike that diverged, with the step it turned NaN. NaN with no jump
    before it is the nonfinite rule's, not a spike."""
    flat = [(s, 2.5 + 0.01 * (s % 3)) for s in range(30)]
    [spike] = spikes.find_spikes([*flat, (30, 6.0), (31, math.nan), (32, math.nan)], ratio=1.5)
    assert spike.start == 30 and spike.nonfinite_at == 31 and not spike.recovered
    assert spikes.find_spikes([*flat, (30, math.nan), (31, math.nan)], ratio=1.5) == []


@pytest.mark.parametrize("seed", range(6))
def test_batch_noise_and_a_falling_loss_are_no_spike(tmp_path: Path, seed: int) -> None:
    """A noisy falling loss (and 15% gradient-norm noise) gives no spike of either kind."""
    diagnoses = run_of(tmp_path, lm_records(seed))
    assert not found(diagnoses, "loss_spike") and not found(diagnoses, "gradient_spike")


def test_a_noisy_classifier_loss_near_zero_is_no_spike() -> None:
    """A converged classifier's batch loss ~0.02 that triples on a hard batch, as such losses
    do all the time, is below the rise a spike needs (10% of the loss at the start)."""
    rng = random.Random(0)
    series = [(s, 0.7 * math.exp(-s / 8) + 0.02 * rng.choice([1, 1, 1, 3])) for s in range(100)]
    assert spikes.find_spikes(series, ratio=spikes.LOSS_SPIKE_RATIO, min_rise=spikes.LOSS_SPIKE_MIN_RISE) == []


def test_a_gradient_spike_before_clipping_is_found_in_the_pre_clip_norms(tmp_path: Path) -> None:
    """Clipping hides the spike from the applied norm: the pre-clip norm shows it, and the
    diagnosis says which series it read."""
    records = lm_records()
    for r in records:
        applied = dict(r["gradient_norm"])
        r["gradient_norm_pre_clip"] = applied
        r["gradient_norm"] = {k: (min(v, 1.0) if v is not None else None) for k, v in applied.items()}
    records[AT]["gradient_norm_pre_clip"] = {k: v * 12 for k, v in records[AT]["gradient_norm_pre_clip"].items()}
    records[AT]["gradient_norm"] = {k: min(v, 1.0) for k, v in records[AT]["gradient_norm_pre_clip"].items()}
    [spike] = found(run_of(tmp_path, records), "gradient_spike")
    assert spike.subject == f"step {AT}"
    assert spike.severity == "warning" and "recovered" in spike.title
    assert "gradient_norm_pre_clip" in spike.evidence[0].values


def test_spikes_report_at_most_the_largest_few(tmp_path: Path) -> None:
    """A run with many spikes names the MAX_SPIKES_NAMED largest and says how many there were."""
    records = lm_records(n=160)
    for i in range(40, 160, 12):
        records[i]["train"]["loss"] *= 2.5
    loss = found(run_of(tmp_path, records), "loss_spike")
    assert len(loss) == spikes.MAX_SPIKES_NAMED
    assert "one of 10 spikes" in loss[0].title
