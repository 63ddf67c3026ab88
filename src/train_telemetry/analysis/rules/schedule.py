"""The LR schedule over the run: ``lr_schedule_ends_early``, ``lr_warmup_unfinished``.

Runs in: any process that reads a run (no torch).

A schedule whose length is wrong (set in epochs while the scheduler steps per batch, a
``T_max`` or ``total_steps`` shorter than the run) brings the LR to zero long before training
ends: every step after it computes gradients and changes nothing. A warm-up set longer than
the run (warm-up steps counted in samples, or a ratio of the wrong total) never ends: the
run trains at a fraction of its LR throughout. Both show in ``learning_rates`` alone. A
group whose LR is 0 in every record is ``frozen_group``'s.
"""

from __future__ import annotations

import math

from train_telemetry.analysis.load import Run, format_number, train_loss
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# An LR of at most 1e-3 of the group's peak counts as zero: no schedule decays that far
# before its end (a cosine reaches 1e-3 of its peak in its last 2% of steps, a linear decay
# in its last 0.1%), and the updates it gives are 1000x too small to matter.
LR_ZERO_FRACTION = 1e-3
# ... reached (after the peak) with at least 20% of the run's steps still to go: a schedule
# 25% too short. Shorter tails are the end of a schedule that is merely a little off.
ENDS_EARLY_SHARE = 0.2
# A warm-up that never ends: the LR is still rising over the last 20% of the run's records
# (by 10% or more) and never fell from its peak, after rising at least 5x from the first
# record (a warm-up; a constant LR with rounding noise is not one).
WARMUP_TAIL_SHARE = 0.2
WARMUP_TAIL_RISE = 1.1
WARMUP_MIN_RISE = 5.0
# At least this many records with an LR: fewer cannot show a schedule's shape.
MIN_SCHEDULE_RECORDS = 5


def _finite_lrs(run: Run, group: str) -> list[tuple[int, float]]:
    return [(s, v) for s, v in run.lr_series(group) if math.isfinite(v)]


class LrScheduleEndsEarly(Rule):
    code = "lr_schedule_ends_early"
    severity = "serious"
    summary = (
        f"a group's LR falls to zero ({LR_ZERO_FRACTION:g} of its peak) with "
        f"{ENDS_EARLY_SHARE:.0%} or more of the run still to go (a schedule set for fewer steps "
        "than the run)"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        steps = run.steps
        if not steps:
            return []
        first, last = steps[0], steps[-1]
        out = []
        for group in run.groups:
            lrs = _finite_lrs(run, group)
            if len(lrs) < MIN_SCHEDULE_RECORDS:
                continue
            peak_i = max(range(len(lrs)), key=lambda i: lrs[i][1])
            peak_step, peak = lrs[peak_i]
            if peak <= 0:
                continue  # LR 0 throughout: frozen_group
            zero = next(
                ((s, v) for s, v in lrs[peak_i:] if v <= LR_ZERO_FRACTION * peak), None
            )
            if zero is None or last <= first:
                continue
            share = (last - zero[0]) / (last - first)
            if share < ENDS_EARLY_SHARE:
                continue
            after = [v for s, v in lrs if s >= zero[0]]
            stays = all(v <= LR_ZERO_FRACTION * peak for v in after)
            losses = [(s, v) for s, v in run.points(train_loss, finite=True) if s >= zero[0]]
            loss_text = (
                f"; the train loss went {format_number(losses[0][1])} -> {format_number(losses[-1][1])} since"
                if len(losses) >= 2
                else ""
            )
            out.append(
                self.diagnosis(
                    subject=group,
                    title=f"group '{group}''s LR fell from its peak {format_number(peak)} (step {peak_step}) "
                    f"to {format_number(zero[1])} at step {zero[0]}, with {share:.0%} of the run to go"
                    + (" and stayed there" if stays else " (and rose again: a cyclic schedule whose period is too short)")
                    + loss_text,
                    evidence=[Evidence(s, {"lr": v}) for s, v in pick(lrs)]
                    + [Evidence(zero[0], {"lr": zero[1], "peak_lr": peak})],
                    hint="the scheduler's length does not match the run: give it the total number of "
                    "optimizer steps (T_max / total_steps / num_training_steps = epochs x batches per "
                    "epoch / accumulation) and step it once per optimizer step",
                )
            )
        return out


class LrWarmupUnfinished(Rule):
    code = "lr_warmup_unfinished"
    severity = "warning"
    summary = (
        f"a group's LR rises from start to end ({WARMUP_MIN_RISE:g}x or more, still rising in the "
        f"last {WARMUP_TAIL_SHARE:.0%} of the run): the warm-up is longer than the run"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        out = []
        for group in run.groups:
            lrs = _finite_lrs(run, group)
            if len(lrs) < MIN_SCHEDULE_RECORDS:
                continue
            values = [v for _, v in lrs]
            start = next((v for v in values if v > 0), 0.0)
            end = values[-1]
            tail_from = values[max(0, int(len(values) * (1 - WARMUP_TAIL_SHARE)) - 1)]
            if not (
                start > 0
                and end >= max(values) * (1 - 1e-9)
                and end >= WARMUP_MIN_RISE * start
                and tail_from > 0
                and end >= WARMUP_TAIL_RISE * tail_from
            ):
                continue
            out.append(
                self.diagnosis(
                    subject=group,
                    title=f"group '{group}''s LR rose from {format_number(start)} to {format_number(end)} "
                    f"and was still rising at the last record (step {lrs[-1][0]}): the warm-up never ended",
                    evidence=[Evidence(s, {"lr": v}) for s, v in pick(lrs)],
                    hint="the warm-up is longer than the run: set it in optimizer steps (not samples or "
                    "epochs), or as a ratio of the run's real number of steps",
                )
            )
        return out
