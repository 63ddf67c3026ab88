"""The metric computations: pure functions from snapshot data to record fields.

Runs in: the worker process (mode=async) or the training process (mode=sync); both go
through these same functions, so the two modes write the same records.

Group sums are done in float64 Python arithmetic over per-tensor norms, so an overall
norm agrees with ``torch.nn.utils.get_total_norm`` to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "OVERALL",
    "combine_norms",
    "tensor_norms",
    "weight_delta_norms",
    "update_ratios",
    "learning_rate_dict",
    "label_counts",
    "batch_label_stats",
    "evaluate_holdout",
    "batch_accuracy",
    "count_vector",
    "unpack_count_vector",
    "nonfinite_keys",
]

OVERALL = "overall"


def combine_norms(
    per_tensor: Sequence[float | None], group_of: Sequence[int], group_names: Sequence[str]
) -> dict[str, float | None]:
    """{overall, <group>...}: the L2 norm over each group's tensors from per-tensor norms.

    A ``None`` entry (e.g. a parameter without a gradient) is left out; a group all of
    whose entries are ``None`` gets ``None`` (not 0.0: "no gradient" is not "zero gradient").
    ``group_of[i] < 0`` means the tensor belongs to no group; it still counts in ``overall``.
    """
    sums = [0.0] * len(group_names)
    seen = [False] * len(group_names)
    total = 0.0
    any_seen = False
    for norm, group in zip(per_tensor, group_of, strict=True):
        if norm is None:
            continue
        sq = norm * norm
        total += sq
        any_seen = True
        if group >= 0:
            sums[group] += sq
            seen[group] = True
    out: dict[str, float | None] = {OVERALL: math.sqrt(total) if any_seen else None}
    for name, s, ok in zip(group_names, sums, seen, strict=True):
        out[name] = math.sqrt(s) if ok else None
    return out


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """L2 norm of each tensor, in one fused call."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(list(tensors))).tolist()


_DELTA_CHUNK = 1 << 20  # elements: bounds the temporary difference to 4 MiB (float32)


def weight_delta_norms(current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    """||current_i - reference_i|| for each parameter tensor.

    Chunked, so the worker never holds a second copy of the weights as a difference
    (a one-shot _foreach_sub of a 25M-parameter model costs 96 MiB more at peak).
    """
    out = []
    for cur, ref in zip(current, reference, strict=True):
        flat_cur, flat_ref = cur.reshape(-1), ref.reshape(-1)
        sq = 0.0
        for start in range(0, flat_cur.numel(), _DELTA_CHUNK):
            part = flat_cur[start : start + _DELTA_CHUNK] - flat_ref[start : start + _DELTA_CHUNK]
            sq += float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
        out.append(math.sqrt(sq))
    return out


def update_ratios(
    delta: Mapping[str, float | None], reference_norm: Mapping[str, float | None]
) -> dict[str, float | None]:
    """delta / ||reference weights|| per key; None where either is missing or the norm is 0."""
    out: dict[str, float | None] = {}
    for key, d in delta.items():
        ref = reference_norm.get(key)
        out[key] = d / ref if d is not None and ref else None
    return out


def learning_rate_dict(lrs: Sequence[float], group_names: Sequence[str]) -> dict[str, float]:
    """{group_0.., <name>...}: the seed's layout, by index and by the group's name."""
    out: dict[str, float] = {}
    for i, lr in enumerate(lrs):
        out[f"group_{i}"] = lr
    for name, lr in zip(group_names, lrs, strict=False):
        out[name] = lr
    return out


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
    counts: Mapping[int, int] | None, batch_size: int | None, label_key: str, num_classes: int
) -> dict[str, float | int | None]:
    """{<label_key>_<class>_pct for class in 0..num_classes-1, batch_size}."""
    out: dict[str, float | int | None] = {}
    if counts is not None:
        total = sum(counts.values())
        classes = max(num_classes, max(counts, default=-1) + 1)
        for cls in range(classes):
            out[f"{label_key}_{cls}_pct"] = 100.0 * counts.get(cls, 0) / total if total else None
    out["batch_size"] = batch_size
    return out


