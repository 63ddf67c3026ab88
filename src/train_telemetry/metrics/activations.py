"""``activations``: per activation/normalisation layer, statistics of its outputs on the holdout.

Runs in: the worker (or inline in sync mode), through forward hooks on the model the
holdout is evaluated with (``instrument``): the hooks see the holdout forward that the
``holdout_logits`` metric runs anyway, so the statistics cost training nothing.

Per layer of a tracked kind (modules, not functional calls such as ``F.relu``):

- relu family (ReLU, LeakyReLU, ReLU6, ELU, GELU, SiLU...): ``dead_fraction``, the share of
  units (output positions, all dims but the batch) never positive over the whole holdout,
  and ``positive_fraction`` of all values (DeepDiagnosis calls a ReLU layer dead at >= 70%
  of activations <= 0);
- tanh / sigmoid: ``saturated_fraction``, the share of values in the flat tails
  (|tanh| > 0.99, sigmoid < 0.01 or > 0.99: a pre-activation beyond about +-2.6 / +-4.6,
  where the gradient is under 2% / 1% of its peak);
- norm (LayerNorm, BatchNorm, GroupNorm): mean and std only;
- every kind: ``mean`` and ``std`` of all values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .api import Metric, MetricResult, SnapshotData

_RELU = ("ReLU", "LeakyReLU", "ReLU6", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish")
_KINDS = {**{name: "relu" for name in _RELU}, "Tanh": "tanh", "Sigmoid": "sigmoid", "Hardtanh": "tanh",
          "LayerNorm": "norm", "BatchNorm1d": "norm", "BatchNorm2d": "norm", "BatchNorm3d": "norm",
          "GroupNorm": "norm", "RMSNorm": "norm"}
SATURATION = 0.99  # |tanh| above this, sigmoid beyond 1 - this or below 1 - this


def kind_of(module: torch.nn.Module) -> str | None:
    """The tracked kind of a module ("relu", "tanh", "sigmoid", "norm"), or None."""
    return _KINDS.get(type(module).__name__)


class _Stats:
    """Running statistics over one holdout forward (which runs in chunks of eval_batch_size).

    Few passes over each activation, in float32: a sum and a BLAS dot product for the
    first two moments (float64 sums or torch.var_mean over a whole activation map cost
    several times the forward itself in a one-thread worker), one comparison for the
    relu family or the tails. The moments accumulate in Python floats across chunks.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.positive = 0
        self.saturated = 0
        self.alive: torch.Tensor | None = None  # per unit: positive at least once

    def add(self, out: torch.Tensor) -> None:
        x = out.detach()
        if not x.is_floating_point():
            x = x.float()
        if x.dim() == 0:
            x = x.reshape(1)
        n = x.numel()
        if n == 0:
            return
        flat = x.reshape(-1)
        self.total += float(flat.sum())
        self.total_sq += float(torch.dot(flat, flat))
        self.count += n
        if self.kind == "relu":
            pos = x > 0
            self.positive += int(torch.count_nonzero(pos))
            alive = pos.reshape(x.shape[0], -1).any(dim=0) if x.dim() > 1 else pos.any().reshape(1)
            self.alive = alive if self.alive is None or self.alive.shape != alive.shape else self.alive | alive
        elif self.kind == "tanh":
            self.saturated += int(torch.count_nonzero(x.abs() > SATURATION))
        elif self.kind == "sigmoid":
            self.saturated += int(torch.count_nonzero((x - 0.5).abs() > SATURATION - 0.5))

    def result(self) -> dict[str, Any] | None:
        if not self.count:
            return None
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        out: dict[str, Any] = {"kind": self.kind, "mean": mean, "std": math.sqrt(var)}
        if self.kind == "relu" and self.alive is not None:
            out["dead_fraction"] = 1.0 - float(self.alive.float().mean())
            out["positive_fraction"] = self.positive / self.count
        elif self.kind in ("tanh", "sigmoid"):
            out["saturated_fraction"] = self.saturated / self.count
        return out


class Activations(Metric):
    """{<module>: {kind, mean, std, dead_fraction | saturated_fraction ...}} over the holdout."""

    key = "activations"
    needs = frozenset({"holdout"})

    def __init__(self) -> None:
        self.stats: dict[str, _Stats] = {}

    def instrument(self, model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            kind = kind_of(module)
            if kind is None or not name:
                continue
            stats = self.stats[name] = _Stats(kind)
            module.register_forward_hook(lambda _m, _i, out, s=stats: s.add(out) if isinstance(out, torch.Tensor) else None)

    def compute(self, snap: SnapshotData) -> MetricResult:
        if not self.stats:
            return None
        try:
            if snap.holdout is None:  # runs the holdout forward (once per snapshot), which fills the stats
                return None
            found = {name: s.result() for name, s in self.stats.items()}
            return {name: r for name, r in found.items() if r is not None} or None
        finally:
            for s in self.stats.values():
                s.reset()
