"""The training-side snapshot: the slot pool in shared memory and ``take_snapshot``.

Runs in: the training process, inside ``Telemetry.on_batch_end`` (the hot path).

What a collection costs the training loop is decided here, so everything in this module
is about doing the least work that keeps the record exact:

- per-parameter gradient norms in one fused ``torch._foreach_norm`` (no ``.item()`` per
  parameter; on CUDA the norms stay on the device until the hand-off thread reads them);
- one ``torch._foreach_copy_`` of the weights (and buffers, which holdout eval needs)
  into a slot: pre-allocated shared memory the worker maps once at setup. This copy is
  what makes the record exact: the optimizer mutates the weights right after the hook
  returns, and the worker never reads live training tensors;
- learning rates and the batch's label counts as plain numbers.

A slot is FREE (0) or TAKEN (1) in a shared byte array. Only the trainer moves a slot
FREE -> TAKEN and only the worker moves it back, so no lock is needed; the snapshot
message (sent after the copy) orders the data before the worker reads it.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TelemetryConfigError
from .messages import TensorSpec

__all__ = ["Layout", "SlotPool", "build_layout", "cpu_model_copy", "unwrap_model"]

FREE = 0
TAKEN = 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module the user wrote: without DDP/DataParallel or torch.compile wrappers.

    Parameter names are then the ones the user sees (no ``module.`` prefix).
    """
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass
class Layout:
    """Which tensors a snapshot copies, in slot order: parameters first, then buffers."""

    specs: list[TensorSpec]
    params: list[torch.nn.Parameter]
    buffers: list[torch.Tensor]
    sources: list[torch.Tensor] = field(default_factory=list)  # params + buffers, detached
    on_cuda: bool = False

    @property
    def num_params(self) -> int:
        return len(self.params)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sources)


def build_layout(model: torch.nn.Module) -> Layout:
    """The slot layout of ``model`` (already unwrapped)."""
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    specs = [
        TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in named_params + named_buffers
    ]
    params = [p for _, p in named_params]
    buffers = [b for _, b in named_buffers]
    sources = [p.detach() for p in params] + [b.detach() for b in buffers]
    on_cuda = any(t.is_cuda for t in sources)
    return Layout(specs=specs, params=params, buffers=buffers, sources=sources, on_cuda=on_cuda)


def cpu_model_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU deep copy of ``model`` that never allocates a second copy on the GPU.

    Pre-seeding deepcopy's memo with CPU clones of every parameter and buffer makes
    deepcopy reuse them instead of copying the device tensors.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    clone = copy.deepcopy(model, memo)
    for p in clone.parameters():
        p.grad = None
    return clone


def _shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


class SlotPool:
    """``num_slots`` copies of the layout's tensors in shared (and, on CUDA, pinned) memory."""

    def __init__(self, layout: Layout, state: Any, shared: bool) -> None:
        self.state = state  # shared byte array: FREE/TAKEN per slot
        num_slots = len(state)
        need = layout.nbytes * num_slots
        if shared:
            free = _shm_free_bytes()
            if free is not None and need > free:
                raise TelemetryConfigError(
                    f"the snapshot slots need {need / 2**20:.1f} MiB of shared memory but "
                    f"/dev/shm has {free / 2**20:.1f} MiB free: lower num_slots (now {num_slots}), "
                    "or give the container more (docker run --shm-size=...)"
                )
        pin = layout.on_cuda and torch.cuda.is_available()
        self.slots: list[list[torch.Tensor]] = []
        for _ in range(num_slots):
            # One flat buffer per dtype, each tensor a view into it: a slot is then a few
            # shared-memory segments (file descriptors) however many tensors the model has,
            # instead of one per tensor (which runs into "too many open files").
            flats: dict[torch.dtype, torch.Tensor] = {}
            for dtype in dict.fromkeys(src.dtype for src in layout.sources):
                numel = sum(src.numel() for src in layout.sources if src.dtype == dtype)
                # zeros, not empty: touching every page now makes a too-small /dev/shm
                # fail here, at start(), rather than with SIGBUS in the middle of training.
                flat = torch.zeros(max(numel, 1), dtype=dtype, device="cpu")
                if shared:
                    flat.share_memory_()
                if pin:
                    _pin_in_place(flat)
                flats[dtype] = flat
            offsets = dict.fromkeys(flats, 0)
            tensors = []
            for src in layout.sources:
                start = offsets[src.dtype]
                offsets[src.dtype] = start + src.numel()
                tensors.append(flats[src.dtype][start : start + src.numel()].view(src.shape))
            self.slots.append(tensors)
        self.nbytes = need
        for i in range(num_slots):
            state[i] = FREE

    def acquire(self) -> int | None:
        """A free slot, now TAKEN, or None when all are in use."""
        state = self.state
        for i in range(len(state)):
            if state[i] == FREE:
                state[i] = TAKEN
                return i
        return None

    def release(self, i: int) -> None:
        self.state[i] = FREE

    def free_count(self) -> int:
        return sum(1 for v in self.state if v == FREE)


def _pin_in_place(t: torch.Tensor) -> None:
    """Page-lock a shared CPU tensor so device->host copies into it can be asynchronous."""
    if t.numel() == 0:
        return
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:  # not fatal: copies into it are then synchronous, still exact
        os.environ.setdefault("TRAIN_TELEMETRY_PIN_FAILED", str(int(err)))


def copy_weights(layout: Layout, slot: Sequence[torch.Tensor]) -> None:
    """Copy the layout's tensors into ``slot`` in one fused call (async from CUDA)."""
    # This is the only O(params) work on the training thread. From CUDA the copy is
    # non-blocking into pinned memory; the hand-off thread waits on an event before the
    # worker may read the slot. On CPU it is a synchronous memcpy.
    torch._foreach_copy_(list(slot), layout.sources, non_blocking=layout.on_cuda)


def grad_norm_tensor(params: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor | None, list[int]]:
    """Per-parameter grad norms as one tensor (on the grads' device) and which params had grads."""
    index = []
    grads = []
    for i, p in enumerate(params):
        g = p.grad
        if g is not None:
            index.append(i)
            grads.append(g)  # no .detach() per tensor (~0.4 us each): no_grad below does its job
    if not grads:
        return None, index
    device = grads[0].device
    with torch.no_grad():  # grads of a create_graph=True backward require grad: build no graph
        if grads[0].is_sparse or any(g.device != device for g in grads):
            # Rare (sparse grads, model split over devices): one small sync per tensor.
            norms = torch.stack(
                [(g.coalesce().values() if g.is_sparse else g).norm().float().cpu() for g in grads]
            )
            return norms, index
        return torch.stack(torch._foreach_norm(grads)), index
