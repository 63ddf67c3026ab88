"""``holdout_logits``: the model's predictions on the fixed holdout at the snapshot's weights.

Runs in: the worker (or inline in sync mode). The forward itself (``evaluate_holdout``) is
run once per snapshot by the record builder, on first use, and shared by every metric
that reads ``snap.holdout`` (this one, and ``activations`` through its forward hooks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .api import Metric, MetricResult, SnapshotData


def predictions_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions: argmax over the last dim, or ``logit > 0`` for one binary logit."""
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        return logits.argmax(dim=-1)
    return (logits.reshape(logits.shape[0], -1)[:, 0] > 0).to(torch.int64)


def evaluate_holdout(
    model: torch.nn.Module,
    holdout: Any,
    labels: torch.Tensor,
    forward: Callable[[torch.nn.Module, Any], torch.Tensor],
    slice_batch: Callable[[Any, int, int], Any],
    eval_batch_size: int,
) -> dict[str, Any]:
    """Eval-mode, no-grad forward on the holdout: {logits, labels, predictions, accuracy, loss}.

    ``model`` must be the worker's (or sync mode's) own model on the slot: this flips it to
    eval mode. ``forward(model, batch) -> logits``; ``slice_batch(batch, start, stop)``.
    """
    n = int(labels.shape[0])
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, n, eval_batch_size):
            out = forward(model, slice_batch(holdout, start, start + eval_batch_size))
            chunks.append(out.detach().float().cpu())
    logits = torch.cat(chunks)
    preds = predictions_from_logits(logits)
    flat = labels.reshape(-1)
    target = (flat.round() if flat.is_floating_point() else flat).to(torch.int64)
    accuracy = float((preds == target).float().mean()) if n else None
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        loss = float(torch.nn.functional.cross_entropy(logits.reshape(n, -1), target))
    else:
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.reshape(n, -1)[:, 0], target.float()))
    return {
        "logits": logits.tolist(),
        "labels": target.tolist(),
        "predictions": preds.tolist(),
        "accuracy": accuracy,
        "loss": loss,
    }


class HoldoutLogits(Metric):
    key = "holdout_logits"
    needs = frozenset({"holdout"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        return snap.holdout


class HoldoutForward:
    """``forward(model, batch) -> logits`` for the holdout: the user's forward_fn, or the batch
    format's call (batches.BatchFormat), then the logits of whatever the model returned.

    Built in the training process at start() and pickled with the worker's setup.
    """

    def __init__(self, batch_format: Any, forward_fn: Callable[[torch.nn.Module, Any], Any] | None) -> None:
        self.batch_format = batch_format
        self.forward_fn = forward_fn

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        from ..batches import logits_of

        out = self.forward_fn(model, batch) if self.forward_fn is not None else self.batch_format.call(model, batch)
        return logits_of(out)
