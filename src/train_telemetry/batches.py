"""Batches of every common shape: which parts feed the model and which are the labels.

Runs in: both processes. The training process resolves a :class:`BatchFormat` once per
batch structure (the hook's labels and batch size, the holdout at ``set_holdout_data``);
the format is pickled with the holdout and the worker uses it to feed the eval model.

Shapes, tried in this order:

1. the configured ``input_keys`` / ``label_key`` are all present: a mapping's keys
   (``model(*[batch[k] for k in input_keys])``, the seed's call) or a tuple's positions;
2. only while those keys are left at the seed's defaults, the batch's shape:
   ``(x, y)`` -> ``model(x)``; ``(x1, ..., xn, y)`` -> ``model(x1, ..., xn)``; a Hugging
   Face dict (``input_ids`` / ``attention_mask`` / ``pixel_values`` / ``inputs_embeds``
   with ``labels``) -> ``model(**everything_but_labels)``; a mapping with exactly one
   label-like key (``label``, ``labels``, ``target``, ``targets``, ``y``, ``winner``) ->
   ``model(*its other tensors, in key order)``;
3. anything else raises :class:`TelemetryConfigError` showing the batch's structure and
   naming the config keys to set.

A transformers ``BatchEncoding`` is a ``UserDict``, not a ``dict``: both count as mappings.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .config import TelemetryConfigError

__all__ = [
    "BatchFormat",
    "BatchFormatCache",
    "forward_in_chunks",
    "is_one_batch",
    "labels_are_inputs",
    "logits_of",
    "merge_batches",
    "slice_batch",
    "structure",
    "structure_key",
]

# Keys that mark a Hugging Face model input (fed as keyword arguments).
HF_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "attention_mask")
HF_LABEL_KEYS = ("labels", "label")
# Keys that name the labels of a plain dict batch whose other tensors feed the model.
LABEL_LIKE_KEYS = ("label", "labels", "target", "targets", "y", "winner")

Key = str | int

_FIX = (
    "set input_keys (the batch keys or tuple positions the model takes, in order) and "
    "label_key in the config, or pass Telemetry(config, forward_fn=f) with f(model, batch) -> logits"
)


def _is_mapping(batch: Any) -> bool:
    return isinstance(batch, (Mapping, UserDict))


def _is_sequence(batch: Any) -> bool:
    return isinstance(batch, (tuple, list))


def _has(batch: Any, key: Key) -> bool:
    if _is_mapping(batch):
        return key in batch
    if _is_sequence(batch):
        # bool is an int: a position of True would be a config mistake, not position 1
        return isinstance(key, int) and not isinstance(key, bool) and -len(batch) <= key < len(batch)
    return False


@dataclass(frozen=True)
class BatchFormat:
    """How one batch structure feeds the model; resolved once, then cheap per batch.

    ``call="args"`` feeds ``model(*[batch[k] for k in input_keys])``; ``call="kwargs"``
    feeds ``model(**{k: batch[k] for k in input_keys})``. ``label_key`` is ``None`` only
    for a format resolved without labels (never by :meth:`resolve`, which requires them).
    """

    input_keys: tuple[Key, ...]
    label_key: Key | None
    call_style: Literal["args", "kwargs"] = "args"
    label_name: str = ""  # batch_stats keys "<label_name>_<cls>_pct"

    @classmethod
    def resolve(
        cls,
        batch: Any,
        input_keys: Sequence[Key],
        label_key: Key,
        keys_are_default: bool,
        *,
        need_inputs: bool = True,
    ) -> BatchFormat:
        """The format of ``batch``, or :class:`TelemetryConfigError` showing its structure.

        ``need_inputs=False``: only the labels must be found (batch statistics, or a
        holdout fed by ``forward_fn``); the inputs are then whatever the rules give, if any.
        """
        keys = tuple(input_keys)
        label_ok = _has(batch, label_key)
        if label_ok and all(_has(batch, k) for k in keys):
            return cls(keys, label_key, "args", str(label_key))
        if keys_are_default:
            found = _recognise(batch, need_inputs)
            if found is not None:
                return found
        if label_ok and not need_inputs:
            return cls((), label_key, "args", str(label_key))  # labels only: call() would raise
        raise TelemetryConfigError(_explain(batch, keys, label_key, keys_are_default, need_inputs))

    def labels(self, batch: Any) -> Any | None:
        """The batch's labels (tensor or list), or None if this batch has none at ``label_key``."""
        key = self.label_key
        if key is None:
            return None
        if _is_mapping(batch):
            return batch.get(key)
        if _is_sequence(batch) and isinstance(key, int) and -len(batch) <= key < len(batch):
            return batch[key]
        return None

    def call(self, model: Callable[..., Any], batch: Any) -> Any:
        """``model(...)`` with this batch's inputs, as args or kwargs."""
        if not self.input_keys:
            raise TelemetryConfigError(
                f"no model inputs were found in the batch ({structure(batch)}): {_FIX}"
            )
        if self.call_style == "kwargs":
            return model(**{str(k): batch[k] for k in self.input_keys})  # kwargs formats have str keys
        return model(*[batch[k] for k in self.input_keys])

    def batch_size(self, batch: Any) -> int | None:
        """Rows of the batch: the first dim (or length) of its labels, else of its first input."""
        keys = (self.label_key, *self.input_keys) if self.label_key is not None else self.input_keys
        for key in keys:
            if not _has(batch, key):
                continue
            v = batch[key]
            if isinstance(v, torch.Tensor):
                if v.dim() > 0:
                    return int(v.shape[0])
            elif isinstance(v, (list, tuple)):
                return len(v)
        return None


