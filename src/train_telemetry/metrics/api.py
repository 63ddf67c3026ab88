"""The public metric API: a metric is one object that says what it needs from a snapshot
and turns a :class:`SnapshotData` into a dict of numbers written under its record key.

Runs in: the worker process (``mode: async``) or the training process (``mode: sync``);
``needs`` is read once at ``start()`` in the training process to decide what the hook
copies. Every built-in metric (gradients.py, weights.py, ...) is written with this API.

A minimal metric, in any file of yours::

    from train_telemetry import metric

    @metric(key="mean_abs_weight", needs={"weights"})
    def mean_abs_weight(snap):
        return snap.by_group([float(p.abs().mean()) for p in snap.params])

    Telemetry(config, metrics=[mean_abs_weight])

The record then holds ``"mean_abs_weight": {"overall": ..., "<group>": ...}``, and
``train-telemetry report/export/plot`` show it without further code.

What a metric may need (``needs``), and what the hook does for it at a collection:

============== ============================================================================
weights        parameter values at the hook (one fused copy into shared memory)
buffers        buffers too (BatchNorm running stats); copied with the weights
grad_norms     L2 norm of each parameter's gradient (one fused ``_foreach_norm``)
weight_deltas  ||w - w_ref|| per parameter vs the previous collection (worker reads the
               reference checkpoint; implies ``weights``)
holdout        the eval-mode forward of the fixed holdout at the snapshot's weights
               (in the worker; implies ``weights``); ``instrument`` hooks see it run
batch          the batch's labels and the model's outputs (copied when they fit)
loss           the scalar loss passed to the hook
learning_rates the LR of every param group (plain numbers)
mode           ``model.training`` at the hook (a flag read)
============== ============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TelemetryConfig
from ..records import OVERALL

__all__ = ["NEEDS", "InputFailed", "Metric", "MetricResult", "RunInfo", "SnapshotData", "combine_norms", "metric"]

NEEDS = frozenset(
    {"weights", "buffers", "grad_norms", "weight_deltas", "holdout", "batch", "loss", "learning_rates", "mode"}
)
# What a need brings along: weight deltas and the holdout forward read the copied weights.
_IMPLIES = {"weight_deltas": {"weights"}, "holdout": {"weights", "buffers"}, "buffers": {"weights"}}

MetricResult = Mapping[str, Any] | None


@dataclass(frozen=True)
class RunInfo:
    """What a metric may know about the run before the first snapshot (``Metric.setup``)."""

    config: TelemetryConfig
    param_names: list[str]  # in model order (named_parameters), the user's names (no DDP prefix)
    buffer_names: list[str]
    module_types: dict[str, str]  # module name -> class name, e.g. {"fc1": "Linear", "act": "ReLU"}
    rank: int = 0
    world_size: int = 1
    num_classes: int = 0  # classes seen in the holdout's labels (0: none)
    label_name: str = "label"  # the label key as a string, for keys such as "<label>_<cls>_pct"
    # ranks that should hold the same weights (DDP: all; HSDP: each shard's replicas); [] = no check
    replica_groups: list[list[int]] = field(default_factory=list)


class Metric:
    """A metric: ``key`` (its record key), ``needs``, and ``compute`` run per snapshot.

    Subclass it, or decorate a function with :func:`metric`. ``compute`` returns a dict
    of numbers (nested dicts allowed), or None to write nothing for this snapshot. An
    exception in ``compute`` costs only this metric's entry: it is written to the
    record's ``errors`` as ``{where: key, type, message}``. One instance serves the whole
    run, in order of collection, so a metric may keep state between snapshots.
    """

    key: str = ""
    needs: frozenset[str] = frozenset()

    def setup(self, run: RunInfo) -> None:
        """Once, before the first snapshot, where ``compute`` will run."""

    def instrument(self, model: torch.nn.Module) -> None:
        """Once, on the model the holdout is evaluated with (e.g. register forward hooks).

        That model is the worker's (never the training model) and runs in eval mode under
        no_grad, so hooks on it cost training nothing.
        """

    def compute(self, snap: SnapshotData) -> MetricResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, needs={sorted(self.needs)})"


class _FunctionMetric(Metric):
    def __init__(self, fn: Callable[[SnapshotData], MetricResult], key: str, needs: Iterable[str]) -> None:
        self.fn = fn
        self.key = key
        self.needs = frozenset(needs)

    def compute(self, snap: SnapshotData) -> MetricResult:
        return self.fn(snap)


def metric(*, key: str, needs: Iterable[str] = ()) -> Callable[[Callable[[SnapshotData], MetricResult]], Metric]:
    """Turn ``fn(snap) -> dict`` into a :class:`Metric` writing under ``key``."""

    def wrap(fn: Callable[[SnapshotData], MetricResult]) -> Metric:
        return _FunctionMetric(fn, key, needs)

    return wrap


def check_metrics(metrics: Sequence[Metric], reserved: Iterable[str]) -> None:
    """Raise ValueError for a metric that is not a Metric, needs something unknown, or reuses a key."""
    seen = set(reserved)
    for m in metrics:
        if not isinstance(m, Metric):
            raise TypeError(f"metrics: {m!r} is not a train_telemetry.Metric (subclass it, or use @metric(key=...))")
        if not m.key or not isinstance(m.key, str):
            raise ValueError(f"metrics: {m!r} has no key: set key='<record key>'")
        unknown = set(m.needs) - NEEDS
        if unknown:
            raise ValueError(f"metrics: {m.key!r} needs {sorted(unknown)}, not among {sorted(NEEDS)}")
        if m.key in seen:
            raise ValueError(f"metrics: two metrics write the record key {m.key!r}: give one another key")
        seen.add(m.key)


def all_needs(metrics: Iterable[Metric]) -> frozenset[str]:
    """The union of the metrics' needs, with what each need implies."""
    out: set[str] = set()
    for m in metrics:
        for need in m.needs:
            out.add(need)
            out |= _IMPLIES.get(need, set())
    return frozenset(out)


