"""``batch_stats`` (the batch's label balance and size) and ``train`` (loss and accuracy).

Runs in: the worker (or inline in sync mode), from the labels and outputs the hook copied
into the slot; under DDP from the label-count vector all_reduced over ranks (count_vector,
the one collective telemetry runs, in the hook at collection steps only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .api import Metric, MetricResult, RunInfo, SnapshotData
from .holdout import predictions_from_logits

# The vector of the DDP batch-stats all_reduce (int64, summed over ranks): the count of
# each class 0..MAX_CLASSES-1, then the rows, then two "this rank could not say" counts.
MAX_CLASSES = 1024
COUNT_VECTOR_LEN = MAX_CLASSES + 3
_ROWS = MAX_CLASSES  # batch rows: the sum is the global batch size
_NO_SIZE = MAX_CLASSES + 1  # ranks whose batch size is unknown (> 0: batch_size None)
_UNCOUNTED = MAX_CLASSES + 2  # ranks without labels or with labels that are not class ids


def label_counts(labels: torch.Tensor) -> dict[int, int] | None:
    """Count of each integer class in a CPU label tensor; None if labels are not classes."""
    flat = labels.detach().reshape(-1)
    if flat.numel() == 0:
        return {}
    if flat.is_floating_point():
        rounded = flat.round()
        if not torch.equal(rounded, flat):
            return None  # regression targets or soft labels: no class balance to report
        flat = rounded
    flat = flat.to(torch.int64)
    if int(flat.min()) < 0:
        return None
    counts = torch.bincount(flat).tolist()
    return {cls: n for cls, n in enumerate(counts) if n}


def batch_label_stats(
    counts: Mapping[int, int] | None, batch_size: int | None, label_name: str, num_classes: int
) -> dict[str, float | int | None]:
    """{<label_name>_<class>_pct for class in 0..num_classes-1, batch_size}."""
    out: dict[str, float | int | None] = {}
    if counts is not None:
        total = sum(counts.values())
        classes = max(num_classes, max(counts, default=-1) + 1)
        for cls in range(classes):
            out[f"{label_name}_{cls}_pct"] = 100.0 * counts.get(cls, 0) / total if total else None
    out["batch_size"] = batch_size
    return out


def count_vector(labels: Any, batch_size: int | None, device: torch.device) -> torch.Tensor:
    """This rank's share of the global batch statistics; never raises, no sync on CUDA."""
    vec = torch.zeros(COUNT_VECTOR_LEN, dtype=torch.int64, device=device)
    vec[_NO_SIZE] = 1  # "unknown" until shown otherwise
    vec[_UNCOUNTED] = 1
    if batch_size is not None:
        vec[_ROWS] = batch_size
        vec[_NO_SIZE] = 0
    try:
        if labels is None:
            return vec
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        flat = labels.detach().reshape(-1).to(device)  # a copy (and a sync) only if devices differ
        valid = (flat >= 0) & (flat < MAX_CLASSES)
        if flat.is_floating_point():
            valid &= flat == flat.round()  # regression targets are not classes
        classes = torch.where(valid, flat, torch.zeros_like(flat)).to(torch.int64)
        vec[:MAX_CLASSES].index_add_(0, classes, valid.to(torch.int64))
        vec[_UNCOUNTED] = (~valid).any()  # a tensor assignment: stays on the device
    except Exception:  # odd labels: this rank still joins the collective, as "uncounted"
        vec[:MAX_CLASSES].zero_()
        vec[_UNCOUNTED] = 1
    return vec


def unpack_count_vector(values: Sequence[int]) -> tuple[dict[int, int] | None, int | None]:
    """(label counts, batch size) of the global batch from the all_reduced vector."""
    counts = None if values[_UNCOUNTED] else {c: n for c, n in enumerate(values[:MAX_CLASSES]) if n}
    size = None if values[_NO_SIZE] else values[_ROWS]
    return counts, size


def batch_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions as a 0-d tensor (no sync: stays on the device)."""
    preds = predictions_from_logits(outputs.detach())
    return (preds == labels.detach().reshape(preds.shape).to(preds.dtype)).float().mean()


class BatchStats(Metric):
    """{<label>_<class>_pct..., batch_size}; classes 0..n-1 for every n seen so far."""

    key = "batch_stats"
    needs = frozenset({"batch"})

    def __init__(self) -> None:
        self.num_classes = 0
        self.label_name = "label"

    def setup(self, run: RunInfo) -> None:
        self.num_classes = run.num_classes
        self.label_name = run.label_name

    def compute(self, snap: SnapshotData) -> MetricResult:
        counts, size = snap.label_counts, snap.batch_size
        if counts is None and size is None:
            return None
        if counts:
            self.num_classes = max(self.num_classes, max(counts) + 1)
        return batch_label_stats(counts, size, self.label_name, self.num_classes)


class TrainStats(Metric):
    """{loss, accuracy} of the training step, from the hook's ``loss`` / ``outputs``."""

    key = "train"
    needs = frozenset({"loss", "batch"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        if snap.loss is None and snap.train_accuracy is None:
            return None
        return {"loss": snap.loss, "accuracy": snap.train_accuracy}
