"""Parameters whose gradients never become updates: ``params_not_updated``.

Runs in: any process that reads a run (no torch).

A layer that receives gradients in every record but whose weights never change is trained by
no optimizer: it was replaced after the optimizer was built (a new head, a model re-created
or re-loaded; the optimizer still holds the old tensors), or it is missing from every param
group while it requires grad. Read per layer from the ``layers`` record key (gradient norm
and weight delta per module); without it, from the ``unassigned`` group (the parameters that
no optimizer group holds).
"""

from __future__ import annotations

import math
from typing import Any

from train_telemetry.analysis.load import UNASSIGNED, Run, format_number
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# A layer must show gradients without a change in this many records (every record that
# measured both): one or two can be a step the optimizer skipped (AMP's GradScaler on an
# overflow skips the step and keeps the weights exactly).
NOT_UPDATED_MIN_RECORDS = 3
# The weight-delta copy is exact: a layer no optimizer steps has a delta of exactly 0. 1e-12
# of the layer's weight norm (the update ratio) only absorbs summation rounding, far below
# any real update (an LR of 1e-6 on a unit gradient moves weights ~1e-6 of their norm).
NOT_UPDATED_RATIO = 1e-12


def _layer_points(run: Run) -> dict[str, list[tuple[int, float, float]]]:
    """{layer: [(step, gradient norm, update ratio)]} for the records that measured both."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for i, record in enumerate(run.records):
        layers = record.layers or {}
        grads, ratios, deltas = (layers.get(k, {}) for k in ("gradient_norm", "update_ratio", "weight_delta"))
        for module, grad in grads.items():
            ratio = ratios.get(module)
            if ratio is None and deltas.get(module) == 0:
                ratio = 0.0
            if grad is None or ratio is None or not math.isfinite(grad) or not math.isfinite(ratio):
                continue
            out.setdefault(module, []).append((run.step(i), grad, ratio))
    return out


def _stuck(points: list[tuple[int, float, float]]) -> bool:
    return (
        len(points) >= NOT_UPDATED_MIN_RECORDS
        and all(g > 0 for _, g, _ in points)
        and all(r <= NOT_UPDATED_RATIO for _, _, r in points)
    )


def _any_lr(run: Run) -> bool:
    """Whether some group trained with a non-zero LR (all LRs 0 is frozen_group's)."""
    return any(v > 0 for g in run.groups for _, v in run.lr_series(g) if math.isfinite(v)) or not any(
        run.lr_series(g) for g in run.groups
    )


class ParamsNotUpdated(Rule):
    code = "params_not_updated"
    severity = "serious"
    summary = (
        "a layer receives gradients in every record but its weights never change: no optimizer "
        "holds its parameters (built before the layer was replaced, or the parameter left out)"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        if not _any_lr(run):
            return []
        layers = _layer_points(run)
        stuck = [m for m, points in layers.items() if _stuck(points)]
        if stuck:
            moved = [m for m, points in layers.items() if any(r > NOT_UPDATED_RATIO for _, _, r in points)]
            first = stuck[0]
            points = layers[first]
            evidence = [
                Evidence(s, {"layer": first, "layer_gradient_norm": g, "layer_update_ratio": r})
                for s, g, r in pick(points)
            ]
            also = f"; also {', '.join(repr(m) for m in stuck[1:5])}{', ...' if len(stuck) > 5 else ''}" if len(stuck) > 1 else ""
            title = (
                f"{len(stuck)} of {len(layers)} layers get gradients but never change: layer '{first}' "
                f"(gradient norm {format_number(min(g for _, g, _ in points))}..{format_number(max(g for _, g, _ in points))}, "
                f"weight change exactly 0 in {len(points)} records){also}"
                + (f"; {len(moved)} other layers do change" if moved else "; no layer changes at all")
            )
            return [self._found(title, evidence, subject=first)]
        return self._unassigned(run)

    def _unassigned(self, run: Run) -> list[Diagnosis]:
        """Without ``layers``: the parameters of no optimizer group, when they get gradients."""
        if UNASSIGNED not in run.groups or any(r.layers for r in run.records):
            return []
        points: list[tuple[int, float, float]] = []
        for i, record in enumerate(run.records):
            g = run.value(record, "gradient_norm", UNASSIGNED)
            d = run.value(record, "weight_delta", UNASSIGNED)
            if g is not None and d is not None and math.isfinite(g):
                points.append((run.step(i), g, d))
        if not _stuck(points):
            return []
        evidence: list[Evidence] = [
            Evidence(s, {"gradient_norm": g, "weight_delta": d}) for s, g, d in pick(points)
        ]
        return [
            self._found(
                f"the parameters in no optimizer group (group '{UNASSIGNED}') get gradients "
                f"(norm up to {format_number(max(g for _, g, _ in points))}) but never change in "
                f"{len(points)} records",
                evidence,
                subject=UNASSIGNED,
            )
        ]

    def _found(self, title: str, evidence: list[Evidence], **kw: Any) -> Diagnosis:
        return self.diagnosis(
            title=title,
            evidence=evidence,
            hint="build the optimizer after the model is final (after replacing a head, re-creating "
            "or loading the model) or add these parameters to a param group; if they are meant to "
            "stay fixed, set requires_grad=False on them",
            **kw,
        )