def combine_norms(
    per_tensor: Sequence[float | None], group_of: Sequence[int], group_names: Sequence[str]
) -> dict[str, float | None]:
    """{overall, <group>...}: the L2 norm over each group's tensors from per-tensor norms.

    A ``None`` entry (e.g. a parameter without a gradient) is left out; a group all of
    whose entries are ``None`` gets ``None`` (not 0.0: "no gradient" is not "zero gradient").
    ``group_of[i] < 0`` means the tensor belongs to no group; it still counts in ``overall``.
    Sums are float64 Python arithmetic, so ``overall`` agrees with
    ``torch.nn.utils.get_total_norm`` to float32 rounding.
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


class InputFailed(Exception):
    """A shared input (the holdout forward, the reference) failed for an earlier metric of
    this snapshot: its error is in the record once, under that metric; later ones skip."""


# Called before a lazy input (the delta pass, the holdout forward) is computed: the worker
# re-checks there whether the trainer waits for it, and how many threads to use (worker.py).
_before_input: Callable[[], None] | None = None


def set_before_input(fn: Callable[[], None] | None) -> None:
    """Run ``fn()`` before each lazy input of a snapshot is computed (None: nothing)."""
    global _before_input
    _before_input = fn


class _Lazy:
    """A value computed on first use by the worker (reading the reference, the holdout forward).

    Its error is raised as such by the first ``get`` (that metric's entry in ``errors``),
    as :class:`InputFailed` after that; ``peek`` computes it without reporting an error.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn: Callable[[], Any] | None = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self._reported = False

    def _compute(self) -> None:
        if self.fn is not None:
            fn, self.fn = self.fn, None
            if _before_input is not None:
                _before_input()
            try:
                self.value = fn()
            except BaseException as exc:
                self.error = exc

    def get(self) -> Any:
        self._compute()
        if self.error is not None:
            if not self._reported:
                self._reported = True
                raise self.error
            raise InputFailed(str(self.error)) from self.error
        return self.value

    def peek(self) -> Any:
        """The value, or None if computing it failed (the failure is left for ``get`` to report)."""
        self._compute()
        return None if self.error is not None else self.value


@dataclass
class SnapshotData:
    """One collection as metrics see it: the numbers and tensors taken at the hook.

    Tensors are CPU views of the snapshot slot, valid only during ``compute`` (the slot is
    reused afterwards): copy what you keep. Values a metric did not declare in ``needs``
    are None. ``weight_deltas`` and ``holdout`` are computed on first use, once per
    snapshot, shared by every metric that reads them.
    """

    batch_idx: int
    epoch: int
    seq: int
    time: float
    config: TelemetryConfig
    param_names: list[str]
    group_names: list[str]
    group_of: list[int]  # param index -> index into group_names
    params: list[torch.Tensor] | None = None
    buffers: dict[str, torch.Tensor] | None = None
    grad_norms: list[float | None] | None = None  # None entries: the parameter had no gradient
    pre_clip_norms: list[float | None] | None = None  # the same before Telemetry.clip_grad_norm_
    clipping: dict[str, float] | None = None  # {max_norm, pre_clip_norm} of that clip
    learning_rates: list[float] | None = None
    loss: float | None = None
    labels: torch.Tensor | None = None  # the batch's labels, when copied
    outputs: torch.Tensor | None = None  # the model's outputs on the batch, when copied
    label_counts: dict[int, int] | None = None  # of the batch (the global batch under DDP)
    batch_size: int | None = None
    train_accuracy: float | None = None
    training: bool | None = None  # model.training at the hook ("mode")
    rank: int = 0
    world_size: int = 1
    step: int | None = None  # the collector's monotonic step (messages.Snapshot.step)
    replica_values: list[float] | None = None  # each rank's weight fingerprint (NaN: that rank had none)
    _weight_norms: list[float] | None = field(default=None, repr=False)
    _deltas: _Lazy | None = field(default=None, repr=False)
    _holdout: _Lazy | None = field(default=None, repr=False)

    def by_group(self, per_param: Sequence[float | None]) -> dict[str, float | None]:
        """{overall, <group>...} L2 combination of one number per parameter (norms)."""
        return combine_norms(per_param, self.group_of, self.group_names)

    def group_members(self) -> dict[str, list[int]]:
        """Each param group's parameter indices (into ``param_names`` / ``params``)."""
        out: dict[str, list[int]] = {name: [] for name in self.group_names}
        for i, g in enumerate(self.group_of):
            if 0 <= g < len(self.group_names):
                out[self.group_names[g]].append(i)
        return out

    @property
    def weight_norms(self) -> list[float] | None:
        """L2 norm of each parameter at the hook (computed once).

        With a delta reference they come from the same pass over the weights as the
        deltas (reference.py); otherwise from one fused ``_foreach_norm``.
        """
        if self._weight_norms is None and self.params is not None:
            found = self._deltas.peek() if self._deltas is not None else None
            norms = getattr(found, "current_norms", None)
            self._weight_norms = list(norms) if norms is not None else tensor_norms(self.params)
        return self._weight_norms

    @property
    def weight_deltas(self) -> WeightDeltas | None:
        """Distances from the previous collection's weights, or None without a reference."""
        return self._deltas.get() if self._deltas is not None else None

    @property
    def holdout(self) -> dict[str, Any] | None:
        """{logits, labels, predictions, accuracy, loss} of the holdout at this snapshot's weights."""
        return self._holdout.get() if self._holdout is not None else None


@dataclass(frozen=True)
class WeightDeltas:
    """Per parameter: ||w - w_ref|| and ||w_ref||, and the step the reference was taken at."""

    deltas: list[float]
    reference_norms: list[float]
    reference_batch_idx: int | None
    current_norms: list[float] | None = None  # ||w||, when the pass that measured the deltas had them


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """L2 norm of each tensor, in one fused call."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(list(tensors))).tolist()
