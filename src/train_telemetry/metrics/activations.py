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


_EXACT_FLOAT32_COUNT = 2**24  # float32 counts every integer below this exactly
_NONNEGATIVE = frozenset({"ReLU", "ReLU6"})  # outputs >= 0: a value is positive iff its sign is 1


class _Stats:
    """Running statistics over one holdout forward (which runs in chunks of eval_batch_size).

    Few passes over each activation, in float32, each a reduction where one will do (on
    CPU a float -> bool comparison or a reduction of a bool map over the batch dim costs
    10-20x a float sum; measured per 50x32x16x16 map on one thread: sum 16 us, dot 17 us,
    ``x > 0`` 235 us, ``any(dim=0)`` of it 366 us, ``amax(dim=0)`` 42 us, ``sign().sum()``
    136 us): a sum and a BLAS dot product for the first two moments (float64 sums or
    torch.var_mean cost several times the forward itself in a one-thread worker); for the
    relu family, each unit's maximum over the batch (a unit is alive once its maximum is
    positive) and the count of positive values (``sign().sum()`` for ReLU/ReLU6, whose
    outputs are never negative; a comparison for the others); one comparison for the
    tails. The moments accumulate in Python floats across chunks.
    """

    def __init__(self, kind: str, nonnegative: bool = False) -> None:
        self.kind = kind
        self.nonnegative = nonnegative
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.positive = 0
        self.saturated = 0
        self.unit_max: torch.Tensor | None = None  # per unit: its largest value so far

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
        total = float(flat.sum())
        self.total += total
        self.total_sq += float(torch.dot(flat, flat))
        self.count += n
        if self.kind == "relu":
            units = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)  # (batch, units)
            if math.isnan(total):  # a NaN would poison the sign sum and the maxima: compare instead
                positive = flat > 0
                self.positive += int(torch.count_nonzero(positive))
                unit_max = positive.reshape(units.shape).any(dim=0).float()  # only its sign is read
            else:
                if self.nonnegative and flat.dtype == torch.float32 and n < _EXACT_FLOAT32_COUNT:
                    self.positive += int(torch.sign(flat).sum())  # a float sum of 0/1 values: exact below 2**24
                else:
                    self.positive += int(torch.count_nonzero(flat > 0))
                unit_max = units.amax(dim=0)
            if self.unit_max is None or self.unit_max.shape != unit_max.shape:
                self.unit_max = unit_max
            else:
                torch.maximum(self.unit_max, unit_max, out=self.unit_max)
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
        if self.kind == "relu" and self.unit_max is not None:
            out["dead_fraction"] = 1.0 - float((self.unit_max > 0).float().mean())
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
            stats = self.stats[name] = _Stats(kind, type(module).__name__ in _NONNEGATIVE)
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
