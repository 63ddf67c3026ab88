"""``layers``: gradient norm, weight norm, weight delta and update ratio per module.

Runs in: the worker (or inline in sync mode), from the per-parameter numbers every
collection already has (gradient norms from the hook, weight norms and deltas from the
worker), so it costs the hook nothing. A parameter ``encoder.0.weight`` belongs to the
module ``encoder.0``; with ``layer_depth: N`` (N > 0) to its first N name components
(``encoder``), which merges blocks into coarser layers. Weight norm, delta and update
ratio per layer are there when the run tracks weight deltas (``track_weight_delta``).
"""

from __future__ import annotations

from .api import Metric, MetricResult, RunInfo, SnapshotData, combine_norms
from .weights import update_ratios

ROOT = "(root)"  # parameters registered on the model itself


def layer_of(param_name: str, depth: int) -> str:
    """The module (layer) a parameter belongs to, cut to ``depth`` name components (0: all)."""
    module = param_name.rpartition(".")[0] or ROOT
    if depth > 0 and module != ROOT:
        module = ".".join(module.split(".")[:depth])
    return module


class Layers(Metric):
    """{gradient_norm, weight_norm, weight_delta, update_ratio}: each {<layer>: value}."""

    key = "layers"
    # Only gradient norms are required: weight norms and deltas are added when the run
    # copies weights anyway (track_weight_delta), so this metric never adds to the hook.
    needs = frozenset({"grad_norms"})

    def __init__(self, depth: int | None = None) -> None:
        self.depth = depth
        self.names: list[str] = []
        self.index: list[int] = []

    def setup(self, run: RunInfo) -> None:
        depth = run.config.layer_depth if self.depth is None else self.depth
        layers = [layer_of(name, depth) for name in run.param_names]
        self.names = list(dict.fromkeys(layers))  # model order
        position = {name: i for i, name in enumerate(self.names)}
        self.index = [position[layer] for layer in layers]

    def _by_layer(self, per_param: list[float | None]) -> dict[str, float | None]:
        out = combine_norms(per_param, self.index, self.names)
        del out["overall"]
        return out

    def compute(self, snap: SnapshotData) -> MetricResult:
        out: dict[str, dict[str, float | None]] = {}
        if snap.grad_norms is not None:
            out["gradient_norm"] = self._by_layer(snap.grad_norms)
        norms = snap.weight_norms
        if norms is not None:
            out["weight_norm"] = self._by_layer(list(norms))
        found = snap.weight_deltas
        if found is not None:
            out["weight_delta"] = self._by_layer(list(found.deltas))
            out["update_ratio"] = update_ratios(out["weight_delta"], self._by_layer(list(found.reference_norms)))
        return out or None
