"""A model output that does not fit its loss: ``probabilities_as_logits``.

Runs in: any process that reads a run (no torch).

``CrossEntropyLoss`` (and ``BCEWithLogitsLoss``) apply the softmax (sigmoid) themselves: a
model whose forward already ends in ``Softmax`` (``Sigmoid``) hands them probabilities, and
the loss applies it a second time. Training runs, but its gradients are squashed and the
loss can never fall below a floor: with C classes, the cross-entropy of a one-hot
probability vector taken as logits is ``log(e + C - 1) - 1`` (0.31 for one sigmoid output).
The holdout's logits show it: every row a probability vector (values in [0, 1] summing to 1;
one output: values in [0, 1]) in every record; the train loss shows the floor.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from train_telemetry.analysis.load import Run, format_number, train_loss
from train_telemetry.analysis.rules._common import MIN_TREND_RECORDS, pick, thirds
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# Rows summing to 1 within 1e-3 (float32 softmax sums are exact to ~1e-6; raw logits of
# several classes summing to 1 by chance in every row of a holdout do not happen).
ROW_SUM_TOLERANCE = 1e-3
# In at least 2 holdout records and all of them: a freshly initialised network's raw logits
# are never all in [0, 1] summing to 1, so one record is no accident either, but two make
# sure it is the model and not one evaluation.
MIN_PROBABILITY_RECORDS = 2
# The train loss (median of the last third) must sit at or above 0.95x the floor: a user who
# feeds the probabilities to NLLLoss(log(p)) or BCELoss (the right pairing) gets losses well
# below it as the model learns. 0.95 allows for a batch of easy examples.
FLOOR_MARGIN = 0.95


def _probability_rows(logits: list[Any]) -> tuple[bool, int] | None:
    """(every row is a probability vector, class count) of one holdout's logits; None when
    they are not a list of numbers per example."""
    if not logits:
        return None
    rows: list[list[float]] = []
    for row in logits:
        values = row if isinstance(row, list) else [row]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        rows.append([float(v) for v in values])
    width = len(rows[0])
    in_unit = all(0.0 <= v <= 1.0 for row in rows for v in row)
    sums = width == 1 or all(abs(sum(row) - 1.0) <= ROW_SUM_TOLERANCE for row in rows)
    return in_unit and sums, width


def loss_floor(classes: int) -> float:
    """The lowest cross-entropy of a probability vector taken as logits: log(e + C - 1) - 1
    for C classes; log(1 + e^-1) for one (sigmoid) output taken by BCEWithLogitsLoss."""
    if classes <= 1:
        return math.log1p(math.exp(-1.0))
    return math.log(math.e + classes - 1) - 1.0


class ProbabilitiesAsLogits(Rule):
    code = "probabilities_as_logits"
    severity = "serious"
    summary = (
        "the model's outputs are probabilities (every holdout row in [0, 1] summing to 1) fed "
        "to a loss that applies softmax itself: the train loss stays above its floor "
        "(softmax before `CrossEntropyLoss`)"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        judged: list[tuple[int, bool, int]] = []
        for step, _, holdout in run.holdout():
            found = _probability_rows(holdout.logits or [])
            if found is not None:
                judged.append((step, *found))
        if len(judged) < MIN_PROBABILITY_RECORDS or not all(p for _, p, _ in judged):
            return []
        classes = judged[-1][2]
        floor = loss_floor(classes)
        losses = [v for _, v in run.points(train_loss, finite=True)]
        late = statistics.median(thirds(losses)[1]) if len(losses) >= MIN_TREND_RECORDS else None
        if late is not None and late < FLOOR_MARGIN * floor:
            return []  # the loss goes below the floor: it takes the probabilities correctly
        train_text = (
            f"the train loss stays at {format_number(late)} (median of the last third), above the "
            f"floor {format_number(floor)} that cross-entropy of probabilities cannot go below"
            if late is not None
            else "no train loss recorded to confirm the loss applies softmax again"
        )
        loss_at = dict(run.points(train_loss))
        evidence: list[Evidence] = []
        for step, _, holdout in pick(run.holdout()):
            rows = [r if isinstance(r, list) else [r] for r in holdout.logits or []]
            values: dict[str, Any] = {
                "min_output": min(min(r) for r in rows),
                "max_output": max(max(r) for r in rows),
            }
            if classes > 1:
                values["row_sum_max_error"] = max(abs(sum(r) - 1.0) for r in rows)
            if step in loss_at:
                values["train_loss"] = loss_at[step]
            evidence.append(Evidence(step, values))
        outputs = (
            f"{classes} outputs per example that are probabilities (in [0, 1], summing to 1)"
            if classes > 1
            else "one output per example in [0, 1] (a sigmoid)"
        )
        return [
            self.diagnosis(
                # Without the train loss it may be NLLLoss(log(p)), the right pairing: a warning.
                severity="serious" if late is not None else "warning",
                title=f"the model returns {outputs} in all {len(judged)} holdout records; {train_text}",
                evidence=evidence,
                hint="remove the final Softmax/Sigmoid from the model (CrossEntropyLoss and "
                "BCEWithLogitsLoss apply it themselves), or pair it with NLLLoss on log-probabilities "
                "(BCELoss for a sigmoid)",
            )
        ]
