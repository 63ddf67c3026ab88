"""The class mix of the training batches (``batch_stats``): ``single_class_batches``,
``data_imbalance``.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from train_telemetry.analysis.load import Run, class_sort_key
from train_telemetry.analysis.rules._common import per_run, pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# --- single_class_batches ------------------------------------------------------------------
# Single-class batches are expected by chance with probability sum_c prior_c ** batch_size
# (e.g. 2/256 for balanced binary batches of 8); they are flagged when at least 2 batches and
# 20% of them are single-class and that is 5x more than chance; 50% or more is serious.
SINGLE_CLASS_MIN_FRACTION = 0.2
SINGLE_CLASS_EXCESS = 5.0
SINGLE_CLASS_SERIOUS_FRACTION = 0.5
# The holdout's labels stand for the class prior once there are this many of them (the
# number that a prediction collapse needs too: fewer show no class mix convincingly).
PRIOR_MIN_HOLDOUT_LABELS = 10

# --- data_imbalance ------------------------------------------------------------------------
# Class shares (pooled over the recorded batches) differing 3x between the most and the least
# common class is imbalance; judged only with >= 20 samples per class on average, where
# sampling noise alone stays well under 2x.
IMBALANCE_RATIO = 3.0
IMBALANCE_MIN_PER_CLASS = 20


@dataclass(frozen=True)
class _ClassMix:
    """The recorded batches' classes, beside the holdout's labels."""

    batches: list[tuple[int, dict[str, float], float | None]]  # (step, class shares, batch size)
    holdout_labels: list[str]
    prior: dict[str, float]  # pooled class shares of the batches, holdout-only classes at 0
    present: set[str]  # the classes the batches hold
    sizes: list[float]  # the batch sizes recorded


@per_run
def _class_mix(run: Run) -> _ClassMix | None:
    """None when no batch recorded its classes."""
    batches = run.batch_classes()
    if not batches:
        return None
    holdout = run.holdout()
    holdout_labels = [str(v) for v in (holdout[-1][2].labels or [])] if holdout else []
    prior = run.class_shares(holdout_labels)
    return _ClassMix(
        batches=batches,
        holdout_labels=holdout_labels,
        prior=prior,
        present={c for c, p in prior.items() if p > 0},
        sizes=[bs for _, _, bs in batches if bs],
    )


class SingleClassBatches(Rule):
    code = "single_class_batches"
    severity = "serious"
    summary = (
        f"{SINGLE_CLASS_MIN_FRACTION:.0%} or more of the recorded batches hold a single class, "
        f"{SINGLE_CLASS_EXCESS:g}x what chance gives (data not shuffled)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        mix = _class_mix(run)
        if mix is None:
            return []
        batches, holdout_labels = mix.batches, mix.holdout_labels
        batch_size = statistics.median(mix.sizes) if mix.sizes else None
        singles = [
            (s, cs)
            for s, cs, bs in batches
            if sum(1 for p in cs.values() if p > 0) == 1 and (bs is None or bs > 1)
        ]
        # The chance of a single-class batch follows the data's class prior: the holdout's labels
        # when there are enough (a run that only ever saw class-0 batches still has class 1 there),
        # else the batches' own pooled shares.
        reference = mix.prior
        if len(holdout_labels) >= PRIOR_MIN_HOLDOUT_LABELS:
            reference = {
                c: holdout_labels.count(c) / len(holdout_labels) for c in set(holdout_labels)
            }
        if len(mix.present | set(reference)) < 2 or not batch_size or batch_size <= 1:
            return []
        p_single = sum(p**batch_size for p in reference.values())
        frac = len(singles) / len(batches)
        if len(singles) < 2 or frac < max(
            SINGLE_CLASS_MIN_FRACTION, SINGLE_CLASS_EXCESS * p_single
        ):
            return []
        return [
            self.diagnosis(
                # Fewer than half: most batches still mix classes, a warning.
                severity="serious" if frac >= SINGLE_CLASS_SERIOUS_FRACTION else "warning",
                title=f"{len(singles)} of {len(batches)} recorded batches hold a single class "
                f"(expected by chance: {p_single:.1%})",
                evidence=[
                    Evidence(
                        s,
                        {
                            "class": next(c for c, p in cs.items() if p > 0),
                            "batch_size": batch_size,
                        },
                    )
                    for s, cs in pick(singles)
                ],
                hint="the data is not shuffled (sorted by label?): use shuffle=True or a sampler "
                "that mixes classes within each batch",
            )
        ]


class DataImbalance(Rule):
    code = "data_imbalance"
    severity = "warning"
    summary = (
        f"the most common class of the recorded batches is {IMBALANCE_RATIO:g}x the least "
        "common, or a holdout class never appears in them (serious)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        mix = _class_mix(run)
        if mix is None:
            return []
        prior, classes = mix.prior, list(mix.prior)
        samples = sum(mix.sizes) if mix.sizes else len(mix.batches)
        # Labels per token (a tagger: batch_stats counts ``tokens``) are imbalanced by nature
        # ("O" outnumbers every entity tag) and no sampler can rebalance tokens within a sequence.
        per_token = any("tokens" in (r.batch_stats or {}) for r in run.records)
        if per_token or len(classes) < 2 or samples / len(classes) < IMBALANCE_MIN_PER_CLASS:
            return []
        most = max(classes, key=lambda c: prior[c])
        least = min(classes, key=lambda c: prior[c])
        absent = [c for c in mix.holdout_labels if c not in mix.present]
        ratio = prior[most] / prior[least] if prior[least] > 0 else math.inf
        if ratio < IMBALANCE_RATIO:
            return []
        shares = {f"class {c}": round(prior[c], 4) for c in classes}
        return [
            self.diagnosis(
                # A class the model never trains on but is judged on: serious.
                severity="serious" if absent else "warning",
                title=(
                    f"class(es) {', '.join(sorted(set(absent), key=class_sort_key))} of the holdout never appear in "
                    f"{len(mix.batches)} recorded training batches"
                    if absent
                    else f"batches are imbalanced: class {most} is {prior[most]:.0%} of samples, "
                    f"class {least} {prior[least]:.0%} ({ratio:.3g}x)"
                ),
                evidence=[Evidence(None, shares)],
                hint="rebalance the sampler (WeightedRandomSampler) or weight the loss per class; "
                "check the split did not drop classes",
            )
        ]
