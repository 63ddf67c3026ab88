"""Activation layers stuck on the holdout (the ``activations`` record key): ``dying_relu``,
``saturated_activations``.

Runs in: any process that reads a run (no torch).

Both judge each layer on the last third of the records (median), so that one bad holdout
pass is not enough, and name the layer that went first.
"""

from __future__ import annotations

import math
import statistics
from typing import ClassVar

from train_telemetry.analysis.load import Run, number
from train_telemetry.analysis.rules._common import pick, thirds
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule, Severity

# A layer must hold its value in at least this many records (the last third's median needs
# more than one holdout pass).
MIN_ACTIVATION_RECORDS = 2

# --- dying_relu ----------------------------------------------------------------------------
# DeepDiagnosis flags dead ReLUs at >= 70% of activations <= 0. dead_fraction counts units
# that never fire over the whole holdout, stricter than a share of activations, so a layer at
# 70% has lost most of its units for every input (healthy layers stay under ~20%).
DEAD_RELU_FRACTION = 0.7
# At 70% the layer still passes signal through the rest (a warning; the demo's runs that learn
# nothing end with their head's ReLUs 70-77% dead as a symptom); at 90% it is cut: serious.
DEAD_RELU_SERIOUS_FRACTION = 0.9

# --- saturated_activations -----------------------------------------------------------------
# DeepDiagnosis flags tanh/sigmoid saturation at > 50% of pre-activations beyond +-5;
# saturated_fraction (|tanh| > 0.99, sigmoid < 0.01 or > 0.99) is the same idea at +-2.6 / +-4.6.
SATURATED_FRACTION = 0.5


def _activation_series(
    run: Run, kinds: tuple[str, ...], field_name: str
) -> dict[str, list[tuple[int, float]]]:
    """{module: [(step, value of ``field_name``)]} for the activation modules of ``kinds``, in model order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for i, record in enumerate(run.records):
        for module, stats in (record.activations or {}).items():
            if stats.get("kind") not in kinds:
                continue
            # A module's stats are float | str | None by the schema (``kind`` is a string).
            v = number(stats.get(field_name))
            if v is not None and math.isfinite(v):
                out.setdefault(module, []).append((run.step(i), v))
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
        _, late_vals = thirds([v for _, v in points])
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


class _StuckActivations(Rule):
    """Layers of ``kinds`` whose ``field_name`` stays past ``bound``: the first one named, with
    its evidence, the others listed."""

    kinds: ClassVar[tuple[str, ...]]  # the ``kind`` of the activation modules judged
    field_name: ClassVar[str]  # their statistic read
    bound: ClassVar[float]
    strict: ClassVar[bool]  # past the bound: > (True) or >= (False)
    word: ClassVar[str]  # what the units are, past the bound
    hint: ClassVar[str]

    def severity_at(self, late: float) -> Severity:
        """The severity for a first layer at ``late`` (its last third's median)."""
        return self.severity

    def check(self, run: Run) -> list[Diagnosis]:
        series = _activation_series(run, self.kinds, self.field_name)
        stuck = _stuck_layers(series, self.bound, self.strict)
        if not stuck:
            return []
        module, began, late = stuck[0]
        others = [m for m, _, _ in stuck[1:]]
        title = (
            f"layer '{module}': {late:.0%} of its units {self.word} (median of the last records; "
            f"bound {self.bound:.0%}) since step {began}"
            + (
                f"; also {', '.join(repr(m) for m in others[:4])}{', ...' if len(others) > 4 else ''}"
                if others
                else ""
            )
        )
        return [
            self.diagnosis(
                severity=self.severity_at(late),
                subject=module,
                title=title,
                evidence=[
                    Evidence(s, {self.field_name: v, "layer": module})
                    for s, v in pick(series[module])
                ],
                hint=self.hint,
            )
        ]


class DyingRelu(_StuckActivations):
    code = "dying_relu"
    severity = "warning"
    summary = (
        "a ReLU-family layer whose units never fire on the holdout "
        f"(>= {DEAD_RELU_FRACTION:.0%} of units: warning, DeepDiagnosis' bound; "
        f">= {DEAD_RELU_SERIOUS_FRACTION:.0%}: serious); the layer and the step it began"
    )
    silent_bug = True
    kinds = ("relu",)
    field_name = "dead_fraction"
    bound = DEAD_RELU_FRACTION
    strict = False
    word = "dead"
    hint = (
        "ReLU units never fire on the holdout, so no gradient flows through them: lower the "
        "LR (or warm it up), check the init (a large negative bias), use LeakyReLU/GELU or "
        "normalisation before the ReLU"
    )

    def severity_at(self, late: float) -> Severity:
        return "serious" if late >= DEAD_RELU_SERIOUS_FRACTION else "warning"


class SaturatedActivations(_StuckActivations):
    code = "saturated_activations"
    severity = "serious"
    summary = (
        f"a tanh/sigmoid layer with more than {SATURATED_FRACTION:.0%} of its values in the "
        "flat tails"
    )
    silent_bug = True
    kinds = ("tanh", "sigmoid")
    field_name = "saturated_fraction"
    bound = SATURATED_FRACTION
    strict = True
    word = "saturated"
    hint = (
        "saturated tanh/sigmoid units pass ~0 gradient: normalise their inputs "
        "(BatchNorm/LayerNorm), use a smaller init (Xavier) or LR, or a ReLU-family activation"
    )
