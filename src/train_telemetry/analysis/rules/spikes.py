"""Spikes: ``loss_spike``, ``gradient_spike``.

Runs in: any process that reads a run (no torch).

A spike is a record whose value jumps far above the level of the records just before it:
the train loss (``train.loss``) or the gradient norm (before clipping where the run recorded
it: clipping caps the applied norm, so its spikes show only before it). Each spike is named
with the step where it began, its peak, whether the series came back to its level (recovered)
or not (diverged: it stayed up, or turned NaN/Inf), and the per-group signs in the records
just before it: update ratios (weight change / weight norm) and gradient norms that had
already risen, which is what usually precedes a loss spike (an LR bump moves the weights
first; the loss follows one or more steps later).

Thresholds were chosen on the traces of ``scripts/eval_diagnosis.py`` (docs/diagnosis.md:
healthy and spiked runs of five programs, one record per step) and are stated with the
reason for each value beside it. They judge the record series as collected: with
``collect_every_n`` > 1 a spike between two collections is not seen.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from train_telemetry.analysis.load import PRE_CLIP, Run, TypedRecord, format_number, train_loss
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule
from train_telemetry.records import OVERALL

# The level a record is compared with: the median of the (non-spike) records just before
# it. 20 records: long enough that one noisy batch does not move the median, short enough to
# follow a loss that falls quickly early on.
SPIKE_WINDOW = 20
# Judged only once that many records precede a record: the first records of a run (from
# initialisation, where the loss falls fastest) have no level to compare with.
SPIKE_MIN_HISTORY = 10
# A loss spike: a record at least 1.5x the level before it. Measured on the harness's traces:
# healthy language models' per-step losses stay within 1.25x of their trailing median (batch
# noise of a few %), an LR bump or a corrupted batch lifts the loss 1.6-3x; classifiers' batch
# losses are noisier near convergence, where the z-score and the rise below decide.
LOSS_SPIKE_RATIO = 1.25
# ... and beyond the noise of the window: at least 4 robust standard deviations (1.4826 x the
# median absolute deviation, of the log values) above it. A converging classifier's batch
# loss at 0.05 jumps 3-5x on one misclassified example: a log spread that this absorbs.
SPIKE_Z = 4.0
# ... and large against the run's own scale: a rise of at least 10% of the loss at the start
# (median of the first 3 records). A classifier's loss near 0 that triples is no spike.
LOSS_SPIKE_MIN_RISE = 0.10
START_RECORDS = 3
# A gradient-norm spike: 3x the level before it. Healthy gradient norms swing more than losses
# (2x between batches near convergence on the harness's classifiers, a language model's pre-clip
# norm within 2x); an LR bump or a corrupted batch raises it 4-50x.
GRAD_SPIKE_RATIO = 3.0
# Recovered: the series came back within 1.2x of the level before the spike and stayed
# there (the median of the 5 records from then on), within the run. Diverged: it did not, or
# it turned NaN/Inf. Spikes of the harness's LR bumps and corrupted batches came back within
# 30 steps; LR jumps that diverge leave the loss 1.5x+ up, dipping back only now and then.
RECOVERED_WITHIN = 1.2
RECOVERY_HOLD = 5
# Early signs: a group's update ratio (or gradient norm) at least 2x its own level (median of
# the same window) in one of the 5 records up to and including the spike's first record.
# An LR bump doubles the update ratio at the step it starts, the loss follows a step later.
EARLY_SIGN_RATIO = 2.0
EARLY_SIGN_RECORDS = 5
# At most this many spikes are named per series (the largest), each its own diagnosis: more
# only repeat the pattern (their count is in the title).
MAX_SPIKES_NAMED = 5


@dataclass(frozen=True)
class Spike:
    """One spike of a series: where it began, its level before, its peak, how it ended."""

    series: str  # "train_loss", "gradient_norm" or "gradient_norm_pre_clip"
    start: int  # the step of its first record
    level: float  # the median of the window before it
    peak_step: int
    peak: float
    recovered_at: int | None  # the first step back within RECOVERED_WITHIN x level; None: diverged
    nonfinite_at: int | None  # the first step the series turned NaN/Inf after it began
    early_signs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def recovered(self) -> bool:
        return self.recovered_at is not None and self.nonfinite_at is None

    @property
    def ratio(self) -> float:
        return self.peak / self.level if self.level > 0 else math.inf


def _robust_sd(logs: Sequence[float]) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal noise."""
    center = statistics.median(logs)
    return 1.4826 * statistics.median(abs(v - center) for v in logs)


def _stays_back(following: Sequence[tuple[int, float]], level: float) -> bool:
    """Whether the median of ``following`` (the records from a candidate recovery on) is back
    within RECOVERED_WITHIN x ``level`` (NaN/Inf count as not back)."""
    values = [v if math.isfinite(v) else math.inf for _, v in following]
    return statistics.median(values) <= RECOVERED_WITHIN * level