# The vector of the DDP batch-stats all_reduce (int64, summed over ranks): the count of
# each class 0..MAX_CLASSES-1, then the rows, then two "this rank could not say" counts.
MAX_CLASSES = 1024
COUNT_VECTOR_LEN = MAX_CLASSES + 3
_ROWS = MAX_CLASSES  # batch rows: the sum is the global batch size
_NO_SIZE = MAX_CLASSES + 1  # ranks whose batch size is unknown (> 0: batch_size None)
_UNCOUNTED = MAX_CLASSES + 2  # ranks without labels or with labels that are not class ids


def count_vector(batch: Mapping[str, Any] | None, label_key: str, input_keys: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """This rank's share of the global batch statistics; never raises, no sync on CUDA."""
    vec = torch.zeros(COUNT_VECTOR_LEN, dtype=torch.int64, device=device)
    vec[_NO_SIZE] = 1  # "unknown" until shown otherwise
    vec[_UNCOUNTED] = 1
    try:
        size = batch_size_of(batch, label_key, input_keys) if batch is not None else None
        if size is not None:
            vec[_ROWS] = size
            vec[_NO_SIZE] = 0
    except Exception:
        pass
    try:
        labels = batch.get(label_key) if batch is not None else None
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


def batch_size_of(batch: Mapping[str, Any], label_key: str, input_keys: Sequence[str]) -> int | None:
    """Rows of the batch: the first dim of its labels or first input; None if it has neither."""
    for key in (label_key, *input_keys):
        v = batch.get(key)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


def batch_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions as a 0-d tensor (no sync: stays on the device)."""
    preds = predictions_from_logits(outputs.detach())
    return (preds == labels.detach().reshape(preds.shape).to(preds.dtype)).float().mean()


def predictions_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions: argmax over the last dim, or ``logit > 0`` for one binary logit."""
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        return logits.argmax(dim=-1)
    return (logits.reshape(logits.shape[0], -1)[:, 0] > 0).to(torch.int64)


def evaluate_holdout(
    model: torch.nn.Module,
    holdout: Mapping[str, Any],
    input_keys: Sequence[str],
    label_key: str,
    forward_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None,
    eval_batch_size: int,
) -> dict[str, Any]:
    """Eval-mode, no-grad forward on the holdout: {logits, labels, predictions, accuracy, loss}.

    ``model`` must be the worker's (or sync mode's) own copy: this flips it to eval mode.
    """
    labels = holdout[label_key]
    n = int(labels.shape[0])
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, n, eval_batch_size):
            part = {k: _slice(v, start, start + eval_batch_size) for k, v in holdout.items()}
            if forward_fn is not None:
                out = forward_fn(model, part)
            else:
                out = model(*[part[k] for k in input_keys])
            if isinstance(out, (tuple, list)):
                out = out[0]
            chunks.append(out.detach().float().cpu())
    logits = torch.cat(chunks)
    preds = predictions_from_logits(logits)
    target = labels.reshape(-1).to(torch.int64) if not labels.is_floating_point() else labels.reshape(-1).round().to(torch.int64)
    accuracy = float((preds == target).float().mean()) if n else None
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        loss = float(torch.nn.functional.cross_entropy(logits, target))
    else:
        loss = float(
            torch.nn.functional.binary_cross_entropy_with_logits(
                logits.reshape(n, -1)[:, 0], target.float()
            )
        )
    return {
        "logits": logits.tolist(),
        "labels": target.tolist(),
        "predictions": preds.tolist(),
        "accuracy": accuracy,
        "loss": loss,
    }


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, (torch.Tensor, list, tuple)):
        return value[start:stop]
    return value


def nonfinite_keys(record: Mapping[str, Any]) -> list[str]:
    """"family.key" for each non-finite float among the record's per-group metric families."""
    found: list[str] = []
    for family in ("gradient_norm", "weight_delta", "weight_norm", "update_ratio", "learning_rates"):
        values = record.get(family)
        if not isinstance(values, dict):
            continue
        for key, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                found.append(f"{family}.{key}")
    train = record.get("train")
    if isinstance(train, dict):
        for key, v in train.items():
            if isinstance(v, float) and not math.isfinite(v):
                found.append(f"train.{key}")
    holdout = record.get("holdout_logits")
    if isinstance(holdout, dict):
        v = holdout.get("loss")
        if isinstance(v, float) and not math.isfinite(v):
            found.append("holdout_logits.loss")
    return found
