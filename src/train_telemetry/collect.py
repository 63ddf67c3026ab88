"""The hook's work at a collection step: fill a slot, hand it to the sink.

Runs in: the training process, inside ``Telemetry.on_batch_end`` (the hot path).

Every line here runs on the training thread at each collection, with caches cold from
the step before it: a cheap torch op costs 10-30 us here, not the 1-2 us of a
microbenchmark. So a collection runs two fused torch calls (the gradient norms, then one
``_foreach_copy_`` of everything the enabled metrics need into the slot), packs plain
numbers into the slot's header and hands the slot to the sink (sinks.py). Label counts
and accuracy are the worker's work (processor.py). What is copied follows the metrics'
``needs`` (metrics/api.py): a run without weight metrics copies no weights.

What is decided once per shape of (labels, outputs), not per step (``_plan_aux``): where
they go in the aux bytes, the label name of the batch's format (batch_stats keys), and
whether accuracy compares shifted positions (a Hugging Face causal LM whose labels are its
input_ids). The plan's pickled ``extra`` carries all three in every header at no cost.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import batches
from .batches import BatchFormat, BatchFormatCache, logits_of
from .clipping import PreClip
from .config import TelemetryConfig
from .messages import (
    ALL_MISSING,
    IN_AUX,
    IN_EXTRA,
    IN_HEADER,
    IN_SLOT,
    NONE,
    Snapshot,
    write_header,
)
from .metrics.batch import TOP_LABELS, batch_accuracy, label_counts
from .records import error_entry
from .snapshot import (
    AUX_BYTES,
    MANY_TENSORS,
    Layout,
    SlotPool,
    aux_view,
    flat_sources,
    grad_norms,
    shape_groups,
)

if TYPE_CHECKING:
    from .distributed import Shared

__all__ = ["Collector", "Fill"]


@dataclass
class _AuxPlan:
    """How one shape of (labels, outputs) is copied into the slots' aux bytes (Collector._plan_aux)."""

    batch_size: int
    labels_fit: bool  # labels are copied; else counted in the hook
    outputs: bool  # outputs are copied too (the worker computes accuracy from both)
    accuracy_kind: int
    shift: bool  # accuracy scores logits[:, :-1] against labels[:, 1:] (labels_are_inputs)
    fmt: BatchFormat  # the plan is keyed by id(fmt): this object, to tell a reused id
    views: list[list[torch.Tensor]]  # per slot: the aux views labels (and outputs) are copied into
    same_device: bool  # copied in the hook's one fused copy; else in a second one
    extra: dict[str, Any]  # the aux layout, label name and shift, for the header
    extra_bytes: bytes  # ... pickled once


class Fill:
    """One collection in progress: what goes into the fused copy, and the header's numbers."""

    __slots__ = ("src", "dst", "errors", "extra", "grads", "loss_kind", "loss", "acc_kind", "counts_kind",
                 "batch_size", "plan", "aux_src")

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
        self.src, self.dst = src, dst
        self.errors: list[dict[str, str]] | None = None
        self.extra: dict[str, Any] | None = None  # hook-side values for the header's pickled extra
        self.grads = self.loss_kind = self.acc_kind = self.counts_kind = NONE
        self.loss = 0.0
        self.batch_size = -1
        self.plan: _AuxPlan | None = None
        self.aux_src: list[torch.Tensor] = []

    def fail(self, where: str, exc: BaseException) -> None:
        self.errors = (self.errors or []) + [error_entry(where, exc)]


