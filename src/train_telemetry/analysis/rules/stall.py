"""A run that trains without learning: ``training_stalled``.

Runs in: any process that reads a run (no torch).

The train loss flat over a long stretch while the LR is not zero, at a level that is not
the end of learning (near its starting level): the steps run and the optimizer steps, and
nothing is gained. Its usual causes: an LR orders of magnitude too small, updates that do
not reach the weights that matter, a loss that cannot move (``probabilities_as_logits``).
An LR that reached zero is ``lr_schedule_ends_early``'s; a stall that a dead or saturated
layer explains is ``dying_relu``'s or ``saturated_activations``' (serious there: their fix,
not the LR's); a holdout stuck at chance is also ``no_learning``'s (which judges the
holdout, this the train loss and the LR).
"""

from __future__ import annotations

import math
import statistics

from train_telemetry.analysis.load import Run, format_number, train_loss
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.activations import DyingRelu, SaturatedActivations
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# A long stretch: the last half of the records, at least 12 of them (fewer cannot tell a
# plateau from noise).
STALL_MIN_RECORDS = 12
STALL_SHARE = 0.5
# Flat: the median of the stretch's last fifth within 2% of its first fifth's. Healthy runs
# on the harness's programs fall 8-70% over their second half (a language model at its
# cosine tail: ~8%; classifiers: most); a run at LR 1e-6 moves under 1%. A slow run that
# still gains 3% there (iris at SGD 0.01 in tests/e2e/test_silent_bugs.py) is not stalled.
STALL_TOLERANCE = 0.02
# ... at a level at least 75% of the run's starting loss (median of its first 5 records):
# a loss that fell most of the way and then levelled off has converged, not stalled.
STALL_MIN_LEVEL = 0.75
STALL_START_RECORDS = 5


class TrainingStalled(Rule):
    code = "training_stalled"
    severity = "serious"
    summary = (
        f"the train loss stays flat (within {STALL_TOLERANCE:.0%}) over the last half of the run "
        f"near its starting level while the LR is not zero"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        losses = run.points(train_loss, finite=True)
        if len(losses) < 2 * STALL_MIN_RECORDS:
            return []
        values = [v for _, v in losses]
        start_level = statistics.median(values[:STALL_START_RECORDS])
        stretch = losses[int(len(losses) * (1 - STALL_SHARE)) :]
        k = max(1, len(stretch) // 5)
        head = statistics.median(v for _, v in stretch[:k])
        tail = statistics.median(v for _, v in stretch[-k:])
        level = statistics.median(v for _, v in stretch)
        if head <= 0 or start_level <= 0:
            return []
        flat = abs(tail - head) <= STALL_TOLERANCE * head
        if not (flat and level >= STALL_MIN_LEVEL * start_level):
            return []
        since = stretch[0][0]
        lrs = {
            g: [v for s, v in run.lr_series(g) if s >= since and math.isfinite(v)] for g in run.groups
        }
        moving = {g: statistics.median(v) for g, v in lrs.items() if v and statistics.median(v) > 0}
        if not moving and any(lrs.values()):
            return []  # the LR is 0: frozen_group / lr_schedule_ends_early
        if any(d.severity == "serious" for rule in (DyingRelu(), SaturatedActivations()) for d in rule.check(run)):
            return []  # dead or saturated units stop the loss: named there, with their fix
        ratios = {
            g: statistics.median(v)
            for g in moving
            if (v := [x for s, x in run.series("update_ratio", g, finite=True) if s >= since])
        }
        lr_text = ", ".join(f"'{g}' {format_number(v)}" for g, v in moving.items()) or "not recorded"
        ratio_text = (
            "; median update/weight ratio " + ", ".join(f"'{g}' {format_number(v)}" for g, v in ratios.items())
            if ratios
            else ""
        )
        return [
            self.diagnosis(
                title=f"the train loss stayed at {format_number(level)} from step {since} to step "
                f"{stretch[-1][0]} ({format_number(head)} -> {format_number(tail)}; it began at "
                f"{format_number(start_level)}) while the LR was {lr_text}{ratio_text}",
                evidence=[Evidence(s, {"train_loss": v}) for s, v in pick(losses)],
                hint="the optimizer steps but nothing is learned: raise the LR if the update ratios "
                "are tiny (~1e-3 per step is usual), else check that the trained parameters are the "
                "ones the loss depends on and that the loss fits the model's outputs",
            )
        ]
