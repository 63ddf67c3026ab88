"""``weight_norm``, ``weight_delta`` and ``update_ratio``, overall and per param group.

Runs in: the worker (or inline in sync mode). ``weight_delta`` is the L2 distance of the
snapshot's weights from the previous collection's (the reference checkpoint, reference.py);
the first record measures from the weights at ``start()``, or is null without them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .api import Metric, MetricResult, SnapshotData


def update_ratios(
    delta: Mapping[str, float | None], reference_norm: Mapping[str, float | None]
) -> dict[str, float | None]:
    """delta / ||reference weights|| per key; None where either is missing or the norm is 0."""
    out: dict[str, float | None] = {}
    for key, d in delta.items():
        ref = reference_norm.get(key)
        out[key] = d / ref if d is not None and ref else None
    return out


def _no_reference(snap: SnapshotData) -> dict[str, float | None]:
    """Every key null: no valid reference (start() had no model, or a crash tore it)."""
    return snap.by_group([None] * len(snap.param_names))


class WeightNorm(Metric):
    """{overall, <group>...}: L2 norm of the weights at the hook."""

    key = "weight_norm"
    needs = frozenset({"weights"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        norms = snap.weight_norms
        return None if norms is None else snap.by_group(norms)


class WeightDelta(Metric):
    """{overall, <group>...}: L2 distance from the previous collection's weights."""

    key = "weight_delta"
    needs = frozenset({"weight_deltas"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        found = snap.weight_deltas
        if found is None:
            return _no_reference(snap)
        return snap.by_group(found.deltas)


class UpdateRatio(Metric):
    """{overall, <group>...}: weight_delta / the reference weights' norm."""

    key = "update_ratio"
    needs = frozenset({"weight_deltas"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        found = snap.weight_deltas
        if found is None:
            return _no_reference(snap)
        return update_ratios(snap.by_group(found.deltas), snap.by_group(found.reference_norms))