def _recognise(batch: Any, need_inputs: bool) -> BatchFormat | None:
    """Rule 2 of the module docstring: the format a batch's shape implies, or None."""
    if _is_sequence(batch):
        n = len(batch)
        if n >= 2:
            return BatchFormat(tuple(range(n - 1)), n - 1, "args", str(n - 1))
        return None
    if not _is_mapping(batch):
        return None
    keys = list(batch.keys())
    hf_labels = [k for k in HF_LABEL_KEYS if k in batch]
    if len(hf_labels) == 1 and any(k in batch for k in HF_INPUT_KEYS):
        label = hf_labels[0]
        return BatchFormat(tuple(k for k in keys if k != label), label, "kwargs", label)
    labels = [k for k in LABEL_LIKE_KEYS if k in batch]
    if len(labels) != 1:
        return None
    label = labels[0]
    inputs = tuple(k for k in keys if k != label and isinstance(batch[k], torch.Tensor))
    if not inputs and need_inputs:
        return None
    return BatchFormat(inputs, label, "args", label)


def _explain(batch: Any, keys: tuple[Key, ...], label_key: Key, keys_are_default: bool, need_inputs: bool) -> str:
    shape = structure(batch)
    if not (_is_mapping(batch) or _is_sequence(batch)):
        return f"cannot read a batch that is a {shape}: batches must be dicts, tuples or lists; {_FIX}"
    wanted = [*keys, label_key] if need_inputs else [label_key]
    missing = [k for k in wanted if not _has(batch, k)]
    if keys_are_default:
        return (
            f"cannot tell the model inputs from the labels in a batch that is a {shape} "
            f"(it has none of the default keys input_keys={list(keys)}, label_key={label_key!r}, "
            f"and its shape is not one that is recognised: (x, y), (x1, ..., y), a Hugging Face dict "
            f"with 'labels', a dict with one of {list(LABEL_LIKE_KEYS)}): {_FIX}"
        )
    return (
        f"the batch lacks the configured key(s) {missing} (input_keys={list(keys)}, "
        f"label_key={label_key!r}); the batch is a {shape}: {_FIX}"
    )


