"""Activations far from unit scale from the first step: ``poor_initial_scale``.

Runs in: any process that reads a run (no torch).

Unnormalised inputs (raw pixels 0..255, features in the thousands) or an init several times
too large show in the first collections' ``activations`` (the holdout's forward through the
weights of the first steps): ReLU-family layers whose values are far larger than a unit
input gives them, tanh/sigmoid layers already in their flat tails. Later records show what
training made of it (``saturated_activations``, ``dying_relu`` judge the end of the run);
this rule names the cause at the start. Normalisation layers are left out: their output is
unit scale by construction.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from train_telemetry.analysis.load import Run, format_number, number
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule
from train_telemetry.records import OVERALL

# The first collections: the median of the first 3 records with activations, so that one
# holdout pass does not decide and the weights are still those of the start.
FIRST_RECORDS = 3
# ReLU-family layers: a unit-variance input through PyTorch's default init gives a layer
# output of RMS (sqrt(mean^2 + std^2)) ~0.3-0.7 (half of a unit normal: 0.71); the harness's
# healthy runs (MLPs, CNNs with BatchNorm, GPTs' GELU) stay at 0.1-0.4 in their first records,
# raw 0..255 pixels or x10 weights give 1.9-85. Above 1.5 (2x a unit normal's half) the inputs
# or the init are off scale: a warning; at 10 (over an order of magnitude) serious.
RELU_RMS_HIGH = 1.5
UNIT_RELU_RMS = math.sqrt(0.5)  # RMS of max(0, z) for z ~ N(0, 1)
RELU_RMS_SERIOUS = 10.0
# tanh/sigmoid layers with 40% of their values in the flat tails (|tanh| > 0.99) from the
# start: pre-activations beyond +-2.6 for 40% of the units. A unit input with default init
# leaves under 5% there, and a layer with a third there still trains (the tanh that
# test_analysis_diagnose calls healthy holds 30%). Always a warning: a layer that stays
# saturated is saturated_activations' (serious there), this names the cause at the start.
SATURATED_AT_START = 0.4
# The first records are taken after the first optimizer steps: their weights are still the
# init's only while those steps moved them little. An update ratio of 0.5 or more in those
# records (weights moved half their norm: exploding_gradients' bound for a first interval is
# 10, healthy runs stay under ~0.1; the harness's Adam at LR 0.1 moved them 1.1x in one step)
# means the activations show the LR, not the init or the inputs: not judged here.
FIRST_UPDATE_RATIO_MAX = 0.5


def _first_stats(run: Run) -> dict[str, tuple[str, list[tuple[int, dict[str, Any]]]]]:
    """{module: (kind, [(step, stats)] of its first FIRST_RECORDS records)}, model order."""
    out: dict[str, tuple[str, list[tuple[int, dict[str, Any]]]]] = {}
    for i, record in enumerate(run.records):
        for module, stats in (record.activations or {}).items():
            kind = stats.get("kind")
            if not isinstance(kind, str) or kind == "norm":
                continue
            entry = out.setdefault(module, (kind, []))
            if len(entry[1]) < FIRST_RECORDS:
                entry[1].append((run.step(i), dict(stats)))
    return out


def _rms(stats: dict[str, Any]) -> float | None:
    mean, std = number(stats.get("mean")), number(stats.get("std"))
    if mean is None or std is None or not math.isfinite(mean) or not math.isfinite(std):
        return None
    return math.sqrt(mean * mean + std * std)


class PoorInitialScale(Rule):
    code = "poor_initial_scale"
    severity = "warning"
    summary = (
        f"from the first collections, a ReLU-family layer's activations are {RELU_RMS_HIGH:g}x "
        f"unit scale or more (serious from {RELU_RMS_SERIOUS:g}x), or a tanh/sigmoid layer has "
        f"{SATURATED_AT_START:.0%} of its values in the flat tails (a warning): unnormalised inputs or a poor init"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        first = [r for r in run.records if r.activations][:FIRST_RECORDS]
        moved = [v for r in first if (v := run.value(r, "update_ratio", OVERALL)) is not None]
        if any(not math.isfinite(v) or v >= FIRST_UPDATE_RATIO_MAX for v in moved):
            return []
        found: list[tuple[float, str, str, float, list[tuple[int, dict[str, Any]]]]] = []
        for module, (kind, points) in _first_stats(run).items():
            if not points:
                continue
            if kind == "relu":
                values = [v for _, s in points if (v := _rms(s)) is not None]
                if values and (rms := statistics.median(values)) >= RELU_RMS_HIGH:
                    found.append((rms / RELU_RMS_HIGH, module, "rms", rms, points))
            elif kind in ("tanh", "sigmoid"):
                sat = [v for _, s in points if (v := number(s.get("saturated_fraction"))) is not None]
                if sat and (frac := statistics.median(sat)) >= SATURATED_AT_START:
                    found.append((frac / SATURATED_AT_START, module, "saturated", frac, points))
        if not found:
            return []
        # The layer nearest the input leads: where the scale goes wrong first (model order).
        _, module, what, value, points = found[0]
        serious = any(w == "rms" and v >= RELU_RMS_SERIOUS for _, _, w, v, _ in found)
        described = (
            f"activations of RMS {format_number(value)} ({value / UNIT_RELU_RMS:.3g}x what a unit "
            "normal gives through a ReLU)"
            if what == "rms"
            else f"{value:.0%} of its values in the flat tails"
        )
        others = [m for _, m, _, _, _ in found[1:]]
        return [
            self.diagnosis(
                severity="serious" if serious else "warning",
                subject=module,
                title=f"from step {points[0][0]}, layer '{module}' has {described} (median of the first "
                f"{len(points)} records)"
                + (f"; also {', '.join(repr(m) for m in others[:4])}" if others else ""),
                evidence=[
                    Evidence(
                        s,
                        {"layer": module, "mean": stats.get("mean"), "std": stats.get("std")}
                        | ({"saturated_fraction": stats.get("saturated_fraction")} if what == "saturated" else {}),
                    )
                    for s, stats in points
                ],
                hint="normalise the inputs (standardise features, scale pixels to [0, 1] then by the "
                "data's mean/std) and use the default (Kaiming/Xavier) init; a normalisation layer "
                "(BatchNorm/LayerNorm) after the first layer also absorbs it",
            )
        ]
