"""``gradient_norm``: the L2 norm of the gradients, overall and per param group.

Runs in: the worker (or inline in sync mode), from the per-parameter norms the hook took
in one fused ``_foreach_norm``.
"""

from __future__ import annotations

from .api import Metric, MetricResult, SnapshotData


class GradientNorm(Metric):
    """{overall, <group>...}; null for a group none of whose parameters had a gradient."""

    key = "gradient_norm"
    needs = frozenset({"grad_norms"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        if snap.grad_norms is None:
            return None
        return snap.by_group(snap.grad_norms)
