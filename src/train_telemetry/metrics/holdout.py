"""``holdout_logits``: the model's predictions on the fixed holdout at the snapshot's weights.

Runs in: the worker (or inline on the training thread). The forward itself
(``evaluate_holdout``) is run once per snapshot by the record builder, on first use, and
shared by every metric that reads ``snap.holdout`` (this one, and ``activations`` through
its forward hooks).

Two kinds of labels, told apart by their shape (``records.HoldoutLogits``):

- one label per example (a classifier): logits, labels, predictions, accuracy and loss;
- a sequence of labels per example (tokens ``[B, T]``: a GPT, a Hugging Face causal or
  masked LM): per-token loss and accuracy, perplexity, and each sequence's mean loss and
  accuracy (so the same examples can be followed from record to record). The ``B x T x V``
  logits never leave the chunk they were computed in. Labels < 0 (-100, padding) are not
  scored. Which positions are scored is recorded as ``scored``:

  ``all``      logits ``[B, T, V]`` (or ``[B*T, V]``) for labels ``[B, T]``, position by position;
  ``shifted``  the labels are the inputs (a Hugging Face causal LM, which shifts them itself):
               logits at t predict the label at t + 1;
  ``last``     the model returned fewer positions than there are labels (nanoGPT's
               ``forward(idx)`` returns only the last one): those last positions are scored.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..batches import labels_are_inputs, logits_of
from .api import Metric, MetricResult, SnapshotData

# Keyword names under which a model's forward takes the targets and then returns the
# logits of every position (nanoGPT's ``forward(idx, targets=None)``; without them it
# returns only the last position's).
TARGET_KWARGS = ("targets", "target")
# Label positions per holdout forward for sequence labels: about one training micro-batch
# (8 x 512), so the chunk's [positions, vocabulary] logits (0.8 GB in float32 at GPT-2's
# 50,257) stay within what training itself allocates.
TOKENS_PER_CHUNK = 4096


def predictions_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions: argmax over the last dim, or ``logit > 0`` for one binary logit."""
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        return logits.argmax(dim=-1)
    return (logits.reshape(logits.shape[0], -1)[:, 0] > 0).to(torch.int64)


@contextlib.contextmanager
def plain_numerics() -> Iterator[None]:
    """No grad and no autocast, whatever the caller's context: a record never depends on it.

    Inline (on the training thread) the hook may run inside the user's ``torch.autocast``
    block; the worker has no such context. Under autocast the holdout logits would come out
    in bf16/fp16 there and float32 here.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def is_sequence_labels(labels: Any) -> bool:
    """Integer labels with more than one per example (``[B, T]``): tokens, not classes."""
    return (isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] > 1
            and not labels.is_floating_point() and labels.dtype != torch.bool)


def evaluate_holdout(
    model: torch.nn.Module,
    holdout: Any,
    labels: torch.Tensor,
    forward: Callable[[torch.nn.Module, Any], torch.Tensor],
    slice_batch: Callable[[Any, int, int], Any],
    eval_batch_size: int,
) -> dict[str, Any]:
    """Eval-mode, no-grad, autocast-off forward on the holdout, in chunks of ``eval_batch_size`` rows.

    ``model`` must be the worker's (or the inline builder's) own model on the slot: this
    flips it to eval mode. ``forward(model, batch) -> logits`` (a :class:`HoldoutForward`,
    whose ``shift_labels`` says the labels are the inputs); ``slice_batch(batch, start, stop)``.
    """
    n = int(labels.shape[0])
    model.eval()
    with plain_numerics():
        if is_sequence_labels(labels):
            return _evaluate_tokens(model, holdout, labels, forward, slice_batch, eval_batch_size)
        chunks = [forward(model, slice_batch(holdout, start, start + eval_batch_size)).detach().float().cpu()
                  for start in range(0, n, eval_batch_size)]
    logits = torch.cat(chunks)
    preds = predictions_from_logits(logits)
    flat = labels.reshape(-1)
    target = (flat.round() if flat.is_floating_point() else flat).to(torch.int64)
    # An exact fraction (9/20 is 0.45), not a float32 mean (0.44999998807907104).
    accuracy = int((preds == target).sum()) / n if n else None
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        loss = float(F.cross_entropy(logits.reshape(n, -1), target))
    else:
        loss = float(F.binary_cross_entropy_with_logits(logits.reshape(n, -1)[:, 0], target.float()))
    return {
        "logits": logits.tolist(),
        "labels": target.tolist(),
        "predictions": preds.tolist(),
        "accuracy": accuracy,
        "loss": loss,
    }


def _evaluate_tokens(model: torch.nn.Module, holdout: Any, labels: torch.Tensor,
                     forward: Callable[[torch.nn.Module, Any], torch.Tensor],
                     slice_batch: Callable[[Any, int, int], Any], eval_batch_size: int) -> dict[str, Any]:
    """Sequence labels: per-token and per-sequence loss and accuracy, chunk by chunk.

    A chunk holds at most TOKENS_PER_CHUNK label positions (and eval_batch_size rows): its
    logits are positions x vocabulary, and the default 50-row holdout of 1,024-token GPT-2
    sequences would otherwise be one 10 GB float32 tensor in the worker.
    """
    shift = bool(getattr(forward, "shift_labels", False))
    rows = max(1, min(eval_batch_size, TOKENS_PER_CHUNK // max(1, labels[0].numel())))
    loss_sums, correct, counts = [], [], []
    scored = "all"
    for start in range(0, int(labels.shape[0]), rows):
        part = slice_batch(holdout, start, start + rows)
        logits = forward(model, part).detach()
        target = labels[start : start + rows]
        loss_sum, right, count, scored = score_tokens(logits, target.to(logits.device), shift)
        loss_sums.append(loss_sum.cpu())
        correct.append(right.cpu())
        counts.append(count.cpu())
    loss_sum, right, count = torch.cat(loss_sums), torch.cat(correct), torch.cat(counts)
    tokens = int(count.sum())
    loss = float(loss_sum.sum()) / tokens if tokens else None
    counts_list = count.tolist()
    return {
        "loss": loss,
        "accuracy": int(right.sum()) / tokens if tokens else None,
        "perplexity": _exp(loss),
        "tokens": tokens,
        "example_loss": [s / c if c else None for s, c in zip(loss_sum.tolist(), counts_list, strict=True)],
        "example_accuracy": [r / c if c else None for r, c in zip(right.tolist(), counts_list, strict=True)],
        "scored": scored,
    }


def score_tokens(logits: torch.Tensor, labels: torch.Tensor,
                 shift: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Per sequence: (summed token loss float64, correct tokens, scored tokens, which positions).

    ``logits`` ``[b, T', V]`` or ``[b*T, V]``; ``labels`` ``[b, T, ...]`` (trailing dims
    flattened into T). Labels < 0 are not scored.
    """
    b = int(labels.shape[0])
    labels = labels.reshape(b, -1)
    t = int(labels.shape[1])
    if logits.dim() == 2 and logits.shape[0] == b * t:  # a forward_fn that flattened the positions
        logits = logits.reshape(b, t, -1)
    if logits.dim() != 3 or logits.shape[0] != b:
        raise ValueError(
            f"the holdout labels are sequences {list(labels.shape)} but the model returned logits of shape "
            f"{list(logits.shape)}: return [batch, positions, vocab] (or [batch * positions, vocab]) logits, "
            "e.g. with forward_fn=lambda model, batch: model(batch[0])")
    positions = int(logits.shape[1])
    if positions == t:
        scored = "shifted" if shift else "all"
        if shift:  # position i predicts label i + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
    elif positions < t:
        scored = "last"
        labels = labels[:, t - positions :]
    else:
        raise ValueError(f"the model returned {positions} positions for {t} labels per example")
    target = labels.to(torch.int64)
    valid = target >= 0
    vocab = int(logits.shape[-1])
    token_loss = F.cross_entropy(logits.float().reshape(-1, vocab), target.clamp(min=0).reshape(-1),
                                 reduction="none").reshape(target.shape)
    loss_sum = torch.where(valid, token_loss, torch.zeros_like(token_loss)).double().sum(dim=1)
    right = ((logits.argmax(dim=-1) == target) & valid).sum(dim=1)
    return loss_sum, right, valid.sum(dim=1), scored


