"""``learning_rates``: the LR of every param group at the hook, by index and by name.

Runs in: the worker (or inline in sync mode); the hook reads the LRs as plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from .api import Metric, MetricResult, SnapshotData


def learning_rate_dict(lrs: Sequence[float], group_names: Sequence[str]) -> dict[str, float]:
    """{group_0.., <name>...}: the seed's layout, by index and by the group's name."""
    out: dict[str, float] = {}
    for i, lr in enumerate(lrs):
        out[f"group_{i}"] = lr
    for name, lr in zip(group_names, lrs, strict=False):
        out[name] = lr
    return out


class LearningRates(Metric):
    key = "learning_rates"
    needs = frozenset({"learning_rates"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        if snap.learning_rates is None:
            return None
        return learning_rate_dict(snap.learning_rates, snap.group_names)
