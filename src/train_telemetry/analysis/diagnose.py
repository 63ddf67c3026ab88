"""The diagnoses: pure functions from a run's records (plus run.json/summary.json) to findings.

Runs in: any process that reads a run (no torch).

Each detector takes a :class:`~train_telemetry.analysis.load.Run` and returns a list of
:class:`Diagnosis` (code, severity, title, evidence, hint). ``code`` is stable: tests,
scripts and the ``--json`` output key on it. The thresholds are module constants with the
reason for their value; they are chosen so that a run of a handful of records can be
judged and a healthy but noisy run is not flagged. "serious" means the run is not doing
what it should (the CLI exits 1); "warning" deserves a look; "info" is bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from train_telemetry.analysis.load import (
    PRE_CLIP,
    UNASSIGNED,
    Run,
    class_sort_key,
    format_number,
    holdout_accuracy,
    holdout_chance,
    holdout_class_count,
    holdout_is_sequence,
    number,
)
from train_telemetry.records import OVERALL, nonfinite_keys

__all__ = [
    "CODES",
    "DETECTORS",
    "Diagnosis",
    "Evidence",
    "Severity",
    "diagnose",
    "is_serious",
]

Severity = Literal["info", "warning", "serious"]
_SEVERITY_ORDER = {"serious": 0, "warning": 1, "info": 2}

# In report order within a severity: causes first (what to fix), then the symptoms they
# produce (a frozen backbone or single-class batches also leave the holdout at chance; a
# batch that switches class makes the gradients surge; gradients never zeroed or dead ReLUs
# make gradients grow or vanish and training swing or stall).
CODES = (
    "nonfinite",
    "gradients_not_zeroed",
    "eval_mode_training",
    "frozen_batchnorm_stats",
    "single_class_batches",
    "data_imbalance",
    "frozen_group",
    "lr_ratio_mismatch",
    "dying_relu",
    "saturated_activations",
    "exploding_gradients",
    "vanishing_gradients",
    "unstable_training",
    "update_ratio_inverted",
    "overfitting",
    "non_convergence",
    "no_learning",
    "prediction_collapse",
    "dropped_snapshots",
    "telemetry_errors",
    "incomplete_run",
)

# --- how much data a judgement needs -------------------------------------------------------
# A trend needs an "early" and a "late" part that do not overlap: with 3 records they are the
# first and the last one. Fewer records and the trend detectors stay silent.
MIN_TREND_RECORDS = 3
# How many (step, values) points a diagnosis shows: enough to see the shape, short enough to read.
EVIDENCE_POINTS = 5

# --- gradients -----------------------------------------------------------------------------
# Healthy runs keep a group's gradient norm within ~10-20x of its early level (the demo's
# healthy run: 0.09 -> 1.4 as the loss surface sharpens); a late level (median of the last
# third) 100x the early one (the larger of the first value and the first third's median, so
# that near-zero early gradients, e.g. a loss already ~0 on single-class batches, do not
# count as a start) is a blow-up. A one-off spike that settles again is not.
EXPLODING_GROWTH = 100.0
# update_ratio is the weight change over one collection interval / the weight norm. Healthy
# runs stay under ~0.5 even in the first interval from initialisation (demo: 0.42), a 100x
# head LR reaches ~3; at 10 the weights were replaced by whatever the updates were: the LR
# is far too high (the demo's 300x LR: ~100 in the first interval, then dead ReLUs).
EXPLODING_UPDATE_RATIO = 10.0
# Gradient growth that the train loss shares (loss up 10x or more over the same stretch) is
# a loss surge: the model meets data it is confidently wrong about (the demo's label-sorted
# batches switching class: grads 200x, loss 1000x). It is a warning pointing at the data,
# not a serious "lower the LR"; an unstable optimiser shows as growth alone, Inf/NaN, or
# exploding updates.
LOSS_SURGE_GROWTH = 10.0
# With clipping recorded, the pre-clip norm jumping 10x its early level (the growth that
# EXPLODING_BEFORE_NAN_GROWTH already counts as a blow-up) and past max_norm in at least 2
# records is a warning even when it settles again: the applied norm cannot show it (clipping
# caps it at max_norm), and each such step is a loss spike that clipping only bounds. One
# spike alone is left alone, as it is without clipping. The early level is the larger of the
# first value and the first third's median, so the large norms of the first steps from
# initialisation raise the bar instead of counting as spikes.
CLIP_SPIKE_GROWTH = 10.0
CLIP_SPIKE_MIN_RECORDS = 2
# A gradient norm that turns NaN after growing this much since the early records was
# exploding, not poisoned by a bad input (that shows as NaN without growth: code nonfinite).
EXPLODING_BEFORE_NAN_GROWTH = 10.0
# Below 1e-7 a gradient is under float32 resolution of weights of order 1: updates are lost.
VANISHING_NORM = 1e-7
# Converging runs shrink gradients 10-100x; 1e-4 of the early level with the loss not near 0
# means the signal is not reaching the group.
VANISHING_DECAY = 1e-4
# Train loss below this fraction of its early level, or below this absolute value: tiny
# gradients are expected (converged, or a loss ~0 on easy batches).
CONVERGED_LOSS_FRACTION = 0.1
CONVERGED_LOSS_ABS = 1e-4

# --- frozen groups -------------------------------------------------------------------------
# weight_delta / weight_norm below this counts as "did not move": the checkpoint copy is exact,
# so a frozen group's delta is 0.0; 1e-10 only absorbs summation rounding.
FROZEN_RELATIVE_DELTA = 1e-10
# A group must look frozen in this many records (all of them) before it is called frozen;
# one record without gradients can be a branch that a batch did not use.
MIN_FROZEN_RECORDS = 2

# --- learning rates ------------------------------------------------------------------------
# Observed LR ratio / expected ratio beyond 1.1x is a configuration difference (LRs are exact
# numbers, not measurements); beyond 2x it changes training materially.
LR_RATIO_WARNING_FACTOR = 1.1
LR_RATIO_SERIOUS_FACTOR = 2.0
# Groups whose intended LRs differ at least 2x have an intended order of update sizes ...
UPDATE_ORDER_MIN_LR_FACTOR = 2.0
# ... and that order counts as inverted when the group meant to move faster moves 2x slower
# (median update/weight ratio); the margin absorbs per-layer scale differences under Adam.
UPDATE_INVERSION_FACTOR = 2.0

# --- holdout and train trends --------------------------------------------------------------
# "At chance" allows two standard errors of a binomial accuracy on the holdout (0.14 for 50
# examples at 50%), and never less than 5 points.
CHANCE_MARGIN_MIN = 0.05
CHANCE_MARGIN_SE = 2.0
# Train loss falling 10% (late third mean vs early third mean) or train accuracy rising 10
# points is learning; single-batch losses are noisy, hence the thirds and the margins.
TRAIN_LOSS_DROP = 0.10
TRAIN_ACC_RISE = 0.10
# ... but a falling loss with the train accuracy still within 10 points of chance is a loss
# recovering from divergence (the demo's 300x LR: 50 -> 0.69 = ln 2), not learning.
TRAIN_ACC_ABOVE_CHANCE = 0.10
# A holdout accuracy this far (and beyond the chance margin) below its smoothed peak is falling.
OVERFIT_DROP_MIN = 0.05
# Overfitting also needs the train batches' accuracy (late third) 20 points above the holdout's:
# a gap beyond the noise of both (+-0.09 for a batch of 32, +-0.07 for 50 holdout examples).
# The demo's frozen backbone (head slowly fitting random features: train 0.53 -> 0.67,
# holdout 0.52) stays below it.
OVERFIT_TRAIN_GAP = 0.20

# --- sequence (language-model) holdouts -----------------------------------------------------
# Token labels have no chance accuracy to compare with (a vocabulary whose token frequencies
# the records do not hold), so learning is judged on the holdout's per-token loss. It is
# deterministic (the same sequences, eval mode) and moves only when the weights do, so small
# margins are real: a late-third mean less than 1% below the early third's (and per-token
# accuracy up less than 1 point) is a holdout that did not move; a fine-tune at a low LR
# still moves it a few percent over a run.
SEQ_LOSS_FALL = 0.01
SEQ_ACC_RISE = 0.01
# A late-third mean 5% above the smoothed minimum (reached before the end) is a holdout loss
# that rose again: what overfitting looks like for an LM (eval loss up while train loss falls).
SEQ_LOSS_RISE = 0.05

# --- holdout predictions -------------------------------------------------------------------
# One class for >= 95% of the holdout, 20 points more than that class's true share: collapsed.
COLLAPSE_SHARE = 0.95
COLLAPSE_EXCESS = 0.20
# Fewer holdout examples cannot show a collapse convincingly.
COLLAPSE_MIN_EXAMPLES = 10
# A freshly initialised network often predicts one class for everything: a collapse counts
# only when it holds in at least 2 records of the run's second half (and in the last one).
COLLAPSE_MIN_RECORDS = 2

# --- batches -------------------------------------------------------------------------------
# Single-class batches are expected by chance with probability sum_c prior_c ** batch_size
# (e.g. 2/256 for balanced binary batches of 8); they are flagged when at least 2 batches and
# 20% of them are single-class and that is 5x more than chance; 50% or more is serious.
SINGLE_CLASS_MIN_FRACTION = 0.2
SINGLE_CLASS_EXCESS = 5.0
SINGLE_CLASS_SERIOUS_FRACTION = 0.5
# Class shares (pooled over the recorded batches) differing 3x between the most and the least
# common class is imbalance; judged only with >= 20 samples per class on average, where
# sampling noise alone stays well under 2x.
IMBALANCE_RATIO = 3.0
IMBALANCE_MIN_PER_CLASS = 20

# --- silent bugs: gradients never zeroed ----------------------------------------------------
# Without optimizer.zero_grad() the .grad the hook sees at step s is the sum of every batch's
# gradient since the start: its norm grows like s when the per-step gradients are correlated
# (early training: they point the same way) and at least like sqrt(s) when they are not, and
# between two collections it changes only by the few batches added to a long sum. A healthy
# run's gradient is one batch's: it moves around its level with the batch (the demo's healthy
# run grows 0.09 -> 1.6 early, then swings +-40% between collections). The signature, judged
# on at least 6 records:
NOT_ZEROED_MIN_RECORDS = 6
# ... over the second half of the run the log gradient norm rises steadily: its net rise is at
# least half its total variation (measured: runs without zero_grad 0.57-0.78 on the demo, iris,
# wine; healthy runs ~0, the demo's 0.24: noise around a level) ...
NOT_ZEROED_STEADINESS = 0.5
# ... by at least (s_last / s_mid) ** 0.4 (a sum of s gradients grows at least like sqrt(s);
# 0.4 leaves room for the noise of the end points) and at most 4 * (s_last / s_mid) ** 2 (a
# sum cannot grow much faster than linearly: exponential growth is an explosion) ...
NOT_ZEROED_MIN_EXPONENT = 0.4
NOT_ZEROED_MAX_EXPONENT = 2.0
NOT_ZEROED_MAX_SLACK = 4.0
# ... the whole run's late level is at least 2x its early level (as for exploding gradients) ...
NOT_ZEROED_GROWTH = 2.0
# ... or, once the loss is ~0 and the batches add ~nothing, the sum stays where it got to: the
# second half's median change between collections under 5% (one batch's gradient changes
# 20-50% with the batch, a sum of hundreds by its last few terms) after 2x growth from the
# first record, while the train loss fell to half or less (a real gradient follows the loss
# down) ...
NOT_ZEROED_PLATEAU_JITTER = 0.05
NOT_ZEROED_PLATEAU_LOSS_DROP = 0.5
# ... with no NaN/Inf and without a 10x loss surge (LOSS_SURGE_GROWTH): growth that the loss
# shares, or that ends in Inf, is an explosion or a data problem, not an accumulating sum.

# --- silent bugs: activations (the ``activations`` record key) ------------------------------
# DeepDiagnosis flags dead ReLUs at >= 70% of activations <= 0. dead_fraction counts units
# that never fire over the whole holdout, stricter than a share of activations, so a layer at
# 70% has lost most of its units for every input (healthy layers stay under ~20%).
DEAD_RELU_FRACTION = 0.7
# At 70% the layer still passes signal through the rest (a warning; the demo's runs that learn
# nothing end with their head's ReLUs 70-77% dead as a symptom); at 90% it is cut: serious.
DEAD_RELU_SERIOUS_FRACTION = 0.9
# DeepDiagnosis flags tanh/sigmoid saturation at > 50% of pre-activations beyond +-5;
# saturated_fraction (|tanh| > 0.99, sigmoid < 0.01 or > 0.99) is the same idea at +-2.6 / +-4.6.
SATURATED_FRACTION = 0.5
# Judged on the last third of the records (median), so that one bad holdout pass is not enough;
# a layer must hold it in at least this many records.
MIN_ACTIVATION_RECORDS = 2

# --- silent bugs: model mode (the ``model_mode`` record key) --------------------------------
# model.training == 0 at the hook in this many records (and half of them, and the last one)
# is a loop that trains in eval mode; one record can be a loop that evaluated just before.
MIN_MODE_RECORDS = 2
# batchnorm_stat_change is relative (||running - previous|| / ||previous||): with the default
# momentum 0.1 healthy BN layers move their stats by 1e-3..1e-1 per collection; float32
# rounding alone is ~1e-7. At most 1e-6 in every record (at least 2) is frozen.
FROZEN_BN_CHANGE = 1e-6

# --- training dynamics ---------------------------------------------------------------------
# Unstable: consecutive-record swings of the train loss (or gradient norm) in the last third
# (median) at least 3x those of the first third, as large as half the level (the larger of the
# first and last thirds' medians: a loss that falls to ~0.01 and spikes on a hard batch is
# not unstable, one that keeps jumping back to half its starting level is) and changing direction in >= 40% of the second half's steps (random noise turns in ~2/3; a
# monotone surge or explosion turns rarely and is exploding_gradients). Healthy runs' swings
# shrink or stay with the level (the demo's: 1-1.8x).
UNSTABLE_MIN_RECORDS = 6
UNSTABLE_GROWTH = 3.0
UNSTABLE_SWING = 0.5
UNSTABLE_TURNS = 0.4
# Non-convergence (AutoTrainer): the train loss has stopped improving over the second half
# (last third's mean within 5% of the middle third's, or above it) while it is still high:
# 2x or more the best holdout loss of the run (the holdout shows that much lower is
# reachable; dropout alone makes a train loss ~1.2-1.5x the eval loss) and at least 30% of
# chance level (ln of the class count: a uniform guess), so that a near-zero loss's noise
# does not count. It is left to no_learning when the holdout stays at chance.
NONCONV_MIN_RECORDS = 6
NONCONV_STALL = 0.05
NONCONV_HOLDOUT_GAP = 2.0
NONCONV_MIN_CHANCE_SHARE = 0.3

# --- the collector itself ------------------------------------------------------------------
# Dropping more than 10% of snapshots leaves holes in every trend: warn; fewer is bookkeeping.
DROPPED_WARNING_FRACTION = 0.10


@dataclass(frozen=True)
class Evidence:
    """One point of a diagnosis: where (the run's monotonic step) and the values there.

    ``epoch`` and ``batch_idx`` are the record's own counters, filled in by :func:`diagnose`
    (they differ from ``step`` where the training loop restarts batch_idx each epoch).
    """

    step: int | None
    values: dict[str, Any]
    epoch: int | None = None
    batch_idx: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "values": dict(self.values),
        }


@dataclass(frozen=True)
class Diagnosis:
    """A finding about a run: what (``code``), how bad, the evidence, and what to try."""

    code: str
    severity: Severity
    title: str
    hint: str
    evidence: list[Evidence] = field(default_factory=list)
    subject: str | None = None  # the group or class it is about, when it is about one

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies the finding across re-diagnoses of a growing run (for ``watch``)."""
        return (self.code, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "subject": self.subject,
            "title": self.title,
            "evidence": [e.to_dict() for e in self.evidence],
            "hint": self.hint,
        }


def is_serious(diagnoses: Iterable[Diagnosis]) -> bool:
    """Whether any diagnosis is serious (the CLI's exit status 1)."""
    return any(d.severity == "serious" for d in diagnoses)


# --- small helpers -------------------------------------------------------------------------


def _thirds(values: Sequence[float]) -> tuple[list[float], list[float]]:
    k = max(1, len(values) // 3)
    return list(values[:k]), list(values[-k:])


def _pick(items: Sequence[Any], n: int = EVIDENCE_POINTS) -> list[Any]:
    """Up to ``n`` items spread evenly, always the first and the last."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _train_trend(run: Run, chance: float | None = None) -> dict[str, Any]:
    """Whether the training batches show learning: early/late loss and accuracy, and the verdict.

    ``chance`` (the holdout's chance accuracy, same task) lets a falling loss count only
    when the train accuracy is clearly above it.
    """
    losses = [v for _, v in run.series("train", "loss", finite=True)]
    accs = [v for _, v in run.series("train", "accuracy", finite=True)]
    out: dict[str, Any] = {"improving": False, "known": False}
    if len(accs) >= MIN_TREND_RECORDS:
        early, late = _thirds(accs)
        out.update(acc_early=statistics.fmean(early), acc_late=statistics.fmean(late), known=True)
        if out["acc_late"] - out["acc_early"] >= TRAIN_ACC_RISE:
            out["improving"] = True
    if len(losses) >= MIN_TREND_RECORDS:
        early, late = _thirds(losses)
        out.update(loss_early=statistics.fmean(early), loss_late=statistics.fmean(late), known=True)
        above_chance = (
            chance is None
            or "acc_late" not in out
            or out["acc_late"] >= chance + TRAIN_ACC_ABOVE_CHANCE
        )
        if (
            out["loss_early"] > 0
            and out["loss_late"] <= out["loss_early"] * (1 - TRAIN_LOSS_DROP)
            and above_chance
        ):
            out["improving"] = True
    return out


def _chance_margin(p: float, n: int) -> float:
    se = math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.5
    return max(CHANCE_MARGIN_MIN, CHANCE_MARGIN_SE * se)


# --- detectors -----------------------------------------------------------------------------


def _value_at(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _nonfinite_in(record: dict[str, Any]) -> dict[str, Any]:
    """ "family.key" -> value for each NaN/Inf in the record (its own list plus a scan)."""
    listed = record.get("nonfinite")
    keys = [k for k in listed if isinstance(k, str)] if isinstance(listed, list) else []
    found: dict[str, Any] = {}
    for key in [*keys, *nonfinite_keys(record)]:
        value = number(_value_at(record, key))
        found[key] = value if value is not None else "non-finite"
    return found


def detect_nonfinite(run: Run) -> list[Diagnosis]:
    """NaN/Inf anywhere in the metrics (the record's ``nonfinite`` list or the values)."""
    hits = []
    for i, record in enumerate(run.records):
        found = _nonfinite_in(record)
        if found:
            hits.append(Evidence(run.step(i), found))
    if not hits:
        return []
    first = hits[0]
    keys = ", ".join(sorted(first.values)[:4]) + (", ..." if len(first.values) > 4 else "")
    return [
        Diagnosis(
            code="nonfinite",
            severity="serious",
            title=f"NaN/Inf in {len(hits)} of {len(run.records)} records, first at step {first.step}: {keys}",
            evidence=_pick(hits),
            hint="training diverged or met bad data: lower the LR, clip gradients "
            "(clip_grad_norm_), check inputs and loss for NaN; with AMP use a GradScaler",
        )
    ]


def _growth(values: Sequence[float]) -> tuple[float, float]:
    """(early level, late level) of a series: the larger of the first value and the first
    third's median, and the last third's median."""
    early_vals, late_vals = _thirds(values)
    return max(values[0], statistics.median(early_vals)), statistics.median(late_vals)


def _grad_words(run: Run, group: str) -> tuple[str, str]:
    """(evidence key, words) for the gradient norms the diagnoses read: pre-clip when recorded."""
    if run.gradient_norm_source(group) == "gradient_norm":
        return "gradient_norm", "gradient norm"
    return PRE_CLIP, "pre-clip gradient norm"


def _clip_spikes(
    run: Run, group: str, finite: Sequence[tuple[int, float]], base: float
) -> list[tuple[int, float]]:
    """The records where ``group``'s pre-clip norm jumped CLIP_SPIKE_GROWTH x its early level
    (``base``) and past max_norm; [] when the run recorded no clipping."""
    if run.gradient_norm_source(group) == "gradient_norm" or base <= 0:
        return []
    max_norm = run.clip_max_norm()
    return [
        (s, v)
        for s, v in finite
        if v >= CLIP_SPIKE_GROWTH * base and (max_norm is None or v > max_norm)
    ]


def _exploding(run: Run, group: str) -> Diagnosis | None:
    series = run.gradient_norm_series(group)
    key, words = _grad_words(run, group)
    first_bad = next((i for i, (_, v) in enumerate(series) if not math.isfinite(v)), None)
    finite = series[:first_bad] if first_bad is not None else series
    severity: Severity = "serious"
    why = None
    points = [Evidence(s, {key: v, "lr": _lr_at(run, s, group)}) for s, v in _pick(finite)]
    base, late = _growth([v for _, v in finite]) if finite else (0.0, 0.0)
    if first_bad is not None:
        bad_step, bad_value = series[first_bad]
        peak = max((v for _, v in finite), default=0.0)
        if (
            not finite
            or bad_value == math.inf
            or (base > 0 and peak / base >= EXPLODING_BEFORE_NAN_GROWTH)
        ):
            why = f"{words} became {bad_value} at step {bad_step}" + (
                f" (from {format_number(base)} early)" if finite else ""
            )
            points.append(Evidence(bad_step, {key: bad_value, "lr": _lr_at(run, bad_step, group)}))
    if why is None:
        big = [
            (s, v)
            for s, v in run.series("update_ratio", group, finite=True)
            if v >= EXPLODING_UPDATE_RATIO
        ]
        if big:
            s, v = max(big, key=lambda sv: sv[1])
            why = (
                f"weights moved {v:.3g}x their own norm between two collections (step {s}, "
                f"LR {format_number(_lr_at(run, s, group))}): the updates exploded"
            )
            points = [
                Evidence(
                    s,
                    {
                        "update_ratio": v,
                        "gradient_norm": run.value(run.records[i], "gradient_norm", group),
                        "lr": run.learning_rate(run.records[i], group),
                    },
                )
                for s, v in _pick(big)
                if (i := run.index_of(s)) is not None
            ]
    if (
        why is None
        and len(finite) >= MIN_TREND_RECORDS
        and base > 0
        and late / base >= EXPLODING_GROWTH
    ):
        why = (
            f"{words} grew {late / base:.3g}x: from {format_number(base)} early to {format_number(late)} "
            f"(median of the last {max(1, len(finite) // 3)} records)"
        )
        losses = [v for _, v in run.series("train", "loss", finite=True)]
        loss_base, loss_late = _growth(losses) if len(losses) >= MIN_TREND_RECORDS else (0.0, 0.0)
        if loss_base > 0 and loss_late / loss_base >= LOSS_SURGE_GROWTH:
            severity = "warning"
            why += f", with the train loss ({format_number(loss_base)} -> {format_number(loss_late)}): a loss surge"
    spikes = (
        _clip_spikes(run, group, finite, base)
        if why is None and len(finite) >= MIN_TREND_RECORDS
        else []
    )
    if len(spikes) >= CLIP_SPIKE_MIN_RECORDS:
        severity = "warning"
        peak_step, peak = max(spikes, key=lambda sv: sv[1])
        max_norm = run.clip_max_norm()
        why = (
            f"{words} spiked to {format_number(peak)} at step {peak_step} ({peak / base:.3g}x its "
            f"early {format_number(base)}), {len(spikes)} records at {CLIP_SPIKE_GROWTH:g}x or more"
            + (f"; clipping at max_norm {format_number(max_norm)} hid them from the applied norm"
               if max_norm is not None else "")
        )
        points = [
            Evidence(s, {key: v, "gradient_norm": _applied_at(run, s, group), "lr": _lr_at(run, s, group)})
            for s, v in _pick(spikes)
        ]
    if why is None:
        return None
    hint = (
        "lower this group's LR (or add warm-up), clip gradients (clip_grad_norm_), "
        "check the loss scale and normalisation layers"
        if severity == "serious"
        else "the gradients follow the loss: find what changed in the data at the surge "
        "(batch balance, single-class batches) before touching the LR"
    )
    if spikes:
        hint = (
            "clipping bounds each step, but steps whose gradient is many times the usual are "
            "loss spikes: look at the batches at those steps (bad or very long examples), "
            "lower the LR or lengthen the warm-up, check the loss scale under AMP"
        )
    return Diagnosis(
        code="exploding_gradients",
        severity=severity,
        subject=group,
        title=f"group '{group}': {why}",
        evidence=points,
        hint=hint,
    )


def _vanishing(run: Run, group: str, converged: bool) -> Diagnosis | None:
    finite = run.gradient_norm_series(group, finite=True)
    key, words = _grad_words(run, group)
    if len(finite) < MIN_TREND_RECORDS or converged:
        return None
    early_vals, late_vals = _thirds([v for _, v in finite])
    base = statistics.median(early_vals)
    late = statistics.median(late_vals)
    if all(v == 0 for v in late_vals) and any(v > 0 for _, v in finite):
        since = next(s for s, v in reversed(finite) if v > 0)
        why = f"is exactly 0 since after step {since} (dead units: no gradient flows)"
    elif 0 < late < VANISHING_NORM:
        why = f"is {format_number(late)} (median of the last {len(late_vals)} records), below {VANISHING_NORM:g}"
    elif base > 0 and late > 0 and late / base < VANISHING_DECAY:
        why = f"fell {base / late:.3g}x, from {format_number(base)} early to {format_number(late)} late, while the train loss did not converge"
    else:
        return None
    return Diagnosis(
        code="vanishing_gradients",
        severity="serious",
        subject=group,
        title=f"{words} of group '{group}' {why}",
        evidence=[Evidence(s, {key: v}) for s, v in _pick(finite)],
        hint="gradients are not reaching this group: check saturating or dead activations (an LR "
        "too high kills ReLUs), initialisation, missing normalisation/residual paths",
    )


# --- per-layer origin (the ``layers`` record key) ------------------------------------------


def _layer_series(run: Run, family: str, group: str) -> dict[str, list[tuple[int, float | None]]]:
    """{module: [(step, layers.<family>.<module>)]} in model order; the group's own modules
    (named ``<group>`` or ``<group>.*``) when there are any, since layers are not tagged by group."""
    out: dict[str, list[tuple[int, float | None]]] = {}
    for i, record in enumerate(run.records):
        layers = record.get("layers")
        values = layers.get(family) if isinstance(layers, dict) else None
        if isinstance(values, dict):
            for module, v in values.items():
                out.setdefault(str(module), []).append((run.step(i), number(v)))
    own = {m: v for m, v in out.items() if m == group or m.startswith(group + ".")}
    return own or out


def _layer_origin(run: Run, kind: str, group: str) -> tuple[str, int | None, dict[str, Any]] | None:
    """(module, step, values) of the layer where a group's gradient problem starts.

    exploding: the layer whose gradient norm first becomes non-finite or 10x its early level
    (EXPLODING_BEFORE_NAN_GROWTH), earliest step first, then model order; vanishing: the
    layer nearest the output whose late gradient norm is 0, under VANISHING_NORM or
    VANISHING_DECAY of its early level (backprop loses the signal there and in every layer
    before it); frozen: the first layer, in model order, with no gradient or no update.
    """
    family = "update_ratio" if kind == "frozen" else "gradient_norm"
    series = _layer_series(run, family, group)
    if kind == "frozen":
        grads = _layer_series(run, "gradient_norm", group)
        for module, points in series.items():
            moved = [v for _, v in points if v is not None]
            no_grad = all(v is None or v == 0 for _, v in grads.get(module, []))
            if (moved and all(v <= FROZEN_RELATIVE_DELTA for v in moved)) or (
                not moved and grads.get(module) and no_grad
            ):
                return module, points[-1][0], {"layer": module, "layer_update_ratio": points[-1][1]}
        return None
    hits: list[tuple[int, int, str, dict[str, Any]]] = []
    for order, (module, points) in enumerate(series.items()):
        finite = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
        if kind == "exploding":
            base = _growth([v for _, v in finite])[0] if finite else 0.0
            for s, v in points:
                if v is not None and (
                    not math.isfinite(v) or (base > 0 and v >= EXPLODING_BEFORE_NAN_GROWTH * base)
                ):
                    hits.append((s, order, module, {"layer": module, "layer_gradient_norm": v}))
                    break
        elif len(finite) >= MIN_TREND_RECORDS:
            early_vals, late_vals = _thirds([v for _, v in finite])
            base, late = statistics.median(early_vals), statistics.median(late_vals)
            if late < VANISHING_NORM or (base > 0 and late / base < VANISHING_DECAY):
                hits.append(
                    (finite[-1][0], -order, module, {"layer": module, "layer_gradient_norm": late})
                )
    if not hits:
        return None
    step, _, module, values = min(hits)
    return module, step, values


def _with_layer(run: Run, found: Diagnosis, kind: str) -> Diagnosis:
    """``found`` naming the layer where it starts, when the records carry ``layers``."""
    origin = _layer_origin(run, kind, found.subject or OVERALL)
    if origin is None:
        return found
    module, step, values = origin
    where = {
        "exploding": f"starts in layer '{module}'"
        + (f" at step {step}" if step is not None else ""),
        "vanishing": f"lost at layer '{module}' (it and the layers before it)",
        "frozen": f"first frozen layer '{module}'",
    }[kind]
    return dataclasses.replace(
        found, title=f"{found.title}; {where}", evidence=[*found.evidence, Evidence(step, values)]
    )


def detect_gradients(run: Run) -> list[Diagnosis]:
    """Exploding (growth, Inf, NaN after growth, huge updates) or vanishing gradients, per group."""
    train = _train_trend(run)
    loss_early, loss_late = train.get("loss_early"), train.get("loss_late")
    # A loss at ~0 makes every gradient ~0: small gradients are then expected, not a problem.
    converged = loss_late is not None and (
        loss_late < CONVERGED_LOSS_ABS
        or (loss_early is not None and loss_late < loss_early * CONVERGED_LOSS_FRACTION)
    )
    out: list[Diagnosis] = []
    for group in run.groups or [OVERALL]:
        exploding = _exploding(run, group)
        found = exploding or _vanishing(run, group, converged)
        if found:
            out.append(_with_layer(run, found, "exploding" if exploding else "vanishing"))
    return out


def _applied_at(run: Run, step: int, group: str) -> float | None:
    index = run.index_of(step)
    return run.value(run.records[index], "gradient_norm", group) if index is not None else None


def _lr_at(run: Run, step: int, group: str) -> float | None:
    index = run.index_of(step)
    return run.learning_rate(run.records[index], group) if index is not None else None


def detect_frozen(run: Run) -> list[Diagnosis]:
    """A group whose weights never change: no gradients, zero LR, or zero weight delta."""
    out: list[Diagnosis] = []
    for group in run.groups:
        grads: list[float | None] = []
        lrs: list[float] = []
        moved: list[bool] = []
        points: list[Evidence] = []
        for i, record in enumerate(run.records):
            values: dict[str, Any] = {}
            if isinstance(record.get("gradient_norm"), dict):
                g = run.value(record, "gradient_norm", group)
                grads.append(g)
                values["gradient_norm"] = g
            lr = run.learning_rate(record, group)
            if lr is not None:
                lrs.append(lr)
                values["lr"] = lr
            delta = run.value(record, "weight_delta", group)
            if delta is not None:
                norm = run.value(record, "weight_norm", group)
                ratio = run.value(record, "update_ratio", group)
                if ratio is None and norm:
                    ratio = delta / norm
                still = delta == 0 or (ratio is not None and ratio <= FROZEN_RELATIVE_DELTA)
                moved.append(not still)
                values["weight_delta"] = delta
            if values:
                points.append(Evidence(run.step(i), values))
        if any(moved):
            continue  # it moved at some point: whatever the grads/LR say, it is not frozen
        if group == UNASSIGNED:
            out.extend(_unassigned_with_gradients(grads, points))
            continue
        no_grads = len(grads) >= MIN_FROZEN_RECORDS and all(g is None or g == 0 for g in grads)
        zero_lr = len(lrs) >= MIN_FROZEN_RECORDS and all(lr == 0 for lr in lrs)
        still = bool(moved)
        if not (still or no_grads or zero_lr):
            continue
        reasons = []
        if no_grads:
            reasons.append(
                "no gradients reach it"
                if all(g is None for g in grads)
                else "its gradients are all zero"
            )
        if zero_lr:
            reasons.append("its LR is 0")
        if still:
            reasons.append(f"its weights did not change in {len(moved)} intervals")
        out.append(
            Diagnosis(
                code="frozen_group",
                severity="serious",
                subject=group,
                title=f"group '{group}' is frozen: " + ", ".join(reasons),
                evidence=_pick(points),
                hint="if unintended: check requires_grad of its parameters, that the forward uses "
                "them without detach()/no_grad(), and its LR; if intended, leave the group out of "
                "the optimizer",
            )
        )
    # Layers are not tagged by group, and no module belongs to "unassigned" by name.
    return [d if d.subject == UNASSIGNED else _with_layer(run, d, "frozen") for d in out]


def _unassigned_with_gradients(
    grads: Sequence[float | None], points: Sequence[Evidence]
) -> list[Diagnosis]:
    """The ``unassigned`` group (parameters in no optimizer group) never moves by design; it
    is a problem only when its parameters receive gradients: backward pays for them and no
    optimizer step uses them (records cannot tell requires_grad, so null gradients count
    as frozen on purpose, e.g. a LoRA model's base)."""
    got = [g for g in grads if g is not None and g != 0]
    if not got:
        return []
    return [
        Diagnosis(
            code="frozen_group",
            severity="warning",
            subject=UNASSIGNED,
            title=f"parameters in no optimizer group receive gradients (norm up to "
            f"{format_number(max(got))} in {len(got)} of {len(grads)} records) but no optimizer "
            "updates them",
            evidence=_pick([e for e in points if e.values.get("gradient_norm")]),
            hint="if they should train, add them to the optimizer's param groups; if not, set "
            "requires_grad=False on them (saves their backward compute and memory)",
        )
    ]


def detect_lr_ratio(run: Run) -> list[Diagnosis]:
    """Observed per-group LR ratios against the config's ``expected_lr_ratios``."""
    expected = run.config.get("expected_lr_ratios")
    if not isinstance(expected, dict) or not expected:
        return []
    out: list[Diagnosis] = []
    groups = run.groups
    missing = [g for g in expected if g not in groups]
    if missing and groups:
        out.append(
            Diagnosis(
                code="lr_ratio_mismatch",
                severity="warning",
                subject=",".join(missing),
                title=f"expected_lr_ratios names group(s) {', '.join(repr(g) for g in missing)} "
                f"that the optimizer does not have (groups: {', '.join(groups)})",
                hint="name the param groups (param_groups[i]['name']) as expected_lr_ratios does",
            )
        )
    present = [g for g in expected if g in groups and number(expected[g])]
    if len(present) < 2:
        return out
    ref = min(present, key=lambda g: float(expected[g]))
    for group in present:
        if group == ref:
            continue
        want = float(expected[group]) / float(expected[ref])
        points: list[tuple[float, Evidence]] = []
        for i, record in enumerate(run.records):
            lr_g, lr_ref = run.learning_rate(record, group), run.learning_rate(record, ref)
            # A zero LR makes the ratio meaningless; that group is reported as frozen instead.
            if not lr_g or not lr_ref or not math.isfinite(lr_g) or not math.isfinite(lr_ref):
                continue
            got = lr_g / lr_ref
            points.append(
                (
                    got / want,
                    Evidence(run.step(i), {f"lr.{group}": lr_g, f"lr.{ref}": lr_ref, "ratio": got}),
                )
            )
        if not points:
            continue
        factor = statistics.median(f for f, _ in points)
        off = max(factor, 1 / factor)
        if off <= LR_RATIO_WARNING_FACTOR:
            continue
        got = want * factor
        out.append(
            Diagnosis(
                code="lr_ratio_mismatch",
                severity="serious" if off >= LR_RATIO_SERIOUS_FACTOR else "warning",
                subject=group,
                title=f"LR of '{group}' is {got:.3g}x that of '{ref}', expected {want:.3g}x "
                f"(expected_lr_ratios): off by {off:.3g}x",
                evidence=_pick([e for _, e in points]),
                hint=f"check the lr of each param group given to the optimizer and any scheduler "
                f"that scales groups differently; expected_lr_ratios is {expected}",
            )
        )
    return out


def detect_update_inversion(run: Run) -> list[Diagnosis]:
    """A group meant to move faster (higher intended LR) moving clearly slower than another."""
    groups = run.groups
    medians: dict[str, float] = {}
    for group in groups:
        values = [v for _, v in run.series("update_ratio", group, finite=True) if v > 0]
        if len(values) >= MIN_TREND_RECORDS - 1:
            medians[group] = statistics.median(values)
    expected = run.config.get("expected_lr_ratios")
    if isinstance(expected, dict) and all(number(expected.get(g)) for g in medians):
        intended = {g: float(expected[g]) for g in medians}
        source = "expected_lr_ratios"
    else:
        intended = {g: lr for g, lr in run.median_lrs().items() if g in medians}
        source = "their LRs"
    out: list[Diagnosis] = []
    for fast in medians:
        for slow in medians:
            if fast == slow or fast not in intended or slow not in intended or intended[slow] <= 0:
                continue
            if intended[fast] < UPDATE_ORDER_MIN_LR_FACTOR * intended[slow]:
                continue
            if medians[fast] * UPDATE_INVERSION_FACTOR > medians[slow]:
                continue
            evidence = [
                Evidence(
                    s,
                    {
                        f"update_ratio.{fast}": v,
                        f"update_ratio.{slow}": run.value(r, "update_ratio", slow),
                    },
                )
                for s, v, r in _pick(
                    [
                        (run.step(i), run.value(r, "update_ratio", fast), r)
                        for i, r in enumerate(run.records)
                        if run.value(r, "update_ratio", fast) is not None
                    ]
                )
            ]
            out.append(
                Diagnosis(
                    code="update_ratio_inverted",
                    severity="warning",
                    subject=f"{fast}<{slow}",
                    title=f"group '{fast}' should update {intended[fast] / intended[slow]:.3g}x faster than "
                    f"'{slow}' ({source}) but its median update/weight ratio is "
                    f"{format_number(medians[fast])} vs {format_number(medians[slow])}",
                    evidence=evidence,
                    hint="check which parameters went into which param group (a head in the "
                    "backbone's group inverts the intent), and each group's weight decay",
                )
            )
    return out


def _sequence_holdout_trend(run: Run) -> dict[str, Any] | None:
    """A sequence holdout's per-token loss over the run: early/late third means, the smoothed
    minimum and where, and the verdicts ``flat`` and ``rising``; None without enough records
    (or for a classifier's holdout)."""
    holdout = run.holdout()
    if not holdout or not holdout_is_sequence(holdout[-1][2]):
        return None
    losses = [
        (s, v) for s, _, h in holdout if (v := number(h.get("loss"))) is not None and math.isfinite(v)
    ]
    if len(losses) < MIN_TREND_RECORDS:
        return None
    values = [v for _, v in losses]
    early_vals, late_vals = _thirds(values)
    early, late = statistics.fmean(early_vals), statistics.fmean(late_vals)
    w = len(late_vals)
    smoothed = [statistics.fmean(values[i : i + w]) for i in range(len(values) - w + 1)]
    low_i = min(range(len(smoothed)), key=smoothed.__getitem__)
    low = smoothed[low_i]
    accs = [
        a for _, _, h in holdout if (a := holdout_accuracy(h)) is not None and math.isfinite(a)
    ]
    acc_rise = (
        statistics.fmean(_thirds(accs)[1]) - statistics.fmean(_thirds(accs)[0])
        if len(accs) >= MIN_TREND_RECORDS
        else None
    )
    return {
        "losses": losses,
        "early": early,
        "late": late,
        "low": low,
        # the step of the window's middle record
        "low_step": losses[low_i + w // 2][0],
        "flat": late > early * (1 - SEQ_LOSS_FALL) and (acc_rise is None or acc_rise < SEQ_ACC_RISE),
        "rising": low_i < len(smoothed) - 1 and late >= low * (1 + SEQ_LOSS_RISE),
    }


def _perplexity_text(a: float, b: float) -> str:
    """Per-token losses a -> b as perplexities (what LM users compare)."""

    def ppl(x: float) -> str:
        return format_number(math.exp(x)) if x < 700 else "Inf"

    return f"perplexity {ppl(a)} -> {ppl(b)}"


def _detect_sequence_learning(run: Run, trend: dict[str, Any]) -> list[Diagnosis]:
    """detect_learning for a sequence holdout: judged on its per-token loss (no chance level)."""
    train = _train_trend(run)
    train_by_step = {
        run.step(i): r.get("train")
        for i, r in enumerate(run.records)
        if isinstance(r.get("train"), dict)
    }
    acc_by_step = {s: holdout_accuracy(h) for s, _, h in run.holdout()}
    evidence = []
    for s, v in _pick(trend["losses"]):
        values_at: dict[str, Any] = {
            "holdout_loss": v, "holdout_accuracy": acc_by_step.get(s)
        }
        t = train_by_step.get(s)
        if isinstance(t, dict):
            values_at["train_loss"] = number(t.get("loss"))
        evidence.append(Evidence(s, values_at))
    train_text = _train_text(train)
    early, late, low = trend["early"], trend["late"], trend["low"]
    if train["improving"] and (trend["flat"] or trend["rising"]):
        what = (
            f"holdout per-token loss rose from {low:.4g} (step {trend['low_step']}) to {late:.4g} "
            f"({_perplexity_text(low, late)})"
            if trend["rising"]
            else f"holdout per-token loss did not fall ({early:.4g} -> {late:.4g}, "
            f"{_perplexity_text(early, late)})"
        )
        return [
            Diagnosis(
                code="overfitting",
                severity="serious",
                title=f"{what} while {train_text}",
                evidence=evidence,
                hint="the model fits the training text but not the holdout: stop earlier (the "
                "holdout's best step), lower the LR or the number of epochs, add data or "
                "regularisation; check that train and holdout come from the same distribution",
            )
        ]
    if trend["flat"]:
        return [
            Diagnosis(
                code="no_learning",
                severity="serious",
                title=f"holdout per-token loss does not fall ({early:.4g} -> {late:.4g}, "
                f"{_perplexity_text(early, late)})"
                + (f" and {train_text}" if train["known"] else "; no train loss recorded"),
                evidence=evidence,
                hint="nothing is being learned: a serious diagnosis listed above this one is the likely "
                "cause; else check the LR (too low, or a scheduler stuck at 0), that the trainable "
                "parameters (e.g. LoRA adapters) are in the optimizer, and that the labels are the "
                "tokens to predict",
            )
        ]
    return []


def detect_learning(run: Run) -> list[Diagnosis]:
    """Overfitting (train improving, holdout at chance or falling) or no learning at all."""
    holdout = run.holdout()
    if holdout and holdout_is_sequence(holdout[-1][2]):
        trend = _sequence_holdout_trend(run)
        if trend is None:
            return _no_learning_from_train(run, _train_trend(run))
        return _detect_sequence_learning(run, trend)
    accs = [
        (s, a) for s, _, h in holdout if (a := holdout_accuracy(h)) is not None and math.isfinite(a)
    ]
    if len(accs) < MIN_TREND_RECORDS:
        return _no_learning_from_train(run, _train_trend(run))
    chance, n = holdout_chance(holdout[-1][2])
    train = _train_trend(run, chance)
    margin = _chance_margin(chance, n)
    values = [a for _, a in accs]
    _, late_vals = _thirds(values)
    late = statistics.fmean(late_vals)
    w = len(late_vals)
    smoothed = [statistics.fmean(values[i : i + w]) for i in range(len(values) - w + 1)]
    peak_i = max(range(len(smoothed)), key=smoothed.__getitem__)
    peak = smoothed[peak_i]
    at_chance = late <= chance + margin
    falling = peak_i < len(smoothed) - 1 and peak - late >= max(
        OVERFIT_DROP_MIN, _chance_margin(peak, n)
    )
    evidence = []
    train_by_step = {
        run.step(i): r.get("train")
        for i, r in enumerate(run.records)
        if isinstance(r.get("train"), dict)
    }
    for s, a in _pick(accs):
        values_at: dict[str, Any] = {"holdout_accuracy": a}
        t = train_by_step.get(s)
        if isinstance(t, dict):
            values_at["train_loss"] = number(t.get("loss"))
            values_at["train_accuracy"] = number(t.get("accuracy"))
        evidence.append(Evidence(s, values_at))
    train_text = _train_text(train)
    # Overfitting needs the train batches clearly ahead of the holdout; a slowly learning run
    # whose small holdout has not yet left chance is "no learning" (yet), not overfitting.
    gap_ok = "acc_late" not in train or train["acc_late"] - late >= OVERFIT_TRAIN_GAP
    if train["improving"] and gap_ok and (at_chance or falling):
        what = (
            f"holdout accuracy stays at chance ({late:.2f}, chance {chance:.2f})"
            if at_chance
            else f"holdout accuracy fell from {peak:.2f} to {late:.2f}"
        )
        return [
            Diagnosis(
                code="overfitting",
                severity="serious",
                title=f"{what} while {train_text}",
                evidence=evidence,
                hint="the model fits the training batches but not the holdout: check that train "
                "and holdout labels mean the same thing (shuffled/mismatched labels), add "
                "regularisation or data, or stop earlier",
            )
        ]
    if at_chance:
        what = f"holdout accuracy stays at chance ({late:.2f}, chance {chance:.2f}, {n} examples)"
        return [
            Diagnosis(
                code="no_learning",
                severity="serious",
                title=what
                + (f" and {train_text}" if train["known"] else "; no train loss/accuracy recorded"),
                evidence=evidence,
                hint="nothing is being learned: a serious diagnosis listed above this one is the likely "
                "cause; else check the LR (too low, or so high that it diverged), that the loss uses "
                "the right labels, and the input pipeline",
            )
        ]
    return []


def _train_text(train: dict[str, Any]) -> str:
    parts = []
    if "loss_early" in train:
        parts.append(f"train loss went {train['loss_early']:.3g} -> {train['loss_late']:.3g}")
    if "acc_early" in train:
        parts.append(f"train accuracy {train['acc_early']:.2f} -> {train['acc_late']:.2f}")
    return ", ".join(parts) if parts else "no train metrics"


def _no_learning_from_train(run: Run, train: dict[str, Any]) -> list[Diagnosis]:
    # Without a holdout, only a train loss that does not move at all says "no learning";
    # it is a warning because a flat single-batch loss can also be a hard task's plateau.
    if not train["known"] or train["improving"] or "loss_early" not in train:
        return []
    if train["loss_late"] < train["loss_early"] * (1 - TRAIN_LOSS_DROP / 2):
        return []
    points = [Evidence(s, {"train_loss": v}) for s, v in _pick(run.series("train", "loss"))]
    return [
        Diagnosis(
            code="no_learning",
            severity="warning",
            title=f"train loss does not fall ({train['loss_early']:.3g} -> {train['loss_late']:.3g}); "
            "no holdout recorded to confirm",
            evidence=points,
            hint="check the LR, frozen groups and the labels; call set_holdout_data() to let the "
            "report judge learning on fixed examples",
        )
    ]


def detect_collapse(run: Run) -> list[Diagnosis]:
    """Holdout predictions all (>= 95%) one class late in the run, beyond that class's share."""
    holdout = run.holdout()
    collapsed: list[tuple[int, int, float, float]] = []  # (index, class, pred share, true share)
    for idx, (_, _, h) in enumerate(holdout):
        preds, labels = h.get("predictions"), h.get("labels")
        if not isinstance(preds, list) or len(preds) < COLLAPSE_MIN_EXAMPLES:
            continue
        labels = labels if isinstance(labels, list) else []
        if len(set(labels)) < 2:
            continue
        top = max(set(preds), key=preds.count)
        share = preds.count(top) / len(preds)
        true_share = labels.count(top) / len(labels)
        if share >= COLLAPSE_SHARE and share - true_share >= COLLAPSE_EXCESS:
            collapsed.append((idx, top, share, true_share))
    if not collapsed or collapsed[-1][0] != len(holdout) - 1:
        return []
    late_start = len(holdout) // 2
    late_hits = [c for c in collapsed if c[0] >= late_start]
    if len(late_hits) < COLLAPSE_MIN_RECORDS or len(late_hits) * 2 < len(holdout) - late_start:
        return []
    _, cls, share, true_share = collapsed[-1]
    since = holdout[late_hits[0][0]][0]
    return [
        Diagnosis(
            code="prediction_collapse",
            severity="serious",
            subject=str(cls),
            title=f"holdout predictions collapsed to class {cls}: {share:.0%} of examples "
            f"(true share {true_share:.0%}), in {len(late_hits)} of the last "
            f"{len(holdout) - late_start} records since step {since}",
            evidence=[
                Evidence(
                    holdout[i][0], {"predicted_class": c, "predicted_share": s, "true_share": t}
                )
                for i, c, s, t in _pick(collapsed)
            ],
            hint="the model outputs one class whatever the input: check the label encoding and "
            "loss, class weights, batch shuffling, and an LR that is too high",
        )
    ]


def detect_batches(run: Run) -> list[Diagnosis]:
    """Single-class batches beyond chance, and class imbalance across the recorded batches."""
    batches = run.batch_classes()
    if not batches:
        return []
    out: list[Diagnosis] = []
    holdout = run.holdout()
    holdout_labels = [str(v) for v in (holdout[-1][2].get("labels") or [])] if holdout else []
    prior = run.class_shares(holdout_labels)
    classes = list(prior)
    present = {c for c, p in prior.items() if p > 0}
    sizes = [bs for _, _, bs in batches if bs]
    batch_size = statistics.median(sizes) if sizes else None

    singles = [
        (s, cs)
        for s, cs, bs in batches
        if sum(1 for p in cs.values() if p > 0) == 1 and (bs is None or bs > 1)
    ]
    # The chance of a single-class batch follows the data's class prior: the holdout's labels
    # when there are enough (a run that only ever saw class-0 batches still has class 1 there),
    # else the batches' own pooled shares.
    reference = prior
    if len(holdout_labels) >= COLLAPSE_MIN_EXAMPLES:
        reference = {c: holdout_labels.count(c) / len(holdout_labels) for c in set(holdout_labels)}
    if len(present | set(reference)) >= 2 and batch_size and batch_size > 1:
        p_single = sum(p**batch_size for p in reference.values())
        frac = len(singles) / len(batches)
        if len(singles) >= 2 and frac >= max(
            SINGLE_CLASS_MIN_FRACTION, SINGLE_CLASS_EXCESS * p_single
        ):
            out.append(
                Diagnosis(
                    code="single_class_batches",
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
                        for s, cs in _pick(singles)
                    ],
                    hint="the data is not shuffled (sorted by label?): use shuffle=True or a sampler "
                    "that mixes classes within each batch",
                )
            )

    samples = sum(sizes) if sizes else len(batches)
    # Labels per token (a tagger: batch_stats counts ``tokens``) are imbalanced by nature
    # ("O" outnumbers every entity tag) and no sampler can rebalance tokens within a sequence.
    per_token = any(
        isinstance(stats := r.get("batch_stats"), dict) and "tokens" in stats for r in run.records
    )
    if not per_token and len(classes) >= 2 and samples / len(classes) >= IMBALANCE_MIN_PER_CLASS:
        most = max(classes, key=lambda c: prior[c])
        least = min(classes, key=lambda c: prior[c])
        absent = [c for c in holdout_labels if c not in present]
        ratio = prior[most] / prior[least] if prior[least] > 0 else math.inf
        if ratio >= IMBALANCE_RATIO:
            shares = {f"class {c}": round(prior[c], 4) for c in classes}
            out.append(
                Diagnosis(
                    code="data_imbalance",
                    severity="serious" if absent else "warning",
                    title=(
                        f"class(es) {', '.join(sorted(set(absent), key=class_sort_key))} of the holdout never appear in "
                        f"{len(batches)} recorded training batches"
                        if absent
                        else f"batches are imbalanced: class {most} is {prior[most]:.0%} of samples, "
                        f"class {least} {prior[least]:.0%} ({ratio:.3g}x)"
                    ),
                    evidence=[Evidence(None, shares)],
                    hint="rebalance the sampler (WeightedRandomSampler) or weight the loss per class; "
                    "check the split did not drop classes",
                )
            )
    return out


def detect_telemetry(run: Run, *, finished: bool = True) -> list[Diagnosis]:
    """The collector's own health: dropped snapshots, metric errors, an unclean stop."""
    out: list[Diagnosis] = []
    summary = run.summary or {}
    gaps = run.seq_gaps()  # records a resume superseded are not lost
    dropped_records = max(
        (number((r.get("telemetry") or {}).get("dropped_total")) or 0 for r in run.records),
        default=0,
    )
    dropped = int(max(number(summary.get("snapshots_dropped")) or 0, dropped_records, gaps))
    if dropped:
        taken = number(summary.get("snapshots_taken")) or (len(run.records) + dropped)
        frac = dropped / max(taken + dropped if "snapshots_taken" in summary else taken, 1)
        out.append(
            Diagnosis(
                code="dropped_snapshots",
                severity="warning" if frac >= DROPPED_WARNING_FRACTION else "info",
                title=f"{dropped} snapshots dropped ({frac:.0%}): " + (
                    f"{skipped} skipped to stay within overhead_budget" if (skipped := int(number(summary.get("snapshots_skipped")) or 0))
                    else "the worker could not keep up"),
                evidence=[
                    Evidence(
                        run.step(i),
                        {"dropped_before": (r.get("telemetry") or {}).get("dropped_before")},
                    )
                    for i, r in enumerate(run.records)
                    if (number((r.get("telemetry") or {}).get("dropped_before")) or 0) > 0
                ][:EVIDENCE_POINTS],
                hint="raise collect_every_n or num_slots, shrink holdout_size, or set on_full: block",
            )
        )
    errors = [
        Evidence(
            run.step(i),
            {"where": e.get("where"), "type": e.get("type"), "message": e.get("message")},
        )
        for i, r in enumerate(run.records)
        for e in (r.get("errors") or [])
        if isinstance(e, dict)
    ]
    summary_errors = summary.get("errors")
    counted = (
        sum(int(v) for v in summary_errors.values() if number(v))
        if isinstance(summary_errors, dict)
        else 0
    )
    if errors or counted:
        where = sorted({str(e.values.get("where")) for e in errors}) or sorted(summary_errors or {})
        out.append(
            Diagnosis(
                code="telemetry_errors",
                severity="warning",
                title=f"{max(counted, len(errors))} metric errors while collecting ({', '.join(where)})",
                evidence=_pick(errors) or [Evidence(None, dict(summary_errors or {}))],
                hint="those metrics are missing from the affected records; the messages say why",
            )
        )
    if finished and run.records:
        problems = []
        if run.summary is None:
            problems.append("no summary.json (stop() never ran: crashed or still running)")
        else:
            if summary.get("clean") is False:
                problems.append("summary.json says the stop was not clean")
            code = summary.get("worker_exitcode")
            if isinstance(code, int) and code != 0:
                problems.append(f"the worker exited with code {code}")
        if run.torn_tail():
            problems.append("the records file ends in a torn line (skipped)")
        if problems:
            out.append(
                Diagnosis(
                    code="incomplete_run",
                    severity="warning",
                    title="the run did not finish cleanly: " + "; ".join(problems),
                    evidence=[
                        Evidence(
                            run.steps[-1], {"records": len(run.records)} | _last_errors(summary)
                        )
                    ],
                    hint=(
                        "the records up to the last whole line are valid; call telemetry.stop() "
                        "(or use it as a context manager) so the summary is written"
                        if run.summary is None
                        else "the records written are valid; summary.json's last_errors says what "
                        "went wrong at stop (records after it may be missing)"
                    ),
                )
            )
    return out


def _last_errors(summary: dict[str, Any]) -> dict[str, Any]:
    last = summary.get("last_errors")
    return {"last_errors": "; ".join(map(str, last))} if isinstance(last, list) and last else {}


# --- silent bugs ---------------------------------------------------------------------------


def _steadiness(values: Sequence[float]) -> float:
    """Net rise of log(values) over its total variation: 1 = rises every time, ~0 = noise."""
    logs = [math.log(v) for v in values]
    total = sum(abs(b - a) for a, b in zip(logs, logs[1:], strict=False))
    return (logs[-1] - logs[0]) / total if total > 0 else 0.0


def detect_not_zeroed(run: Run) -> list[Diagnosis]:
    """Gradients that are summed over steps (no zero_grad): norm growing steadily with the step."""
    # Clipping caps the applied norm at max_norm: an accumulating sum shows only before it.
    key = OVERALL if run.gradient_norm_series(OVERALL) else (run.groups or [OVERALL])[0]
    series = run.gradient_norm_series(key)
    if len(series) < NOT_ZEROED_MIN_RECORDS or any(
        not math.isfinite(v) or v <= 0 for _, v in series
    ):
        return []
    steps = [s for s, _ in series]
    values = [v for _, v in series]
    half = series[len(series) // 2 - 1 :] if len(series) % 2 == 0 else series[len(series) // 2 :]
    (s_mid, g_mid), (s_last, g_last) = half[0], half[-1]
    if s_mid <= 0 or s_last <= s_mid:
        return []
    step_ratio = s_last / s_mid
    growth_half = g_last / g_mid
    steady = _steadiness([v for _, v in half])
    early, late = _growth(values)
    growing = (
        steady >= NOT_ZEROED_STEADINESS
        and step_ratio**NOT_ZEROED_MIN_EXPONENT
        <= growth_half
        <= NOT_ZEROED_MAX_SLACK * step_ratio**NOT_ZEROED_MAX_EXPONENT
        and early > 0
        and late / early >= NOT_ZEROED_GROWTH
    )
    losses = [v for _, v in run.series("train", "loss", finite=True)]
    loss_early, loss_late = _growth(losses) if len(losses) >= MIN_TREND_RECORDS else (0.0, 0.0)
    if loss_early > 0 and loss_late / loss_early >= LOSS_SURGE_GROWTH:
        return []
    # Once the loss is ~0 the batches add ~nothing and the sum stays where it got to.
    grad_key = _grad_words(run, key)[0]
    jitter = statistics.median(
        abs(math.log(b / a)) for (_, a), (_, b) in zip(half, half[1:], strict=False)
    )
    stuck = (
        jitter <= NOT_ZEROED_PLATEAU_JITTER
        and late / values[0] >= NOT_ZEROED_GROWTH
        and loss_early > 0
        and loss_late <= loss_early * NOT_ZEROED_PLATEAU_LOSS_DROP
    )
    if not (growing or stuck):
        return []
    how = (
        f"rising steadily in the second half ({growth_half:.3g}x over {step_ratio:.3g}x the steps)"
        if growing
        else f"then holding within {jitter:.1%} between collections while the train loss fell "
        f"{format_number(loss_early)} -> {format_number(loss_late)}"
    )
    loss_by_step = dict(run.series("train", "loss"))
    evidence = [
        Evidence(
            s,
            {grad_key: v, f"{grad_key}_per_step": v / s if s else None}
            | ({"train_loss": loss_by_step[s]} if s in loss_by_step else {}),
        )
        for s, v in _pick(series)
    ]
    return [
        Diagnosis(
            code="gradients_not_zeroed",
            severity="serious",
            title=f"the {_grad_words(run, key)[1]} behaves as a sum of every batch's gradients: "
            f"{format_number(values[0])} at step {steps[0]} -> {format_number(g_last)} at step {s_last}, "
            + how,
            evidence=evidence,
            hint="gradients accumulate across steps: call optimizer.zero_grad() (or "
            "model.zero_grad()) once per step before backward(); with gradient accumulation, "
            "zero after each optimizer.step()",
        )
    ]


def _activation_series(
    run: Run, kinds: tuple[str, ...], field_name: str
) -> dict[str, list[tuple[int, float]]]:
    """{module: [(step, value of ``field_name``)]} for the activation modules of ``kinds``, in model order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for i, record in enumerate(run.records):
        acts = record.get("activations")
        if not isinstance(acts, dict):
            continue
        for module, stats in acts.items():
            if not isinstance(stats, dict) or stats.get("kind") not in kinds:
                continue
            v = number(stats.get(field_name))
            if v is not None and math.isfinite(v):
                out.setdefault(str(module), []).append((run.step(i), v))
    return out


def _stuck_layers(
    series: dict[str, list[tuple[int, float]]], bound: float, strict: bool
) -> list[tuple[str, int, float]]:
    """(module, step it began, late value) for modules whose last third (median) is past ``bound``.

    The step it began is the first record from which the value stays past the bound.
    """
    found = []
    for module, points in series.items():
        if len(points) < MIN_ACTIVATION_RECORDS:
            continue
        _, late_vals = _thirds([v for _, v in points])
        late = statistics.median(late_vals)
        past = (lambda v: v > bound) if strict else (lambda v: v >= bound)
        if not past(late):
            continue
        began = points[-1][0]
        for s, v in reversed(points):
            if not past(v):
                break
            began = s
        found.append((module, began, late))
    # The layer that went first leads; ties keep model order.
    return sorted(found, key=lambda item: item[1])


def detect_activations(run: Run) -> list[Diagnosis]:
    """Dead ReLU layers (units that never fire) and saturated tanh/sigmoid layers."""
    out: list[Diagnosis] = []
    checks = (
        ("dying_relu", ("relu",), "dead_fraction", DEAD_RELU_FRACTION, False, "dead",
         "ReLU units never fire on the holdout, so no gradient flows through them: lower the "
         "LR (or warm it up), check the init (a large negative bias), use LeakyReLU/GELU or "
         "normalisation before the ReLU"),
        ("saturated_activations", ("tanh", "sigmoid"), "saturated_fraction", SATURATED_FRACTION, True,
         "saturated", "saturated tanh/sigmoid units pass ~0 gradient: normalise their inputs "
         "(BatchNorm/LayerNorm), use a smaller init (Xavier) or LR, or a ReLU-family activation"),
    )  # fmt: skip
    for code, kinds, field_name, bound, strict, word, hint in checks:
        series = _activation_series(run, kinds, field_name)
        stuck = _stuck_layers(series, bound, strict)
        if not stuck:
            continue
        module, began, late = stuck[0]
        others = [m for m, _, _ in stuck[1:]]
        title = (
            f"layer '{module}': {late:.0%} of its units {word} (median of the last records; "
            f"bound {bound:.0%}) since step {began}"
            + (
                f"; also {', '.join(repr(m) for m in others[:4])}{', ...' if len(others) > 4 else ''}"
                if others
                else ""
            )
        )
        out.append(
            Diagnosis(
                code=code,
                severity="serious"
                if code != "dying_relu" or late >= DEAD_RELU_SERIOUS_FRACTION
                else "warning",
                subject=module,
                title=title,
                evidence=[
                    Evidence(s, {f"{field_name}": v, "layer": module})
                    for s, v in _pick(series[module])
                ],
                hint=hint,
            )
        )
    return out


def _mode_series(run: Run) -> list[tuple[int, dict[str, Any]]]:
    return [
        (run.step(i), mode)
        for i, record in enumerate(run.records)
        if isinstance(mode := record.get("model_mode"), dict)
    ]


def detect_model_mode(run: Run) -> list[Diagnosis]:
    """Training in eval mode, and BatchNorm running statistics that never move in train mode."""
    modes = _mode_series(run)
    out: list[Diagnosis] = []
    evals = [(s, m) for s, m in modes if number(m.get("training")) == 0]
    if (
        len(evals) >= MIN_MODE_RECORDS
        and len(evals) * 2 >= len(modes)
        and evals[-1][0] == modes[-1][0]
    ):
        bn = max(int(number(m.get("batchnorm_layers")) or 0) for _, m in modes)
        since = modes[-1][0]
        for s, m in reversed(modes):
            if number(m.get("training")) != 0:
                break
            since = s
        out.append(
            Diagnosis(
                code="eval_mode_training",
                severity="serious" if bn else "warning",
                title=f"the model is in eval mode (model.training False) at {len(evals)} of "
                f"{len(modes)} collections, since step {since}"
                + (
                    f": its {bn} BatchNorm layers normalise with stale running statistics and never update them"
                    if bn
                    else ": dropout is off"
                ),
                evidence=[
                    Evidence(
                        s,
                        {
                            "training": m.get("training"),
                            "batchnorm_layers": m.get("batchnorm_layers"),
                        },
                    )
                    for s, m in _pick(evals)
                ],
                hint="call model.train() before the training steps (and again after each "
                "evaluation that called model.eval())",
            )
        )
    changes = [
        (s, v)
        for s, m in modes
        if number(m.get("training")) == 1
        and (number(m.get("batchnorm_layers")) or 0) > 0
        and (v := number(m.get("batchnorm_stat_change"))) is not None
        and math.isfinite(v)
    ]
    if len(changes) >= MIN_MODE_RECORDS and all(v <= FROZEN_BN_CHANGE for _, v in changes):
        out.append(
            Diagnosis(
                code="frozen_batchnorm_stats",
                severity="warning",
                title=f"BatchNorm running statistics did not change in {len(changes)} collections "
                f"in train mode (largest relative change {format_number(max(v for _, v in changes))})",
                evidence=[Evidence(s, {"batchnorm_stat_change": v}) for s, v in _pick(changes)],
                hint="eval-mode outputs use the initial statistics: check BatchNorm momentum (0 "
                "freezes them) and that no BN module is left in eval mode; if frozen BN is "
                "intended (fine-tuning), ignore this",
            )
        )
    return out


def _swings(values: Sequence[float]) -> list[float]:
    return [abs(b - a) for a, b in zip(values, values[1:], strict=False)]


def detect_unstable(run: Run) -> list[Diagnosis]:
    """Train loss or gradient norm oscillating with growing amplitude."""
    # A converging classifier's per-batch gradient norm turns spiky (a few misclassified
    # examples dominate it): the gradient norm counts only while the train loss is not improving.
    sources = [("train", "loss", "train loss")]
    if not _train_trend(run)["improving"]:
        sources.append(("gradient_norm", OVERALL, _grad_words(run, OVERALL)[1]))
    for family, key, what in sources:
        series = (
            run.gradient_norm_series(key, finite=True)
            if family == "gradient_norm"
            else run.series(family, key, finite=True)
        )
        if len(series) < UNSTABLE_MIN_RECORDS:
            continue
        values = [v for _, v in series]
        swings = _swings(values)
        early_sw, late_sw = _thirds(swings)
        early, late = statistics.median(early_sw), statistics.median(late_sw)
        start_level, level = (statistics.median(part) for part in _thirds(values))
        half = values[len(values) // 2 :]
        diffs = [b - a for a, b in zip(half, half[1:], strict=False)]
        turns = sum(1 for a, b in zip(diffs, diffs[1:], strict=False) if a * b < 0)
        turn_share = turns / max(len(diffs) - 1, 1)
        if not (
            late >= UNSTABLE_GROWTH * max(early, 1e-12)
            and late >= UNSTABLE_SWING * max(abs(level), abs(start_level))
            and turn_share >= UNSTABLE_TURNS
        ):
            continue
        return [
            Diagnosis(
                code="unstable_training",
                severity="serious",
                title=f"the {what} oscillates with growing amplitude: swings between collections "
                f"{format_number(early)} early -> {format_number(late)} late (level {format_number(level)}), "
                f"changing direction in {turn_share:.0%} of the second half",
                evidence=[
                    Evidence(s, {(_grad_words(run, key)[0] if family == "gradient_norm" else "train_loss"): v})
                    for s, v in _pick(series, 2 * EVIDENCE_POINTS)
                ],
                hint="the optimiser overshoots: lower the LR (or add warm-up/decay), clip gradients, "
                "check that gradients are zeroed each step and the batch size is not tiny",
            )
        ]
    return []


def detect_non_convergence(run: Run) -> list[Diagnosis]:
    """Train loss that stopped improving far above what the holdout shows is reachable."""
    losses = run.series("train", "loss", finite=True)
    holdout = run.holdout()
    if len(losses) < NONCONV_MIN_RECORDS or not holdout:
        return []
    values = [v for _, v in losses]
    k = len(values) // 3
    middle, late = statistics.fmean(values[k : len(values) - k]), statistics.fmean(values[-k:])
    if late < middle * (1 - NONCONV_STALL):
        return []  # still improving
    best = [
        (s, v)
        for s, _, h in holdout
        if (v := number(h.get("loss"))) is not None and math.isfinite(v)
    ]
    if not best:
        return []
    if holdout_is_sequence(holdout[-1][2]):
        trend = _sequence_holdout_trend(run)
        if trend is None or trend["flat"]:
            return []  # the holdout does not move: that is no_learning
        # No chance level for tokens: the holdout's starting loss stands in for it (a train
        # loss near 0 next to it is noise, not a stall).
        chance_loss, chance_words = best[0][1], "holdout's first loss"
    else:
        chance, n = holdout_chance(holdout[-1][2])
        accs = [
            a for _, _, h in holdout if (a := holdout_accuracy(h)) is not None and math.isfinite(a)
        ]
        if accs and statistics.fmean(_thirds(accs)[1]) <= chance + _chance_margin(chance, n):
            return []  # the holdout stays at chance: that is no_learning
        chance_loss = math.log(holdout_class_count(holdout[-1][2]))
        chance_words = "chance level"
    best_step, best_loss = min(best, key=lambda sv: sv[1])
    if not (
        late >= NONCONV_HOLDOUT_GAP * best_loss and late >= NONCONV_MIN_CHANCE_SHARE * chance_loss
    ):
        return []
    gap = f"{late / best_loss:.3g}x" if best_loss > 0 else "far above"
    holdout_loss = dict(best)
    return [
        Diagnosis(
            code="non_convergence",
            severity="serious",
            title=f"train loss stopped improving at {format_number(late)} (last third; middle third "
            f"{format_number(middle)}), {gap} the holdout's best loss "
            f"{format_number(best_loss)} (step {best_step}); {chance_words} {format_number(chance_loss)}",
            evidence=[
                Evidence(
                    s,
                    {"train_loss": v}
                    | ({"holdout_loss": holdout_loss[s]} if s in holdout_loss else {}),
                )
                for s, v in _pick(losses)
            ],
            hint="training bounces above a loss it can reach: lower the LR or decay it, use a "
            "larger batch, check the loss is computed on the right outputs and labels",
        )
    ]


DETECTORS: tuple[Callable[[Run], list[Diagnosis]], ...] = (
    detect_nonfinite,
    detect_gradients,
    detect_frozen,
    detect_lr_ratio,
    detect_update_inversion,
    detect_learning,
    detect_collapse,
    detect_batches,
    detect_not_zeroed,
    detect_activations,
    detect_model_mode,
    detect_unstable,
    detect_non_convergence,
)


def _annotate(run: Run, evidence: Evidence) -> Evidence:
    index = run.index_of(evidence.step) if evidence.step is not None else None
    if index is None:
        return evidence
    record = run.records[index]
    epoch, batch_idx = record.get("epoch"), record.get("batch_idx")
    return dataclasses.replace(
        evidence,
        epoch=epoch if isinstance(epoch, int) else None,
        batch_idx=batch_idx if isinstance(batch_idx, int) else None,
    )


def diagnose(run: Run, *, finished: bool = True) -> list[Diagnosis]:
    """Every diagnosis of ``run``, most severe first, then by the step of its first evidence.

    ``finished=False`` (a run still training, as ``watch`` sees it) leaves out the
    complaints about a missing summary.json.
    """
    found: list[Diagnosis] = []
    for detector in DETECTORS:
        found.extend(detector(run))
    found.extend(detect_telemetry(run, finished=finished))
    found = [
        dataclasses.replace(d, evidence=[_annotate(run, e) for e in d.evidence]) for d in found
    ]

    def order(d: Diagnosis) -> tuple[int, int, int]:
        first = next((e.step for e in d.evidence if e.step is not None), 1 << 62)
        return (_SEVERITY_ORDER[d.severity], CODES.index(d.code), first)

    return sorted(found, key=order)
