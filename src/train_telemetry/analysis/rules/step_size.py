"""Steps that rewrite the weights: ``lr_too_high``.

Runs in: any process that reads a run (no torch).

The update ratio (``update_ratio``: the weight change of a collection over the weight norm,
per group) is how far one step moves a group's weights. Healthy training moves them about
1e-3 of their norm per step (the usual rule of thumb); an LR one or two orders of magnitude
too high moves them by a large share of their norm, and the run then dies (ReLUs killed,
the loss stuck at chance), swings, or converges only because the problem is easy. Read per
param group, so a group with its own, too high, LR is named. Steps that are large because
the gradients are never zeroed (their sum grows) are ``gradients_not_zeroed``'s.
"""

from __future__ import annotations

import math

from train_telemetry.analysis.load import Run, format_number
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule
from train_telemetry.analysis.rules.gradients import GradientsNotZeroed

# A step that moves a group's weights by 30% or more of their norm. On the evaluation
# harness's five programs (docs/diagnosis.md) no healthy run went above 0.07 at any step
# (the largest: a tiny GPT-2 under the Trainer's warm-up), and every run with an LR 100x
# too high (SGD+momentum at 0.5, Adam at 0.1) reached 0.77-6.6: 0.3 sits 4x above the one
# and 2.5x below the other.
TOO_LARGE_RATIO = 0.3
# In this many records: Adam's first step alone moves every weight by about the LR, which on
# a freshly initialised small layer can be a large share once; three records is a pattern.
TOO_LARGE_MIN_RECORDS = 3


class LrTooHigh(Rule):
    code = "lr_too_high"
    severity = "serious"
    summary = (
        f"a param group's steps move its weights by {TOO_LARGE_RATIO:g}x their norm or more "
        f"(update/weight per step) in {TOO_LARGE_MIN_RECORDS}+ records, where healthy training moves ~1e-3: "
        "its LR is too high"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        if any(d.severity == "serious" for d in GradientsNotZeroed().check(run)):
            return []  # the steps are large because the gradients add up: named there, with its fix
        # A record's update ratio spans the steps since the record before it (collect_every_n):
        # divided by them it is the mean step's, a lower bound of the typical one (steps that
        # do not all point the same way add up to less than their sum).
        steps = run.steps
        span = {s: max(1, s - steps[i - 1]) if i else 1 for i, s in enumerate(steps)}
        out = []
        for group in run.groups or ["overall"]:
            series = [(s, v / span.get(s, 1)) for s, v in run.series("update_ratio", group, finite=True)]
            large = [(s, v) for s, v in series if v >= TOO_LARGE_RATIO]
            if len(large) < TOO_LARGE_MIN_RECORDS:
                continue
            lrs = dict(run.lr_series(group))
            peak_step, peak = max(large, key=lambda sv: sv[1])
            lr = lrs.get(peak_step)
            lr_words = f" at LR {format_number(lr)}" if lr is not None and math.isfinite(lr) else ""
            out.append(
                self.diagnosis(
                    title=f"group '{group}': in {len(large)} of {len(series)} records its steps moved its weights "
                    f"by {TOO_LARGE_RATIO:g}x their norm or more (update/weight per step up to "
                    f"{format_number(peak)} at step {peak_step}{lr_words}, first at step {large[0][0]}); "
                    "healthy steps move ~1e-3",
                    evidence=[
                        Evidence(s, {f"update_ratio_per_step.{group}": v}
                                 | ({f"learning_rates.{group}": lrs[s]} if s in lrs else {}))
                        for s, v in pick(large)
                    ],
                    hint=f"lower group '{group}''s LR by 10x or more until its update/weight ratio is near "
                    "1e-3 per step (Adam: LRs of 1e-4 to 3e-3 are usual), or warm it up from a small value",
                )
            )
        return out