class BatchFormatCache:
    """The :class:`BatchFormat` of each batch structure seen, resolved once (hot-path lookup).

    The key is :func:`structure_key`: a mapping's type and keys, or a sequence's type and length.
    """

    _MAX = 64  # structures that never repeat: start over rather than grow

    def __init__(self, input_keys: Sequence[Key], label_key: Key, keys_are_default: bool, *, need_inputs: bool = True) -> None:
        self.input_keys = tuple(input_keys)
        self.label_key = label_key
        self.keys_are_default = keys_are_default
        self.need_inputs = need_inputs
        self._formats: dict[Hashable, BatchFormat | str] = {}  # a str: the error of a structure that failed

    def get(self, batch: Any) -> BatchFormat:
        """The format of ``batch``; raises TelemetryConfigError like :meth:`BatchFormat.resolve`.

        A structure that failed fails again from the cache: at every collection step of a
        run whose batches cannot be read, the message is not rebuilt.
        """
        key = (dict, tuple(batch)) if type(batch) is dict else structure_key(batch)  # the hot path's common case
        fmt = self._formats.get(key)
        if fmt is None:
            if len(self._formats) >= self._MAX:
                self._formats.clear()
            try:
                fmt = BatchFormat.resolve(batch, self.input_keys, self.label_key, self.keys_are_default,
                                          need_inputs=self.need_inputs)
            except TelemetryConfigError as exc:
                self._formats[key] = str(exc)
                raise
            self._formats[key] = fmt
        if type(fmt) is str:
            raise TelemetryConfigError(fmt)
        return fmt  # type: ignore[return-value]


def structure_key(batch: Any) -> Hashable:
    """What a format depends on: a mapping's type and keys (in order), a sequence's type and length."""
    if isinstance(batch, dict):
        return (dict, tuple(batch))
    if _is_mapping(batch):
        return (type(batch), tuple(batch.keys()))
    if _is_sequence(batch):
        return (type(batch), len(batch))
    return (type(batch),)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits``, ``["logits"]``, or a tuple's first element."""
    seen = output
    for _ in range(8):  # nested tuples: ((logits, aux), hidden) and the like
        if isinstance(output, torch.Tensor):
            return output
        logits = getattr(output, "logits", None)  # Hugging Face ModelOutput
        if isinstance(logits, torch.Tensor):
            return logits
        if _is_mapping(output) and isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
            continue
        break
    raise TypeError(
        f"cannot find the logits in the model's output, a {_describe(seen)}: return a tensor, an "
        "object with .logits, a dict with 'logits' or a tuple whose first element is the logits, "
        "or pass forward_fn=f with f(model, batch) -> logits"
    )


def labels_are_inputs(batch: Any, labels: torch.Tensor) -> bool:
    """Whether sequence ``labels`` are the batch's ``input_ids`` at every position they score.

    A Hugging Face causal LM is given labels equal to its input_ids (-100 where ignored) and
    shifts them inside its forward: its logits at t predict the token at t + 1. nanoGPT-style
    targets are shifted already (they differ from the inputs) and are scored as they are.
    The comparison is a sync on CUDA: callers decide once (per holdout, per batch shape).
    """
    if not _is_mapping(batch) or labels.dim() < 2:
        return False
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape != labels.shape:
        return False
    return bool(((labels == ids.to(labels.device)) | (labels < 0)).all())


def is_one_batch(data: Any) -> bool:
    """Whether ``data`` is one batch (a mapping, or a tuple/list holding a tensor) rather than many."""
    if _is_mapping(data):
        return True
    return _is_sequence(data) and any(isinstance(v, torch.Tensor) for v in data)


def merge_batches(batches: Any, limit: int) -> Any:
    """The first ``limit`` rows of batches of one structure, as one batch on the CPU.

    ``batches``: one batch, a list of batches or any iterable of them (a DataLoader is
    read only until ``limit`` rows are in). Tensors are detached, moved to the CPU and
    concatenated on dim 0 (then cloned: the holdout owns its memory); lists are sliced;
    other values (a flag, a string) are kept from the first batch. A mapping comes back
    as a plain ``dict`` (a ``BatchEncoding`` included), a tuple as a tuple, a list as a list.
    """
    taken = _take(batches, limit)
    first = taken[0]
    first_key = structure_key(first)
    for i, b in enumerate(taken[1:], 1):
        if structure_key(b) != first_key:
            raise TelemetryConfigError(
                f"set_holdout_data: batch {i} is a {structure(b)}, but batch 0 is a {structure(first)}: "
                "holdout batches must share one structure"
            )
    if _is_mapping(first):
        return {k: _merge_values(k, [b[k] for b in taken], limit) for k in first}
    merged = [_merge_values(i, [b[i] for b in taken], limit) for i in range(len(first))]
    return tuple(merged) if isinstance(first, tuple) else merged


