"""Per-group learning rates against what was intended: ``lr_ratio_mismatch``,
``update_ratio_inverted``.

Runs in: any process that reads a run (no torch).

What was intended comes from the config's ``expected_lr_ratios`` (else, for the update
order, from the groups' own LRs).
"""

from __future__ import annotations

import math
import statistics

from train_telemetry.analysis.load import Run, format_number, number
from train_telemetry.analysis.rules._common import MIN_TREND_RECORDS, pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# --- lr_ratio_mismatch ---------------------------------------------------------------------
# Observed LR ratio / expected ratio beyond 1.1x is a configuration difference (LRs are exact
# numbers, not measurements); beyond 2x it changes training materially.
LR_RATIO_WARNING_FACTOR = 1.1
LR_RATIO_SERIOUS_FACTOR = 2.0


class LrRatioMismatch(Rule):
    code = "lr_ratio_mismatch"
    severity = "serious"
    summary = (
        "the LR ratio between param groups differs from `expected_lr_ratios` (or it names a "
        "group the optimizer does not have)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        # run.json has no schema: the config's ratios are checked as read.
        expected = run.config.get("expected_lr_ratios")
        if not isinstance(expected, dict) or not expected:
            return []
        out: list[Diagnosis] = []
        groups = run.groups
        missing = [g for g in expected if g not in groups]
        if missing and groups:
            out.append(
                self.diagnosis(
                    # A naming slip in the config, not (yet) a wrong LR: a warning.
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
                        Evidence(
                            run.step(i), {f"lr.{group}": lr_g, f"lr.{ref}": lr_ref, "ratio": got}
                        ),
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
                self.diagnosis(
                    severity="serious" if off >= LR_RATIO_SERIOUS_FACTOR else "warning",
                    subject=group,
                    title=f"LR of '{group}' is {got:.3g}x that of '{ref}', expected {want:.3g}x "
                    f"(expected_lr_ratios): off by {off:.3g}x",
                    evidence=pick([e for _, e in points]),
                    hint=f"check the lr of each param group given to the optimizer and any scheduler "
                    f"that scales groups differently; expected_lr_ratios is {expected}",
                )
            )
        return out


# --- update_ratio_inverted -----------------------------------------------------------------
# Groups whose intended LRs differ at least 2x have an intended order of update sizes ...
UPDATE_ORDER_MIN_LR_FACTOR = 2.0
# ... and that order counts as inverted when the group meant to move faster moves 2x slower
# (median update/weight ratio); the margin absorbs per-layer scale differences under Adam.
UPDATE_INVERSION_FACTOR = 2.0


class UpdateRatioInverted(Rule):
    code = "update_ratio_inverted"
    severity = "warning"
    summary = (
        "a group meant to move faster (a higher intended LR) moves clearly slower than another "
        "(median update/weight ratio)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        medians: dict[str, float] = {}
        for group in run.groups:
            values = [v for _, v in run.series("update_ratio", group, finite=True) if v > 0]
            # One fewer than a trend needs: the first record has no update ratio when the weights
            # at start() were not kept.
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
                if (
                    fast == slow
                    or fast not in intended
                    or slow not in intended
                    or intended[slow] <= 0
                ):
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
                    for s, v, r in pick(
                        [
                            (run.step(i), run.value(r, "update_ratio", fast), r)
                            for i, r in enumerate(run.records)
                            if run.value(r, "update_ratio", fast) is not None
                        ]
                    )
                ]
                out.append(
                    self.diagnosis(
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