def find_spikes(
    series: Sequence[tuple[int, float]], *, ratio: float, min_rise: float = 0.0, name: str = ""
) -> list[Spike]:
    """The spikes of ``series`` ((step, value), values > 0 where finite): records at least
    ``ratio`` x and SPIKE_Z robust deviations above the median of the SPIKE_WINDOW non-spike
    records before them, and ``min_rise`` x the loss at the start above it. A NaN/Inf after
    a spike began makes it diverged; one without a jump before it is not a spike here."""
    clean: list[float] = []  # the non-spike values so far (the windows are taken from them)
    early: float | None = None
    spikes: list[Spike] = []
    i = 0
    while i < len(series):
        step, value = series[i]
        if math.isfinite(value) and value > 0 and len(clean) < SPIKE_MIN_HISTORY:
            clean.append(value)
            i += 1
            continue
        if early is None:
            early = statistics.median(clean[:START_RECORDS]) if clean else 0.0
        window = clean[-SPIKE_WINDOW:]
        level = statistics.median(window)
        finite = math.isfinite(value)
        if finite and value > 0 and level > 0:
            logs = [math.log(v) for v in window]
            jump = math.log(value / level)
            spread = _robust_sd(logs)
            is_spike = (
                value >= ratio * level
                and jump >= SPIKE_Z * spread
                and value - level >= min_rise * early
            )
        else:
            # NaN/Inf with no finite jump before it is nonfinite's (and exploding_gradients'):
            # it marks a spike as diverged only once the spike has begun.
            is_spike = False
        if not is_spike:
            if finite and value > 0:
                clean.append(value)
            i += 1
            continue
        # The spike lasts until the series is back within RECOVERED_WITHIN x its level.
        peak_step, peak = step, value
        nonfinite_at = None
        recovered_at = None
        j = i + 1
        while j < len(series):
            s, v = series[j]
            if not math.isfinite(v):
                nonfinite_at = nonfinite_at if nonfinite_at is not None else s
                peak_step, peak = (s, math.inf) if peak != math.inf else (peak_step, peak)
            elif v <= RECOVERED_WITHIN * level and _stays_back(series[j : j + RECOVERY_HOLD], level):
                recovered_at = s
                break
            elif v > peak:
                peak_step, peak = s, v
            j += 1
        spikes.append(Spike(name, step, level, peak_step, peak, recovered_at, nonfinite_at))
        i = j  # the record that recovered starts the next search (it is judged as a new record)
    return spikes


def _group_value(run: Run, record: TypedRecord, family: str, group: str) -> float | None:
    if family == "update_ratio":
        return run.value(record, "update_ratio", group)
    if run.gradient_norm_source(group) != "gradient_norm":
        return run.pre_clip_norm(record, group)
    return run.value(record, "gradient_norm", group)


def _early_signs(run: Run, start: int, skip: str | None) -> dict[str, dict[str, Any]]:
    """{group: {family, step, value, level, rise}}: each group's update ratio (else gradient
    norm) that stood EARLY_SIGN_RATIO x its own level (the median of the SPIKE_WINDOW records
    before) in one of the EARLY_SIGN_RECORDS records up to ``start``: the first such record."""
    index = run.index_of(start)
    if index is None:
        return {}
    signs: dict[str, dict[str, Any]] = {}
    lo = max(0, index - EARLY_SIGN_RECORDS + 1)
    for group in run.groups or [OVERALL]:
        for family in ("update_ratio", "gradient_norm"):
            if family == skip:
                continue
            before = [
                v
                for r in run.records[max(0, lo - SPIKE_WINDOW) : lo]
                if (v := _group_value(run, r, family, group)) is not None and math.isfinite(v) and v > 0
            ]
            if len(before) < SPIKE_MIN_HISTORY // 2:
                continue
            level = statistics.median(before)
            for k in range(lo, index + 1):
                v = _group_value(run, run.records[k], family, group)
                if v is not None and (not math.isfinite(v) or v >= EARLY_SIGN_RATIO * level):
                    signs[group] = {
                        "family": family,
                        "step": run.step(k),
                        "value": v,
                        "level": level,
                        "rise": v / level if math.isfinite(v) else math.inf,
                    }
                    break
            if group in signs:
                break
    return signs


def _grad_key(run: Run) -> str:
    return PRE_CLIP if run.gradient_norm_source(OVERALL) != "gradient_norm" else "gradient_norm"


def loss_spikes(run: Run) -> list[Spike]:
    """Every spike of the run's train loss, with its early signs."""
    series = run.points(train_loss)
    spikes = find_spikes(series, ratio=LOSS_SPIKE_RATIO, min_rise=LOSS_SPIKE_MIN_RISE, name="train_loss")
    return [
        Spike(**{**s.__dict__, "early_signs": _early_signs(run, s.start, None)}) for s in spikes
    ]