def _take(batches: Any, limit: int) -> list[Any]:
    if is_one_batch(batches):
        return [batches]
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, torch.Tensor)):
        raise TelemetryConfigError(
            f"set_holdout_data: got a {_describe(batches)}; expected a batch (dict, tuple or list of "
            "tensors) or a list of batches"
        )
    taken: list[Any] = []
    rows = 0
    for b in batches:
        if not (_is_mapping(b) or _is_sequence(b)):
            raise TelemetryConfigError(
                f"set_holdout_data: batch {len(taken)} is a {structure(b)}; expected a dict, tuple "
                "or list of tensors (as a DataLoader yields)"
            )
        taken.append(b)
        rows += _rows(b) or 0
        if rows >= limit:  # enough rows: a DataLoader over a whole set is not read to its end
            break
    if not taken:
        raise TelemetryConfigError("set_holdout_data: got no batches")
    return taken


def _rows(batch: Any) -> int | None:
    values = batch.values() if _is_mapping(batch) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


def _merge_values(key: Key, values: list[Any], limit: int) -> Any:
    if all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values):
        if len({tuple(v.shape[1:]) for v in values}) > 1:
            raise TelemetryConfigError(
                f"set_holdout_data: {key!r} has shapes {[list(v.shape) for v in values]} across the "
                "batches (padded per batch?): pass one batch of at least holdout_size rows, or pad "
                "the holdout to one length"
            )
        return torch.cat([v.detach().cpu() for v in values])[:limit].clone()
    if all(isinstance(v, (list, tuple)) for v in values):
        return [x for v in values for x in v][:limit]
    return values[0]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch (tensors with a dim and lists sliced, the rest kept)."""
    if _is_mapping(batch):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice(v, start, stop) for v in batch)
    if isinstance(batch, list):
        return [_slice(v, start, stop) for v in batch]
    return _slice(batch, start, stop)


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 else value
    if isinstance(value, (list, tuple)):
        return value[start:stop]
    return value


def forward_in_chunks(
    model: Callable[..., Any],
    batch: Any,
    fmt: BatchFormat,
    forward_fn: Callable[[Any, Any], Any] | None,
    chunk_size: int,
) -> torch.Tensor:
    """The logits of every row of ``batch``, fed ``chunk_size`` rows at a time (float32, CPU).

    The caller sets eval mode and no-grad; ``forward_fn(model, chunk)`` replaces the call.
    """
    n = fmt.batch_size(batch)
    if n is None:
        raise TelemetryConfigError(f"cannot tell how many rows the holdout has ({structure(batch)}): {_FIX}")
    chunks = []
    for start in range(0, n, chunk_size):
        part = slice_batch(batch, start, start + chunk_size)
        out = forward_fn(model, part) if forward_fn is not None else fmt.call(model, part)
        chunks.append(logits_of(out).detach().float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def structure(batch: Any) -> str:
    """A batch as error messages show it: ``dict with keys ['x' (tensor [8, 3]), ...]``."""
    if _is_mapping(batch):
        name = "dict" if isinstance(batch, dict) else type(batch).__name__
        items = list(batch.items())
        shown = ", ".join(f"{k!r} ({_describe(v)})" for k, v in items[:20])
        more = f", ... {len(items) - 20} more" if len(items) > 20 else ""
        return f"{name} with keys [{shown}{more}]"
    if _is_sequence(batch):
        shown = ", ".join(_describe(v) for v in batch[:20])
        more = f", ... {len(batch) - 20} more" if len(batch) > 20 else ""
        return f"{type(batch).__name__} of {len(batch)}: ({shown}{more})"
    return _describe(batch)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if _is_mapping(value):
        return f"{'dict' if isinstance(value, dict) else type(value).__name__} of {len(value)} keys"
    return type(value).__name__
