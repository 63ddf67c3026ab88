"""``gradient_norm``: the L2 norm of the gradients, overall and per param group; with
``Telemetry.clip_grad_norm_`` also ``gradient_norm_pre_clip`` and ``gradient_clipping``.

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


class GradientNormPreClip(Metric):
    """{overall, <group>...} before clipping, when the loop clipped with ``Telemetry.clip_grad_norm_``
    (``gradient_norm`` then holds what the optimizer applied, at most max_norm)."""

    key = "gradient_norm_pre_clip"
    needs = frozenset({"grad_norms"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        if snap.pre_clip_norms is None:
            return None
        return snap.by_group(snap.pre_clip_norms)


class GradientClipping(Metric):
    """{max_norm, pre_clip_norm}: the clip's threshold and the total norm it returned (as the
    Hugging Face integration records it)."""

    key = "gradient_clipping"
    needs = frozenset({"grad_norms"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        return snap.clipping
