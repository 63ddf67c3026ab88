"""Helpers and thresholds that rules of more than one family share.

Runs in: any process that reads a run (no torch).

A helper used by one family's rules lives in that family's file, beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

from train_telemetry.analysis.load import Run, train_accuracy, train_loss
from train_telemetry.analysis.rules.base import Diagnosis, Evidence

# --- how much data a judgement needs -------------------------------------------------------
# A trend needs an "early" and a "late" part that do not overlap: with 3 records they are the
# first and the last one. Fewer records and the trend rules stay silent.
MIN_TREND_RECORDS = 3
# How many (step, values) points a diagnosis shows: enough to see the shape, short enough to read.
EVIDENCE_POINTS = 5

# --- is the model learning on its training batches? ----------------------------------------
# Train loss falling 10% (late third mean vs early third mean) or train accuracy rising 10
# points is learning; single-batch losses are noisy, hence the thirds and the margins.
TRAIN_LOSS_DROP = 0.10
TRAIN_ACC_RISE = 0.10
# ... but a falling loss with the train accuracy still within 10 points of chance is a loss
# recovering from divergence (the demo's 300x LR: 50 -> 0.69 = ln 2), not learning.
TRAIN_ACC_ABOVE_CHANCE = 0.10

T = TypeVar("T")


# The facts computed in the current diagnose() pass, by helper and run (see per_run).
_PASS: ContextVar[dict[tuple[Callable[[Run], Any], int], Any] | None] = ContextVar(
    "_PASS", default=None
)


@contextlib.contextmanager
def one_pass() -> Iterator[None]:
    """Within it, each :func:`per_run` helper computes once per run (diagnose() runs every
    rule inside one pass)."""
    token = _PASS.set({})
    try:
        yield
    finally:
        _PASS.reset(token)


def per_run(compute: Callable[[Run], T]) -> Callable[[Run], T]:
    """``compute(run)``, computed once per diagnose() pass and shared by the rules that judge
    the same facts (single_class_batches and data_imbalance the batches' class mix,
    overfitting and no_learning the holdout's trend), so that one rule per code costs no
    more than one judgement per family. What it returns is shared: read it, never change it.
    Outside a pass (a rule's check() called on its own) it computes every time, so a run
    changed between two passes (``watch``) is never judged on old facts.
    """

    @functools.wraps(compute)
    def once(run: Run) -> T:
        memo = _PASS.get()
        if memo is None:
            return compute(run)
        key = (compute, id(run))
        if key not in memo:
            memo[key] = compute(run)
        value: T = memo[key]
        return value

    return once


def thirds(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The first and the last third of ``values`` (at least one value each)."""
    k = max(1, len(values) // 3)
    return list(values[:k]), list(values[-k:])


def pick(items: Sequence[T], n: int = EVIDENCE_POINTS) -> list[T]:
    """Up to ``n`` items spread evenly, always the first and the last."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def train_trend(run: Run, chance: float | None = None) -> dict[str, Any]:
    """Whether the training batches show learning: early/late loss and accuracy, and the verdict.

    ``chance`` (the holdout's chance accuracy, same task) lets a falling loss count only
    when the train accuracy is clearly above it.
    """
    losses = [v for _, v in run.points(train_loss, finite=True)]
    accs = [v for _, v in run.points(train_accuracy, finite=True)]
    out: dict[str, Any] = {"improving": False, "known": False}
    if len(accs) >= MIN_TREND_RECORDS:
        early, late = thirds(accs)
        out.update(acc_early=statistics.fmean(early), acc_late=statistics.fmean(late), known=True)
        if out["acc_late"] - out["acc_early"] >= TRAIN_ACC_RISE:
            out["improving"] = True
    if len(losses) >= MIN_TREND_RECORDS:
        early, late = thirds(losses)
        out.update(loss_early=statistics.fmean(early), loss_late=statistics.fmean(late), known=True)
        above_chance = (
            chance is None
            or "acc_late" not in out
            or out["acc_late"] >= chance + TRAIN_ACC_ABOVE_CHANCE
        )
        if (
            out["loss_early"] > 0
            and out["loss_late"] <= out["loss_early"] * (1 - TRAIN_LOSS_DROP)
            and above_chance
        ):
            out["improving"] = True
    return out


# --- per-layer origin (the ``layers`` record key) ------------------------------------------


class LayerOrigin(NamedTuple):
    """The layer where a group's problem starts: the module, the step, the evidence values."""

    module: str
    step: int | None
    values: dict[str, Any]


def layer_series(run: Run, family: str, group: str) -> dict[str, list[tuple[int, float | None]]]:
    """{module: [(step, layers.<family>.<module>)]} in model order; the group's own modules
    (named ``<group>`` or ``<group>.*``) when there are any, since layers are not tagged by group."""
    out: dict[str, list[tuple[int, float | None]]] = {}
    for i, record in enumerate(run.records):
        for module, v in (record.layers or {}).get(family, {}).items():
            out.setdefault(module, []).append((run.step(i), v))
    own = {m: v for m, v in out.items() if m == group or m.startswith(group + ".")}
    return own or out


def with_layer(
    found: Diagnosis, origin: LayerOrigin | None, where: Callable[[LayerOrigin], str]
) -> Diagnosis:
    """``found`` naming the layer where it starts (``where`` words it), when the records
    carry ``layers`` (else ``origin`` is None and ``found`` stays as it is)."""
    if origin is None:
        return found
    return dataclasses.replace(
        found,
        title=f"{found.title}; {where(origin)}",
        evidence=[*found.evidence, Evidence(origin.step, origin.values)],
    )
