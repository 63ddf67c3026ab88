"""``batch_stats`` (the batch's labels: balance, size, tokens) and ``train`` (loss and accuracy).

Runs in: the worker (or inline in sync mode), from the labels and outputs the hook copied
into the slot; labels too big to copy are counted in the hook, which then pickles a
bounded summary (``label_counts(top=...)``) into the slot's header; under DDP from the
label-count vector all_reduced over ranks (count_vector, the one collective telemetry
runs, in the hook at collection steps only).

``batch_stats`` is a flat dict of numbers in one of two layouts:

- classes (largest label id + 1 <= MANY_CLASSES): ``<label>_<cls>_pct`` for every class
  0..n-1 seen so far, and ``batch_size`` (rows); plus ``tokens`` and ``ignored_pct`` when
  the labels are per element (more than one per row: token classification) or some are
  ignored;
- many classes (a vocabulary: token ids): ``batch_size``, ``tokens``, ``ignored_pct``,
  ``distinct_labels`` and the TOP_LABELS largest shares as ``<label>_<id>_pct`` (under
  DDP with ids past the count vector: ``distinct_labels`` null and no shares).

Labels < 0 are ignored, never counted as a class: -100 is the ignore index of torch's
cross_entropy and of Hugging Face's collators (padding, prompt tokens). Shares are of the
counted labels (``tokens``); ``ignored_pct`` is of every label element.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .api import Metric, MetricResult, RunInfo, SnapshotData
from .holdout import predictions_from_logits

# Above this many classes the labels are a vocabulary: one share per class would be a key
# per token id (50,257 for GPT-2: a 1 MB record), and the shares of thousands of ids say
# less than the few largest and their count. 64 keeps every share of the classification
# sets people plot class by class (MNIST, CIFAR-10, a few dozen intents).
MANY_CLASSES = 64
TOP_LABELS = 5  # largest shares written for many-class labels

# The vector of the DDP batch-stats all_reduce (int64, summed over ranks): the count of
# each class 0..MAX_CLASSES-1, then the rows, the "this rank could not say" counts, and
# the token counts. Token labels under DDP: ``tokens`` and ``ignored_pct`` of the global
# batch always; the class shares and distinct_labels only while every id is below
# MAX_CLASSES (a character vocabulary, say), since a 50k-id histogram per collection is
# an all_reduce of 400 KB for five numbers.
MAX_CLASSES = 1024
_ROWS = MAX_CLASSES  # batch rows: the sum is the global batch size
_NO_SIZE = MAX_CLASSES + 1  # ranks whose batch size is unknown (> 0: batch_size None)
_UNCOUNTED = MAX_CLASSES + 2  # ranks without labels or with labels that are not class ids
_TOKENS = MAX_CLASSES + 3  # label elements counted (ids >= 0)
_IGNORED = MAX_CLASSES + 4  # label elements < 0 (-100, padding)
_BEYOND = MAX_CLASSES + 5  # ranks with ids >= MAX_CLASSES (> 0: no class shares)
_PER_ELEMENT = MAX_CLASSES + 6  # ranks with more than one label per row
COUNT_VECTOR_LEN = MAX_CLASSES + 7


class LabelCounts(dict[int, int]):
    """A batch's count of each label id >= 0 (id -> count), and what the counts alone do not say.

    A dict, so a metric reading ``snap.label_counts`` sees the counts. ``tokens``: label
    elements counted (ids >= 0); ``ignored``: elements < 0; ``distinct``: ids present (more
    than ``len(self)`` when only the largest counts were kept); ``num_classes``: largest
    id + 1; ``per_element``: more than one label per row (token labels); ``known``: False
    when the ids are unknown (DDP, ids beyond the count vector): then only ``tokens`` and
    ``ignored`` hold; ``name``: the label name of the batch format the hook resolved.
    """

    def __init__(self, counts: Mapping[int, int] | Iterable[tuple[int, int]] = (), *, ignored: int = 0,
                 per_element: bool = False, tokens: int | None = None, distinct: int | None = None,
                 num_classes: int | None = None, known: bool = True, name: str | None = None) -> None:
        super().__init__(counts)
        self.tokens = sum(self.values()) if tokens is None else tokens
        self.ignored = ignored
        self.distinct = len(self) if distinct is None else distinct
        self.num_classes = max(self, default=-1) + 1 if num_classes is None else num_classes
        self.per_element = per_element
        self.known = known
        self.name = name

    def __repr__(self) -> str:
        return (f"LabelCounts({dict.__repr__(self)}, tokens={self.tokens}, ignored={self.ignored}, "
                f"distinct={self.distinct}, num_classes={self.num_classes}, per_element={self.per_element}, "
                f"known={self.known}, name={self.name!r})")


def label_counts(labels: torch.Tensor, *, top: int | None = None) -> LabelCounts | None:
    """Counts of the label ids >= 0 in a CPU label tensor, the rest as ignored; None if labels are not class ids.

    ``top``: for many-class labels keep only the ``top`` largest counts, largest first
    (ties: smaller id first), for a summary of bounded size; ``tokens``, ``distinct`` and ``num_classes``
    still describe the whole batch.
    """
    per_element = labels.dim() > 1 and labels.numel() > labels.shape[0]
    flat = labels.detach().reshape(-1)
    if flat.is_floating_point():
        rounded = flat.round()
        if not torch.equal(rounded, flat):
            return None  # regression targets or soft labels: no class balance to report
        flat = rounded
    flat = flat.to(torch.int64)
    if flat.numel() == 0:
        return LabelCounts(per_element=per_element)
    counted = flat[flat >= 0] if int(flat.min()) < 0 else flat  # the mask copy is the slowest step: only when needed
    ignored = flat.numel() - counted.numel()
    if counted.numel() == 0:
        return LabelCounts(ignored=ignored, per_element=per_element)
    num_classes = int(counted.max()) + 1
    if num_classes <= max(4 * counted.numel(), 1 << 16):
        # O(ids + classes): 5x faster than unique's sort for a batch of a 50k vocabulary
        hist = torch.bincount(counted, minlength=num_classes)
        ids = hist.nonzero().reshape(-1)  # ascending
        n = hist[ids]
    else:  # few ids spread far apart (hashed ids): a histogram would be mostly zeros
        ids, n = torch.unique(counted, return_counts=True)  # ids ascending
    distinct = int(ids.numel())
    if top is not None and num_classes > MANY_CLASSES and distinct > top:
        key = n * num_classes + (num_classes - 1 - ids)  # count first, then the smaller id: one order for topk
        order = torch.topk(key, top).indices
        ids, n = ids[order], n[order]
    return LabelCounts(zip(ids.tolist(), n.tolist(), strict=True), ignored=ignored, per_element=per_element,
                       tokens=int(counted.numel()), distinct=distinct, num_classes=num_classes)


def top_labels(counts: Mapping[int, int], k: int) -> list[tuple[int, int]]:
    """The ``k`` largest (id, count) pairs, largest first; ties: smaller id first."""
    return heapq.nsmallest(k, counts.items(), key=lambda item: (-item[1], item[0]))


def batch_label_stats(
    counts: Mapping[int, int] | None, batch_size: int | None, label_name: str, num_classes: int
) -> dict[str, float | int | None]:
    """One batch's ``batch_stats`` in the layout of the module docstring.

    ``num_classes``: classes 0..num_classes-1 get a share even when this batch has none
    (the holdout's classes, those seen before); above MANY_CLASSES the many-class layout.
    """
    if counts is None:
        return {"batch_size": batch_size}
    summary = counts if isinstance(counts, LabelCounts) else LabelCounts(counts)
    tokens, elements = summary.tokens, summary.tokens + summary.ignored
    ignored_pct = 100.0 * summary.ignored / elements if elements else None
    out: dict[str, float | int | None] = {}
    if max(num_classes, summary.num_classes) > MANY_CLASSES:
        # distinct_labels is always there (null when unknown): its presence marks the layout
        out.update(batch_size=batch_size, tokens=tokens, ignored_pct=ignored_pct,
                   distinct_labels=summary.distinct if summary.known else None)
        if summary.known:
            for cls, n in top_labels(summary, TOP_LABELS):
                out[f"{label_name}_{cls}_pct"] = 100.0 * n / tokens
        return out
    for cls in range(max(num_classes, summary.num_classes)):
        out[f"{label_name}_{cls}_pct"] = 100.0 * summary.get(cls, 0) / tokens if tokens else None
    out["batch_size"] = batch_size
    if summary.per_element or summary.ignored:
        out.update(tokens=tokens, ignored_pct=ignored_pct)
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
        vec[_PER_ELEMENT] = int(labels.dim() > 1 and labels.numel() > labels.shape[0])  # shapes: no sync
        flat = labels.detach().reshape(-1).to(device)  # a copy (and a sync) only if devices differ
        integral = flat == flat.round() if flat.is_floating_point() else torch.ones_like(flat, dtype=torch.bool)
        counted = integral & (flat >= 0)
        in_vector = counted & (flat < MAX_CLASSES)
        classes = torch.where(in_vector, flat, torch.zeros_like(flat)).to(torch.int64)
        vec[:MAX_CLASSES].index_add_(0, classes, in_vector.to(torch.int64))
        # tensor assignments from here on: they stay on the device
        vec[_TOKENS] = counted.sum()
        vec[_IGNORED] = (integral & (flat < 0)).sum()
        vec[_BEYOND] = (counted & ~in_vector).any()
        vec[_UNCOUNTED] = (~integral).any()  # regression targets are not classes
    except Exception:  # odd labels: this rank still joins the collective, as "uncounted"
        vec[:MAX_CLASSES].zero_()
        vec[_UNCOUNTED] = 1
    return vec


def unpack_count_vector(values: Sequence[int]) -> tuple[LabelCounts | None, int | None]:
    """(label counts, batch size) of the global batch from the all_reduced vector."""
    size = None if values[_NO_SIZE] else values[_ROWS]
    if values[_UNCOUNTED]:
        return None, size
    ignored, per_element = values[_IGNORED], bool(values[_PER_ELEMENT])
    if values[_BEYOND]:  # a vocabulary: the global tokens and ignored share, no class shares
        return LabelCounts(ignored=ignored, per_element=per_element, tokens=values[_TOKENS],
                           num_classes=MAX_CLASSES + 1, known=False), size
    counts = {c: n for c, n in enumerate(values[:MAX_CLASSES]) if n}
    return LabelCounts(counts, ignored=ignored, per_element=per_element), size


def batch_accuracy(outputs: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """Fraction of labels >= 0 predicted right, as a 0-d tensor (no sync: stays on the device).

    NaN when every label is ignored. ``shift``: the labels are the model's inputs (a Hugging
    Face causal LM shifts them inside its forward), so the logits at position t are scored
    against the label at t + 1: ``logits[:, :-1]`` against ``labels[:, 1:]``.
    """
    logits, target = outputs.detach(), labels.detach()
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    preds = predictions_from_logits(logits)
    target = target.reshape(preds.shape)
    scored = target >= 0  # -100 and padding are not predictions to score
    correct = (preds == target.to(preds.dtype)) & scored
    return correct.sum() / scored.sum()  # true division: 0 / 0 is NaN, not an error (and no sync)


class BatchStats(Metric):
    """The batch's label shares and size (layouts in the module docstring)."""

    key = "batch_stats"
    needs = frozenset({"batch"})

    def __init__(self) -> None:
        self.num_classes = 0  # largest class id + 1 seen so far: the classes every record lists
        self.label_name = "label"

    def setup(self, run: RunInfo) -> None:
        self.num_classes = run.num_classes
        self.label_name = run.label_name

    def compute(self, snap: SnapshotData) -> MetricResult:
        counts, size = snap.label_counts, snap.batch_size
        if counts is None and size is None:
            return None
        name = self.label_name
        if isinstance(counts, LabelCounts):
            name = counts.name or name  # the format of the batch itself, not the holdout's or the config's
            self.num_classes = max(self.num_classes, counts.num_classes)
        elif counts:
            self.num_classes = max(self.num_classes, max(counts) + 1)
        return batch_label_stats(counts, size, name, self.num_classes)


class TrainStats(Metric):
    """{loss, accuracy} of the training step, from the hook's ``loss`` / ``outputs``."""

    key = "train"
    needs = frozenset({"loss", "batch"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        if snap.loss is None and snap.train_accuracy is None:
            return None
        return {"loss": snap.loss, "accuracy": snap.train_accuracy}