def gradient_spikes(run: Run) -> list[Spike]:
    """Every spike of the run's overall gradient norm (pre-clip where recorded), with the
    groups' update ratios that rose before it."""
    series = [(s, v) for s, v in run.gradient_norm_series(OVERALL)]
    spikes = find_spikes(series, ratio=GRAD_SPIKE_RATIO, name=_grad_key(run))
    return [
        Spike(**{**s.__dict__, "early_signs": _early_signs(run, s.start, "gradient_norm")})
        for s in spikes
    ]


def _signs_text(signs: dict[str, dict[str, Any]], start: int) -> str:
    if not signs:
        return "no group's update ratio or gradient norm rose before it"
    parts = []
    for group, sign in signs.items():
        when = "at its first step" if sign["step"] == start else f"from step {sign['step']}"
        parts.append(
            f"'{group}' {sign['family'].replace('_', ' ')} {format_number(sign['rise'])}x its level {when}"
        )
    return "before it: " + ", ".join(parts)


class _SpikeRule(Rule):
    what: str  # the series, in words

    def spikes(self, run: Run) -> list[Spike]:
        raise NotImplementedError

    def check(self, run: Run) -> list[Diagnosis]:
        found = self.spikes(run)
        # The largest first, the diverged ones before all (they decide the run).
        named = sorted(found, key=lambda s: (s.recovered, -s.ratio))[:MAX_SPIKES_NAMED]
        out = []
        for spike in sorted(named, key=lambda s: s.start):
            if spike.recovered:
                ending = f"recovered by step {spike.recovered_at}"
            elif spike.nonfinite_at is not None:
                ending = f"diverged: NaN/Inf from step {spike.nonfinite_at}"
            else:
                ending = "diverged: it never came back to its level"
            others = f" (one of {len(found)} spikes)" if len(found) > 1 else ""
            evidence = [
                Evidence(spike.start, {spike.series: self._value_at(run, spike.series, spike.start), "level": spike.level}),
                Evidence(spike.peak_step, {spike.series: spike.peak, "ratio": spike.ratio}),
            ]
            if spike.recovered_at is not None:
                evidence.append(Evidence(spike.recovered_at, {spike.series: self._value_at(run, spike.series, spike.recovered_at)}))
            for group, sign in spike.early_signs.items():
                evidence.append(Evidence(sign["step"], {"group": group, sign["family"]: sign["value"], "level": sign["level"]}))
            out.append(
                self.diagnosis(
                    # A spike the run came back from cost steps; one it did not come back from
                    # lost the run.
                    severity="warning" if spike.recovered else "serious",
                    subject=f"step {spike.start}",
                    title=f"{self.what} spiked at step {spike.start}: {format_number(spike.level)} -> "
                    f"{format_number(spike.peak)} ({format_number(spike.ratio)}x, peak at step "
                    f"{spike.peak_step}), {ending}{others}; {_signs_text(spike.early_signs, spike.start)}",
                    evidence=evidence,
                    hint=self.hint(spike),
                )
            )
        return out

    @staticmethod
    def _value_at(run: Run, series: str, step: int) -> float | None:
        index = run.index_of(step)
        if index is None:
            return None
        record = run.records[index]
        if series == "train_loss":
            return train_loss(record)
        if series == PRE_CLIP:
            return run.pre_clip_norm(record, OVERALL)
        return run.value(record, "gradient_norm", OVERALL)

    def hint(self, spike: Spike) -> str:
        raise NotImplementedError


class LossSpike(_SpikeRule):
    code = "loss_spike"
    severity = "warning"
    summary = (
        f"the train loss jumps {LOSS_SPIKE_RATIO:g}x or more above its level of the "
        f"{SPIKE_WINDOW} records before (and beyond their noise): where it began, recovered or "
        "diverged (serious), and the groups whose update ratio or gradient norm rose first"
    )
    what = "train loss"

    def spikes(self, run: Run) -> list[Spike]:
        return loss_spikes(run)

    def hint(self, spike: Spike) -> str:
        if spike.early_signs and any(s["family"] == "update_ratio" for s in spike.early_signs.values()):
            return (
                "the weights moved too far just before the loss rose: lower the peak LR or lengthen "
                "the warm-up, clip gradients, and check the LR schedule at that step"
            )
        return (
            "nothing moved the weights unusually before it: look at the batch at that step (bad, "
            "mislabelled or very long examples); if it diverged, restart from a checkpoint "
            "before it with a lower LR or skip those batches"
        )


class GradientSpike(_SpikeRule):
    code = "gradient_spike"
    severity = "warning"
    summary = (
        f"the gradient norm (pre-clip where recorded) jumps {GRAD_SPIKE_RATIO:g}x or more above "
        f"its level of the {SPIKE_WINDOW} records before: where it began, recovered or diverged "
        "(serious), and the groups whose update ratio rose first"
    )
    what = "gradient norm"

    def spikes(self, run: Run) -> list[Spike]:
        return gradient_spikes(run)

    def hint(self, spike: Spike) -> str:
        return (
            "clip gradients (clip_grad_norm_) if you do not, look at the batch at that step, "
            "and lower the LR or lengthen the warm-up if the update ratios rose first"
        )
