"""Optimizer param groups that never move: ``frozen_group``.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from msgspec import UNSET

from train_telemetry.analysis.load import UNASSIGNED, Run, format_number
from train_telemetry.analysis.rules._common import LayerOrigin, layer_series, pick, with_layer
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# weight_delta / weight_norm below this counts as "did not move": the checkpoint copy is exact,
# so a frozen group's delta is 0.0; 1e-10 only absorbs summation rounding.
FROZEN_RELATIVE_DELTA = 1e-10
# A group must look frozen in this many records (all of them) before it is called frozen;
# one record without gradients can be a branch that a batch did not use.
MIN_FROZEN_RECORDS = 2


def _frozen_origin(run: Run, group: str) -> LayerOrigin | None:
    """The first layer, in model order, with no gradient or no update."""
    grads = layer_series(run, "gradient_norm", group)
    for module, points in layer_series(run, "update_ratio", group).items():
        moved = [v for _, v in points if v is not None]
        no_grad = all(v is None or v == 0 for _, v in grads.get(module, []))
        if (moved and all(v <= FROZEN_RELATIVE_DELTA for v in moved)) or (
            not moved and grads.get(module) and no_grad
        ):
            return LayerOrigin(
                module, points[-1][0], {"layer": module, "layer_update_ratio": points[-1][1]}
            )
    return None


def _first_frozen(origin: LayerOrigin) -> str:
    return f"first frozen layer '{origin.module}'"


class FrozenGroup(Rule):
    code = "frozen_group"
    severity = "serious"
    summary = (
        "a param group whose weights never change (no gradients, LR 0, or a zero weight delta), "
        "or parameters in no optimizer group that receive gradients"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        out: list[Diagnosis] = []
        for group in run.groups:
            grads: list[float | None] = []
            lrs: list[float] = []
            moved: list[bool] = []
            points: list[Evidence] = []
            for i, record in enumerate(run.records):
                values: dict[str, Any] = {}
                if record.gradient_norm is not UNSET:
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
                # Layers are not tagged by group, and no module belongs to "unassigned" by name.
                out.extend(self._unassigned_with_gradients(grads, points))
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
            found = self.diagnosis(
                subject=group,
                title=f"group '{group}' is frozen: " + ", ".join(reasons),
                evidence=pick(points),
                hint="if unintended: check requires_grad of its parameters, that the forward uses "
                "them without detach()/no_grad(), and its LR; if intended, leave the group out of "
                "the optimizer",
            )
            out.append(with_layer(found, _frozen_origin(run, group), _first_frozen))
        return out

    def _unassigned_with_gradients(
        self, grads: Sequence[float | None], points: Sequence[Evidence]
    ) -> list[Diagnosis]:
        """The ``unassigned`` group (parameters in no optimizer group) never moves by design; it
        is a problem only when its parameters receive gradients: backward pays for them and no
        optimizer step uses them (records cannot tell requires_grad, so null gradients count
        as frozen on purpose, e.g. a LoRA model's base)."""
        got = [g for g in grads if g is not None and g != 0]
        if not got:
            return []
        return [
            self.diagnosis(
                # Not a fault of training, only wasted backward work: a warning.
                severity="warning",
                subject=UNASSIGNED,
                title=f"parameters in no optimizer group receive gradients (norm up to "
                f"{format_number(max(got))} in {len(got)} of {len(grads)} records) but no optimizer "
                "updates them",
                evidence=pick([e for e in points if e.values.get("gradient_norm")]),
                hint="if they should train, add them to the optimizer's param groups; if not, set "
                "requires_grad=False on them (saves their backward compute and memory)",
            )
        ]