class Collector:
    """Fills slots of ``pool`` with what the enabled metrics need, one collection at a time."""

    def __init__(self, config: TelemetryConfig, needs: frozenset[str], layout: Layout, pool: SlotPool) -> None:
        self.config = config
        self.layout = layout
        self.pool = pool
        self.copy_weights = "weights" in needs
        self.want_grads = "grad_norms" in needs
        self.want_batch = "batch" in needs
        self.want_loss = "loss" in needs
        self.want_lrs = "learning_rates" in needs
        self.want_mode = "mode" in needs
        self.srcs: list[torch.Tensor] = list(layout.sources) if self.copy_weights else []
        self.dsts = [list(t) if self.copy_weights else [] for t in pool.slots]
        self.on_cuda = layout.on_cuda
        # Many small tensors: the weights in one cat per dtype, the norms stacked (snapshot.MANY_TENSORS)
        self.flat = flat_sources(layout) if self.copy_weights else None
        self.stack_norms = self.on_cuda or len(layout.params) >= MANY_TENSORS
        self.norm_groups = shape_groups(layout.params) if not layout.sharded else None
        self.formats = BatchFormatCache(config.input_keys, config.label_key, config.keys_are_default, need_inputs=False)
        self._aux_plans: dict[tuple[Any, ...], _AuxPlan] = {}
        self._param_index: dict[int, int] | None = None  # id(param) -> layout index, for pre-clip norms
        self._minus_one = torch.tensor(-1.0, dtype=torch.float64)

    def fill(self, slot: int, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], batch: Any,
             loss: Any, outputs: Any, shared: Shared | None = None, pre_clip: PreClip | None = None) -> Fill:
        """Copy this step's data into ``slot`` (one fused copy; asynchronous on CUDA).

        ``shared``: what the ranks' collective gave (distributed.Shared): DDP's summed label
        counts; FSDP2's global gradient norms, loss and accuracy (``reduced``), recorded
        instead of this rank's own; every rank's weight fingerprint (``replicas``).
        ``pre_clip``: what ``Telemetry.clip_grad_norm_`` measured before this step's clip.
        """
        counts, reduced = (shared.counts, shared.reduced) if shared is not None else (None, None)
        # Each Python call here costs a few us with cold caches: the common cases are inline.
        flat = self.flat
        if flat is None:
            fill = Fill(list(self.layout.live_sources() if self.copy_weights else ()), list(self.dsts[slot]))
        else:  # the weights are copied by the cats below
            fill = Fill([], [])
        if reduced is not None:
            self._add_reduced(fill, slot, batch, outputs, counts, reduced)
        else:
            if self.want_grads:
                norms = grad_norms(self.layout.params, stack=self.stack_norms, groups=self.norm_groups)
                if type(norms) is list:  # every parameter has a dense gradient (0-d norms, CPU)
                    fill.src += norms
                    fill.dst += self.pool.norm_views[slot]
                    fill.grads = IN_SLOT
                else:
                    self._add_grad_norms(fill, slot, norms)
            if pre_clip is not None and self.want_grads:
                self._add_pre_clip(fill, slot, pre_clip)
            if loss is not None and self.want_loss:
                if type(loss) is torch.Tensor and loss.numel() == 1:
                    fill.src.append(loss)
                    fill.dst.append(self.pool.scalar(slot, 0, loss.shape))
                    fill.loss_kind = IN_SLOT
                else:
                    self._add_loss(fill, slot, loss)
            if batch is not None and (self.want_batch or counts is not None):
                self._add_batch(fill, slot, batch, outputs, counts)
        if shared is not None and shared.replicas is not None:  # the replica check's values (no host sync)
            fill.src.append(shared.replicas)
            fill.dst.append(self.pool.replicas[slot])
        torch._foreach_copy_(fill.dst, fill.src, non_blocking=self.on_cuda)
        if flat is not None:
            flats = self.pool.flats[slot]
            for dtype, views in flat:
                torch.cat(views, out=flats[dtype])
        if fill.plan is not None and fill.aux_src and not fill.plan.same_device:
            torch._foreach_copy_(fill.plan.views[slot], fill.aux_src, non_blocking=True)
        return fill

    def publish_header(self, slot: int, fill: Fill, *, seq: int, ordinal: int, batch_idx: int, step: int, epoch: int, t0: float,
                       dropped_before: int, dropped_total: int, groups_version: int,
                       optimizers: Sequence[torch.optim.Optimizer], model: torch.nn.Module,
                       values: dict[str, Any] | None) -> None:
        """Pack the step's plain numbers (and the LRs, read now) into ``slot``'s header."""
        lrs = None
        if self.want_lrs and optimizers:
            try:
                lrs = [float(g["lr"]) for opt in optimizers for g in opt.param_groups]
            except Exception as exc:
                fill.fail("learning_rates", exc)
        if values:
            fill.extra = {**(fill.extra or {}), "values": values}
        plan = fill.plan
        if fill.errors or fill.extra:
            extra_dict = dict(plan.extra) if plan is not None else {}
            extra_dict.update(fill.extra or {})
            if fill.errors:
                extra_dict["errors"] = fill.errors
            extra = pickle.dumps(extra_dict, pickle.HIGHEST_PROTOCOL)
        else:
            extra = plan.extra_bytes if plan is not None else b""
        header = Snapshot(
            seq=seq, ordinal=ordinal, batch_idx=batch_idx, step=step, epoch=epoch, time=time.time(), hook_ms=(time.perf_counter() - t0) * 1000.0,
            dropped_before=dropped_before, dropped_total=dropped_total, batch_size=fill.batch_size,
            groups_version=groups_version, grads=fill.grads, loss_kind=fill.loss_kind, accuracy_kind=fill.acc_kind,
            counts_kind=fill.counts_kind, training=int(model.training) if self.want_mode else -1, loss=fill.loss,
            learning_rates=lrs,
        )
        write_header(self.pool.channel.headers_view, slot, header, extra)

    # -- the parts of a fill --------------------------------------------------------
    def _add_reduced(self, fill: Fill, slot: int, batch: Any, outputs: Any, counts: torch.Tensor | None,
                     reduced: dict[str, torch.Tensor | None]) -> None:
        """FSDP2: the global values of the collective; then this rank's batch (labels, outputs) as usual.

        The parts some rank could not add to go along (``failed``): the worker records those
        as null, so the hook copies without reading the collective's result (no host sync).
        """
        if (failed := reduced.get("failed")) is not None:
            fill.src.append(failed)
            fill.dst.append(self.pool.failed[slot])
        if self.want_grads:
            self._add_grad_norms(fill, slot, reduced["norms"])
        if self.want_loss and (loss := reduced["loss"]) is not None:
            fill.src.append(loss)
            fill.dst.append(self.pool.scalars[slot][0])
            fill.loss_kind = IN_SLOT
        if batch is not None and (self.want_batch or counts is not None):
            self._add_batch(fill, slot, batch, None, counts)
        if outputs is not None and (acc := reduced["accuracy"]) is not None:
            fill.src.append(acc)
            fill.dst.append(self.pool.scalars[slot][1])
            fill.acc_kind = IN_SLOT

    def _add_grad_norms(self, fill: Fill, slot: int, norms: list[torch.Tensor] | torch.Tensor | None) -> None:
        if norms is None:
            fill.grads = ALL_MISSING
        elif isinstance(norms, list):
            fill.src += norms
            fill.dst += self.pool.norm_views[slot]
            fill.grads = IN_SLOT
        else:
            fill.src.append(norms)
            fill.dst.append(self.pool.norms[slot][: norms.shape[0]])
            fill.grads = IN_SLOT

    def _add_pre_clip(self, fill: Fill, slot: int, pre: PreClip) -> None:
        """The pre-clip norms, in layout order (-1 for a parameter the clip did not see), and the total."""
        index = self._param_index
        if index is None:
            index = self._param_index = {id(p): i for i, p in enumerate(self.layout.params)}
        found = {i: norm for p, norm in zip(pre.params, pre.norms, strict=True) if (i := index.get(id(p))) is not None}
        if not found:
            return
        n = len(self.layout.params)
        if self.on_cuda:  # one device-to-host copy, as for the gradient norms
            device = pre.total.device
            missing = torch.full((), -1.0, device=device)
            fill.src.append(torch.stack([found.get(i, missing).to(device) for i in range(n)]))
            fill.dst.append(self.pool.pre_clip[slot][:n])
        else:
            fill.src += [found.get(i, self._minus_one) for i in range(n)]
            fill.dst += self.pool.pre_clip_views[slot]
        fill.src.append(pre.total.reshape(()))
        fill.dst.append(self.pool.scalars[slot][2])
        fill.extra = {**(fill.extra or {}), "clip_max_norm": pre.max_norm}

    def _add_loss(self, fill: Fill, slot: int, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() == 1:
                fill.src.append(loss)
                fill.dst.append(self.pool.scalar(slot, 0, loss.shape))
                fill.loss_kind = IN_SLOT
            else:
                fill.fail("train_loss", ValueError(
                    f"loss has shape {tuple(loss.shape)}: pass the scalar loss the optimizer steps on"))
            return
        try:
            fill.loss, fill.loss_kind = float(loss), IN_HEADER
        except (TypeError, ValueError) as exc:
            fill.fail("train_loss", exc)

    def _add_batch(self, fill: Fill, slot: int, batch: Any, outputs: Any, counts: torch.Tensor | None) -> None:
        """Labels (and outputs) into the aux bytes, or counted here when too big or not a tensor."""
        try:
            fmt = self.formats.get(batch)
        except Exception as exc:
            fill.fail("batch_stats", exc)
            return
        labels = batch.get(fmt.label_key) if type(batch) is dict else fmt.labels(batch)
        track = self.config.track_batch_stats and counts is None
        if counts is not None:  # DDP: the all_reduced vector holds counts and size
            fill.src.append(counts)
            fill.dst.append(self.pool.counts[slot])
            fill.counts_kind = IN_SLOT
        if isinstance(labels, torch.Tensor):
            self._add_labels(fill, slot, batch, fmt, labels, outputs, track)
        elif labels is not None:
            fill.extra = {"label_name": fmt.label_name}  # no plan to carry it: pickled per step (rare)
            if track:
                try:  # a list of class ids, say: counted here (rare, and not a tensor op we can defer)
                    fill.extra["label_counts"] = label_counts(torch.as_tensor(labels), top=TOP_LABELS)
                    fill.counts_kind = IN_EXTRA
                except Exception as exc:
                    fill.fail("batch_stats", exc)
        if fill.batch_size < 0 and counts is None:
            try:
                size = fmt.batch_size(batch)
                fill.batch_size = -1 if size is None else size
            except Exception as exc:
                fill.fail("batch_size", exc)

    def _add_labels(self, fill: Fill, slot: int, batch: Any, fmt: BatchFormat, labels: torch.Tensor, outputs: Any,
                    track: bool) -> None:
        out = outputs if outputs is None or type(outputs) is torch.Tensor else None
        if outputs is not None and out is None:
            try:
                out = logits_of(outputs)
            except TypeError as exc:
                fill.fail("train_accuracy", exc)
        # is_cuda, not .device (which builds a new object each time): a plan is per device type
        # id(fmt), not fmt: hashing the dataclass costs a few us per step; a reused id is caught below
        key = (id(fmt), labels.shape, labels.dtype, labels.is_cuda, None if out is None else out.shape,
               None if out is None else out.dtype, out is not None and out.is_cuda)
        plan = self._aux_plans.get(key)
        if plan is None or plan.fmt is not fmt:
            plan = self._plan_aux(key, batch, fmt, labels, out)
        fill.plan = plan
        fill.batch_size = plan.batch_size
        if plan.labels_fit:
            fill.aux_src = [labels, out] if plan.outputs and out is not None else [labels]
        if plan.same_device:
            fill.src += fill.aux_src
            fill.dst += plan.views[slot]
        fill.acc_kind = plan.accuracy_kind
        if fill.acc_kind == IN_SLOT and out is not None:
            try:
                fill.src.append(batch_accuracy(out, labels, plan.shift))
                fill.dst.append(self.pool.scalars[slot][1])
            except Exception as exc:
                fill.acc_kind = NONE
                fill.fail("train_accuracy", exc)
        if track:
            fill.counts_kind = IN_AUX
            if not plan.labels_fit:
                fill.counts_kind = IN_EXTRA
                # A sync and a copy of the labels on CUDA (~2 ms on CPU for 64 x 4096 ids); the
                # summary keeps the top ids only: a vocabulary's counts would overflow HEADER_BYTES.
                try:
                    fill.extra = {"label_counts": label_counts(labels.detach().cpu(), top=TOP_LABELS)}
                except Exception as exc:
                    fill.fail("batch_stats", exc)
                    fill.counts_kind = NONE

    def _plan_aux(self, key: tuple[Any, ...], batch: Any, fmt: BatchFormat, labels: torch.Tensor,
                  outputs: torch.Tensor | None) -> _AuxPlan:
        """Where this shape of labels/outputs goes in each slot's aux bytes, how accuracy is
        scored, and the label name (once per batch format and shape)."""
        pool = self.pool
        if len(self._aux_plans) > 64:  # shapes that never repeat (e.g. variable sequence lengths)
            self._aux_plans.clear()
        batch_size = int(labels.shape[0]) if labels.dim() > 0 else -1
        lab_bytes = labels.numel() * labels.element_size()
        out_bytes = outputs.numel() * outputs.element_size() if outputs is not None else 0
        out_at = (lab_bytes + 63) // 64 * 64
        labels_fit = lab_bytes <= AUX_BYTES
        outputs_fit = outputs is not None and labels_fit and out_at + out_bytes <= AUX_BYTES
        shift = outputs is not None and labels_are_inputs(batch, labels, outputs)
        extra: dict[str, Any] = {"label_name": fmt.label_name}
        if shift:
            extra["shift"] = True
        views: list[list[torch.Tensor]] = [[] for _ in pool.aux]
        if labels_fit:
            specs: list[tuple[str, int, torch.Tensor]] = [("labels", 0, labels)]
            if outputs_fit and outputs is not None:
                specs.append(("outputs", out_at, outputs))
            for name, offset, t in specs:
                extra[name] = (offset, str(t.dtype).removeprefix("torch."), tuple(t.shape))
            views = [[aux_view(pool.aux[i], offset, t.dtype, t.shape) for _, offset, t in specs]
                     for i in range(len(pool.aux))]
        if outputs_fit:
            accuracy_kind = IN_AUX
        elif outputs is not None:
            accuracy_kind = IN_SLOT  # too big to copy: accuracy as a 0-d tensor, copied into scalars[1]
        else:
            accuracy_kind = NONE
        device = self.layout.sources[0].device if self.layout.sources else torch.device("cpu")
        same_device = labels.device == device and (not outputs_fit or outputs.device == device)  # type: ignore[union-attr]
        plan = _AuxPlan(batch_size=batch_size, labels_fit=labels_fit, outputs=outputs_fit, accuracy_kind=accuracy_kind,
                        shift=shift, fmt=fmt, views=views, same_device=same_device,
                        extra=extra, extra_bytes=pickle.dumps(extra, pickle.HIGHEST_PROTOCOL))
        self._aux_plans[key] = plan
        return plan


def labels_are_inputs(batch: Any, labels: torch.Tensor, outputs: torch.Tensor) -> bool:
    """Whether train accuracy scores ``outputs`` shifted (batches.labels_are_inputs), given one
    logit vector per position. Called once per batch format and shape (``_plan_aux``)."""
    if outputs.dim() != labels.dim() + 1 or outputs.shape[:2] != labels.shape[:2]:
        return False  # not one logit vector per position: nothing to shift
    return batches.labels_are_inputs(batch, labels)

