"""Where a NaN/Inf came from: the record's ``nonfinite_origin``.

Runs in: the worker process (or the training process in sync mode), only for a record
whose values are not all finite (``records.nonfinite_keys`` found one): a finite record
costs nothing here.

Read from numbers the hook already copied: each parameter's gradient norm (the fused
``_foreach_norm`` of the hook: a tensor holding NaN or Inf has a NaN or Inf norm), each
parameter's weight norm (the worker's pass over the slot's weights) and the loss. Nothing
is added to the hook: no ``.item()``, no synchronisation.

What it names:

- ``first``: the non-finite tensors, the loss first, then gradients, then weights, each in
  model order, at most :data:`MAX_NAMED` of each kind: ``{kind, param, group, layer, value}``. One
  parameter's gradient going bad shows as that parameter alone at the first collection
  after it (at the next forward, every tensor downstream follows).
- ``gradients`` / ``weights`` / ``parameters``: how many parameters have a non-finite
  gradient / weight, of how many.
- ``step_skipped``: the hook runs after ``optimizer.step()``; gradients that are not finite
  on weights that still are mean the optimizer did not apply them: a ``GradScaler`` (or
  Accelerate, or Lightning's AMP) skipped the step. True / false when the record has
  non-finite gradients and the weights, null otherwise.
- ``since_step``: the step of the last record before it whose values were all finite in
  this process (null: none), so the bad step lies in ``(since_step, step]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .metrics.api import SnapshotData

MAX_NAMED = 8
"""Gradients (and weights) named in ``first``: enough to tell one bad parameter from a model gone NaN."""


def _bad(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def _text(value: float) -> str:
    # Not "NaN"/"Infinity": those strings are how a record writes a non-finite number, and
    # read_records turns them back into floats.
    return "nan" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


def nonfinite_origin(data: SnapshotData, since_step: int | None) -> dict[str, Any]:
    """The record's ``nonfinite_origin`` for ``data`` (a snapshot with a non-finite value)."""
    names, group_of, groups = data.param_names, data.group_of, data.group_names
    grads = data.grad_norms or []
    weights: Sequence[float | None] = []
    if data.params is not None:
        try:
            weights = data.weight_norms or []
        except Exception:  # its metric reports why; the gradients still tell their part
            weights = []
    bad_grads = [i for i, v in enumerate(grads) if _bad(v)]
    bad_weights = [i for i, v in enumerate(weights) if _bad(v)]

    def entry(kind: str, i: int, value: float) -> dict[str, Any]:
        g = group_of[i] if i < len(group_of) else -1
        return {"kind": kind, "param": names[i], "group": groups[g] if 0 <= g < len(groups) else None,
                "layer": names[i].rpartition(".")[0] or names[i], "value": _text(value)}

    first: list[dict[str, Any]] = []
    if data.loss is not None and not math.isfinite(data.loss):
        first.append({"kind": "loss", "param": None, "group": None, "layer": None, "value": _text(data.loss)})
    first += [entry("gradient", i, grads[i]) for i in bad_grads[:MAX_NAMED]]  # type: ignore[arg-type]
    first += [entry("weight", i, weights[i]) for i in bad_weights[:MAX_NAMED]]  # type: ignore[arg-type]
    skipped = None
    if bad_grads and weights:
        skipped = not any(_bad(weights[i]) for i in bad_grads if i < len(weights))
    return {"since_step": since_step, "first": first,
            "gradients": len(bad_grads), "weights": len(bad_weights), "parameters": len(names),
            "step_skipped": skipped}
