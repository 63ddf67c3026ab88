"""The replica check's verdict (metrics/replicas.py) on the values the collective carried.

The end-to-end runs (DDP with a rank whose weights drift, HSDP's replicas compared) are in
tests/e2e/test_distributed.py and tests/e2e/test_mesh.py.
"""

from __future__ import annotations

import math

import torch

from train_telemetry.metrics.replicas import TOLERANCE, check_replicas
from train_telemetry.snapshot import shape_groups, weight_fingerprint


def test_equal_replicas_pass_with_a_spread_of_zero() -> None:
    got = check_replicas([5.0, 7.0, 5.0, 7.0], [[0, 2], [1, 3]])
    assert got == {"compared": 4, "not_compared": 0, "max_rel_spread": 0.0, "diverged": []}


def test_of_three_replicas_the_odd_one_is_named_of_two_both() -> None:
    three = check_replicas([5.0, 5.0, 5.01], [[0, 1, 2]])
    assert three["diverged"] == [2] and math.isclose(three["max_rel_spread"], 0.002)
    two = check_replicas([5.0, 7.0, 5.0, 7.0 * (1 + 10 * TOLERANCE)], [[0, 2], [1, 3]])
    assert two["diverged"] == [1, 3]  # which of the two is wrong is not known


def test_a_rank_without_a_value_is_not_compared_never_diverged() -> None:
    got = check_replicas([5.0, float("nan"), 5.0], [[0, 1, 2]])
    assert got == {"compared": 2, "not_compared": 1, "max_rel_spread": 0.0, "diverged": []}
    alone = check_replicas([5.0, float("nan")], [[0, 1]])
    assert alone["compared"] == 0 and alone["not_compared"] == 2 and alone["diverged"] == []


def test_the_fingerprint_is_the_float64_sum_of_squares_whatever_the_path() -> None:
    """The per-tensor path and the many-small-tensors path (one stack per shape) give the
    sum of squares of every weight, against a float64 computation here."""
    g = torch.Generator().manual_seed(0)
    many = [torch.randn(4, 3, generator=g) for _ in range(1200)] + [torch.randn(7, generator=g)]
    want = sum(float(t.double().square().sum()) for t in many)
    groups = shape_groups(many)
    assert groups is not None
    assert math.isclose(float(weight_fingerprint(many, groups)), want, rel_tol=1e-6)
    assert math.isclose(float(weight_fingerprint(many)), want, rel_tol=1e-6)
    half = [t.bfloat16() for t in many[:50]]  # upcast: bf16 norms would be good to 3 digits only
    assert math.isclose(float(weight_fingerprint(half)), sum(float(t.double().square().sum()) for t in half), rel_tol=1e-6)
