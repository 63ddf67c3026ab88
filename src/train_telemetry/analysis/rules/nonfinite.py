"""NaN/Inf in the metrics: ``nonfinite``.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from train_telemetry.analysis.load import Run, TypedRecord, number
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule
from train_telemetry.records import NonfiniteOrigin, nonfinite_keys

# No threshold: one NaN or Inf anywhere is serious (every later update may carry it).


def _value_at(record: dict[str, Any], path: str) -> Any:
    # A dotted path into any metric's nesting (the record as written): dicts down to a leaf.
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _nonfinite_in(record: TypedRecord) -> dict[str, Any]:
    """ "family.key" -> value for each NaN/Inf in the record (its own list plus a scan)."""
    written = record.to_dict()
    found: dict[str, Any] = {}
    for key in [*(record.nonfinite or []), *nonfinite_keys(written)]:
        value = number(_value_at(written, key))
        found[key] = value if value is not None else "non-finite"
    return found


class Nonfinite(Rule):
    code = "nonfinite"
    severity = "serious"
    summary = (
        "NaN or Inf in any recorded metric: the record's `nonfinite` list or the values themselves"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        hits = []
        for i, record in enumerate(run.records):
            found = _nonfinite_in(record)
            if found:
                hits.append(Evidence(run.step(i), found))
        if not hits:
            return []
        first = hits[0]
        origin = next((r.nonfinite_origin for r in run.records if r.nonfinite_origin is not UNSET), None)
        if origin is not None:
            where = _origin_text(origin)
        else:
            where = ", ".join(sorted(first.values)[:4]) + (", ..." if len(first.values) > 4 else "")
        skipped = [run.step(i) for i, r in enumerate(run.records)
                   if r.nonfinite_origin is not UNSET and r.nonfinite_origin.step_skipped]
        hint = ("training diverged or met bad data: lower the LR, clip gradients (clip_grad_norm_), check "
                "inputs and loss for NaN; with AMP use a GradScaler")
        if skipped and len(skipped) == len(hits):
            hint = ("every non-finite gradient was skipped by the optimizer (a GradScaler at work): harmless "
                    "while rare; if it repeats, the loss scale keeps overflowing: check the loss in float32")
        return [
            self.diagnosis(
                title=f"NaN/Inf in {len(hits)} of {len(run.records)} records, first at step {first.step}: {where}",
                evidence=pick(hits),
                hint=hint,
            )
        ]


def _origin_text(origin: NonfiniteOrigin) -> str:
    """"gradient of head.weight (group head, layer head), 1 of 4 parameters; step skipped" and the like."""
    named = []
    for t in origin.first[:3]:
        named.append("the loss" if t.kind == "loss" else f"{t.kind} of {t.param} (group {t.group}, layer {t.layer})")
    more = len(origin.first) - 3
    text = ", ".join(named) + (f" and {more} more" if more > 0 else "")
    counts = [f"{n} of {origin.parameters} parameters' {kind}" for kind, n in
              (("gradients", origin.gradients), ("weights", origin.weights)) if n]
    if counts:
        text += f" ({'; '.join(counts)})"
    if origin.since_step is not None:
        text += f"; all finite at step {origin.since_step}"
    if origin.step_skipped is not None:
        text += "; the optimizer skipped that step" if origin.step_skipped else "; the optimizer applied it"
    return text