def _exp(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class HoldoutLogits(Metric):
    key = "holdout_logits"
    needs = frozenset({"holdout"})

    def compute(self, snap: SnapshotData) -> MetricResult:
        return snap.holdout


class HoldoutForward:
    """``forward(model, batch) -> logits`` for the holdout: the user's forward_fn, or the batch
    format's call (batches.BatchFormat), then the logits of whatever the model returned.

    ``shift_labels``: the holdout's labels are its inputs (a Hugging Face causal LM shifts
    them inside the model); ``target_kwarg``: sequence labels are passed to the model under
    this keyword, so that it returns every position's logits (nanoGPT's ``targets``).
    Built in the training process at start() and pickled with the worker's setup.
    """

    def __init__(self, batch_format: Any, forward_fn: Callable[[torch.nn.Module, Any], Any] | None,
                 shift_labels: bool = False, target_kwarg: str | None = None) -> None:
        self.batch_format = batch_format
        self.forward_fn = forward_fn
        self.shift_labels = shift_labels
        self.target_kwarg = target_kwarg

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if self.forward_fn is not None:
            out = self.forward_fn(model, batch)
        elif self.target_kwarg is not None:
            fmt = self.batch_format
            out = model(*[batch[k] for k in fmt.input_keys], **{self.target_kwarg: fmt.labels(batch)})
        else:
            out = self.batch_format.call(model, batch)
        return logits_of(out)

    @classmethod
    def for_model(cls, model: torch.nn.Module, holdout: Any, batch_format: Any,
                  forward_fn: Callable[[torch.nn.Module, Any], Any] | None) -> HoldoutForward:
        """The forward for ``model`` on ``holdout``: whether its labels are shifted inputs, and
        whether the model takes sequence targets by keyword (decided once, at start())."""
        labels = batch_format.labels(holdout) if batch_format is not None else None
        if not is_sequence_labels(labels):
            return cls(batch_format, forward_fn)
        assert isinstance(labels, torch.Tensor)
        shift = labels_are_inputs(holdout, labels)
        target_kwarg = None
        if forward_fn is None and batch_format.call_style == "args" and not shift:
            target_kwarg = _target_kwarg(model)
        return cls(batch_format, forward_fn, shift_labels=shift, target_kwarg=target_kwarg)


def _target_kwarg(model: torch.nn.Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in TARGET_KWARGS if name in params), None)
