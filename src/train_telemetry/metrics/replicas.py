"""``replicas``: whether the ranks that should hold the same weights do (the replica check).

Runs in: the worker (or inline in sync mode), from numbers the collection's collective
already carried. Under DDP every rank should hold the same weights; under HSDP each
shard's replicas across the replicate dimension should. A rank-dependent bug (a rank that
loaded another checkpoint, skipped ``optimizer.step()``, or trains with a different LR) or
a skipped all-reduce makes them drift apart silently: each rank keeps training and
the loss looks fine on rank 0.

At each collection every rank puts one number into the collective it runs anyway (DDP's
label counts, FSDP2's gradient norms): the sum of squares of its (local) weights, with
float64 sums (``snapshot.weight_fingerprint``), at its own position of the vector, so
after the sum every rank's value is there. Replicas of equal weights give bitwise-equal
values; the check compares each group's values with their median and names the ranks
that differ by more than ``TOLERANCE`` (relative). A rank that could not take its value
(NaN) is counted as not compared, never as diverged.
"""

from __future__ import annotations

import math
import statistics

from .api import Metric, MetricResult, RunInfo, SnapshotData

# Relative difference of a rank's sum of squares from its group's median that counts as
# divergence. Equal weights give equal sums (the same bits summed in the same order: a
# difference of exactly 0, recorded as max_rel_spread). The tolerance leaves room for ranks
# that sum in another order (another thread count or GPU type): float32 norms of the same
# tensors then differ by ~1e-7. A drift does not heal (DDP never re-syncs weights), so one
# that starts smaller is caught at a later collection; one weight matrix off by 0.1%
# (tests/e2e/test_distributed.py) shows as ~1e-3.
TOLERANCE = 1e-6


def check_replicas(values: list[float], groups: list[list[int]]) -> dict[str, object]:
    """The replica check of one collection: ``values`` per rank, ``groups`` of ranks that
    should be equal. Returns {compared, not_compared, max_rel_spread, diverged}."""
    spread = 0.0
    diverged: list[int] = []
    compared = not_compared = 0
    for group in groups:
        have = [(r, values[r]) for r in group if r < len(values) and math.isfinite(values[r])]
        not_compared += len(group) - len(have)
        if len(have) < 2:
            not_compared += len(have)
            continue
        compared += len(have)
        mid = statistics.median_low(v for _, v in have)
        scale = abs(mid) or max(abs(v) for _, v in have) or 1.0
        spread = max(spread, (max(v for _, v in have) - min(v for _, v in have)) / scale)
        off = [r for r, v in have if abs(v - mid) > TOLERANCE * scale]
        # two replicas that differ: which one is wrong is not known, so both are named
        diverged += [r for r, _ in have] if off and len(have) == 2 else off
    return {"compared": compared, "not_compared": not_compared, "max_rel_spread": spread,
            "diverged": sorted(diverged)}


class Replicas(Metric):
    """{compared, not_compared, max_rel_spread, diverged}: the replica check of this collection."""

    key = "replicas"
    needs: frozenset[str] = frozenset()  # the values ride on the ranks' collective: nothing more to copy

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def setup(self, run: RunInfo) -> None:
        self.groups = run.replica_groups

    def compute(self, snap: SnapshotData) -> MetricResult:
        if not self.groups or snap.replica_values is None:
            return None
        return check_replicas(snap.replica_values, self.groups)
