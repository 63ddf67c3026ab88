"""``model_mode``: whether the model trained in train mode, and whether BatchNorm learned.

Runs in: the worker (or inline in sync mode). The hook reads ``model.training`` (a flag);
the BatchNorm running statistics are among the buffers the hook copies with the weights,
so the change since the previous collection costs the hook nothing.
"""

from __future__ import annotations

import torch

from .api import Metric, MetricResult, RunInfo, SnapshotData

_STATS = ("running_mean", "running_var")


class ModelMode(Metric):
    """{training: 1|0, batchnorm_layers, batchnorm_stat_change (max relative change, null at first)}."""

    key = "model_mode"
    # The BatchNorm statistics come with the weights when the run copies them; this metric
    # alone never makes the hook copy weights.
    needs = frozenset({"mode"})

    def __init__(self) -> None:
        self.stats: list[str] = []
        self.previous: dict[str, torch.Tensor] = {}

    def setup(self, run: RunInfo) -> None:
        norms = {name for name, kind in run.module_types.items() if "BatchNorm" in kind}
        self.stats = [b for b in run.buffer_names if b.rpartition(".")[0] in norms and b.rpartition(".")[2] in _STATS]

    def compute(self, snap: SnapshotData) -> MetricResult:
        out: dict[str, float | int | None] = {}
        if snap.training is not None:
            out["training"] = int(snap.training)
        layers = len(self.stats) // 2
        out["batchnorm_layers"] = layers
        if layers and snap.buffers is not None:
            change: float | None = None
            if self.previous:
                change = 0.0
                for name in self.stats:
                    now, before = snap.buffers[name].double(), self.previous[name]
                    scale = float(torch.linalg.vector_norm(before)) or 1.0
                    change = max(change, float(torch.linalg.vector_norm(now - before)) / scale)
            out["batchnorm_stat_change"] = change
            self.previous = {name: snap.buffers[name].double().clone() for name in self.stats}  # small: BN stats only
        return out
