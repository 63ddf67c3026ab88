"""The training-side snapshot: the slot pool in shared memory and what the hook copies into it.

Runs in: the training process, inside ``Telemetry.on_batch_end`` (the hot path).

What a collection costs the training loop is decided here, so everything in this module
is about doing the least work that keeps the record exact. At a collection the hook runs
two fused torch calls and no per-tensor Python:

- ``torch._foreach_norm`` of the gradients, stacked into one tensor;
- one ``torch._foreach_copy_`` of the weights and buffers *and* of everything else the
  record needs from this step (those norms, the loss, the batch's labels and the model's
  outputs) into a slot: pre-allocated shared memory the worker maps once at setup. The
  copy is what makes the record exact: the optimizer mutates the weights right after the
  hook returns, and the worker never reads live training tensors. Label counts and batch
  accuracy are computed by the worker from the copied labels and outputs (each small
  torch op costs the training thread 10-30 us at a collection step; see
  docs/benchmarks.md).

The plain numbers (step, epoch, time, learning rates, drop counters) go into the slot's
header bytes; publishing a slot writes its index into a shared ring and releases a
semaphore. Nothing is written to a pipe, so the hook never pays for waking the worker
(a pipe write that wakes a sleeping process costs ~90 us on a 2-core VM): the worker
polls the semaphore (``worker.PUBLISH_POLL_S``).

Slot states (``SlotStates``): FREE (0), TAKEN (1) or PUBLISHED (2) in a shared byte
array. Only the trainer moves a slot FREE -> TAKEN -> PUBLISHED and only the worker moves
it back to FREE (after its record is written), so a slot still PUBLISHED when a worker
dies is exactly what its successor must replay. The semaphore's
release/acquire order the slot's data before the worker reads it, on any CPU.

The same protocol serves FSDP2's shard slots (``SlotFile``), filled by ranks > 0 and read
by rank 0's worker; only how a filled slot is announced differs there (see its docstring).
"""

from __future__ import annotations

import contextlib
import copy
import mmap
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TelemetryConfigError
from .messages import HEADER_BYTES, TensorSpec
from .metrics.batch import COUNT_VECTOR_LEN

__all__ = ["MANY_TENSORS", "Channel", "Layout", "SlotFile", "SlotPool", "SlotStates", "aux_view", "bind_model", "build_layout",
           "ShapeGroups", "flat_sources", "grouped_norms", "meta_views", "model_on_slot", "grad_norms", "pin_in_place", "shape_groups",
           "unwrap_model"]


FREE = 0
TAKEN = 1  # the hook is filling it
PUBLISHED = 2  # handed to the worker; FREE again once its line is written


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, or ``t`` itself (detached)."""
    local = getattr(t, "_local_tensor", None)
    return (local if isinstance(local, torch.Tensor) else t).detach()


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
    sharded: bool = False  # FSDP2: sources are this rank's local shards (specs keep the full shapes)

    def live_sources(self) -> list[torch.Tensor]:
        """The tensors to copy now. Sharded: the local shards read again (FSDP2 may re-point
        a parameter's local tensor, e.g. at its lazy init after start())."""
        if not self.sharded:
            return self.sources
        if torch.is_grad_enabled():  # at start(): detached, so no copy of them builds a graph
            return [local_tensor(p) for p in self.params] + [local_tensor(b) for b in self.buffers]
        # In the hook (grad mode off): no detach, one builtin call per tensor (~0.1 us, vs ~1 us
        # for local_tensor's detach: 20,000 tensors, scripts/many_tensors_bench.py).
        return [getattr(t, "_local_tensor", t) for t in self.params] + [getattr(t, "_local_tensor", t) for t in self.buffers]

    @property
    def num_params(self) -> int:
        return len(self.params)

    def signature(self) -> list[list[Any]]:
        """[name, shape, dtype] per tensor: what run.json records, and a resumed run must match."""
        return [[spec.name, list(spec.shape), spec.dtype] for spec in self.specs]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sources)


def build_layout(model: torch.nn.Module) -> Layout:
    """The slot layout of ``model`` (already unwrapped); of this rank's shards when its
    parameters are DTensors (FSDP2: specs keep the full shapes)."""
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    specs = [
        TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in named_params + named_buffers
    ]
    params = [p for _, p in named_params]
    buffers = [b for _, b in named_buffers]
    sources = [local_tensor(t) for t in params + buffers]
    sharded = any(isinstance(getattr(p, "_local_tensor", None), torch.Tensor) for p in params)  # DTensors
    on_cuda = any(t.is_cuda for t in sources)
    return Layout(specs=specs, params=params, buffers=buffers, sources=sources, on_cuda=on_cuda, sharded=sharded)


def model_on_slot(model: torch.nn.Module, slot: Sequence[torch.Tensor]) -> torch.nn.Module:
    """A CPU copy of ``model`` whose parameters and buffers *are* ``slot``'s tensors.

    What the worker evaluates the holdout with. It owns no weights: the worker points it
    at each snapshot's slot before the forward (``bind_model``), so neither process holds a
    second copy of the model, and the trainer never allocates one (not even while pickling
    it: the slot is already in shared memory, so only its handles travel). ``slot`` is in
    ``build_layout`` order: parameters, then buffers. Pre-seeding deepcopy's memo makes
    deepcopy reuse these tensors instead of copying the module's (possibly CUDA) ones.
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    if len(params) + len(buffers) != len(slot):
        raise ValueError(f"the slot has {len(slot)} tensors, the model {len(params)} parameters and {len(buffers)} buffers")
    memo: dict[int, Any] = {}
    for p, t in zip(params, slot[: len(params)], strict=True):
        memo[id(p)] = torch.nn.Parameter(t, requires_grad=False)
    for b, t in zip(buffers, slot[len(params) :], strict=True):
        # A new tensor on the same memory, never ``t`` itself: bind_model re-points the
        # model's buffers, which must not re-point the slot's own views with them.
        memo[id(b)] = t.detach()
    clone = copy.deepcopy(model, memo)
    for p in clone.parameters():
        p.grad = None
    return clone


def bind_model(targets: Sequence[torch.Tensor], slot: Sequence[torch.Tensor]) -> None:
    """Point a ``model_on_slot`` model's parameters and buffers (``targets``) at ``slot``'s tensors (no copy)."""
    for t, v in zip(targets, slot, strict=True):
        t.data = v


def _shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


AUX_BYTES = 1 << 20  # per slot: the batch's labels and the model's outputs, when they fit


class SlotStates:
    """The state of ``num_slots`` slots, one signed byte each in shared memory (a ctypes
    array, a mapped file's bytes, or a bytearray in one process): the protocol's moves.

    The filler (the trainer; a rank > 0 for its shard slots) moves a slot FREE -> TAKEN
    -> PUBLISHED, the worker moves it back to FREE once done with it. A TAKEN slot is
    being filled: the worker never frees it under its filler.
    """

    def __init__(self, buffer: Any, num_slots: int) -> None:
        self.num_slots = num_slots
        # a memoryview indexes ~3x faster than a ctypes array
        self.view = memoryview(buffer).cast("B")[:num_slots].cast("b")

    def acquire(self) -> int | None:
        """A free slot, now TAKEN, or None when all are in use."""
        view = self.view
        for i in range(self.num_slots):
            if view[i] == FREE:
                view[i] = TAKEN
                return i
        return None

    def publish(self, slot: int) -> None:
        self.view[slot] = PUBLISHED

    def release(self, slot: int) -> None:
        self.view[slot] = FREE

    def published(self) -> list[int]:
        """Slots published and not yet released."""
        return [i for i in range(self.num_slots) if self.view[i] == PUBLISHED]

    def __iter__(self) -> Iterator[int]:
        return iter(self.view.tolist())


class Channel:
    """The shared state of the trainer -> worker hand-off, for ``num_slots`` slots.

    ``state``: the slots' states (``states``: their SlotStates, per process). ``headers``: HEADER_BYTES of plain numbers per slot.
    Publishing slot i (trainer) writes i into the ring and releases the semaphore; the
    worker takes published slots in order with non-blocking acquires. Nothing here wakes
    the worker, so publishing costs the trainer no system call that waits on a wake-up.

    Created before the worker is spawned (shared ctypes objects travel only as process
    arguments). With ``ctx=None`` (``mode: sync``) everything is process-local.
    """

    def __init__(self, ctx: Any, num_slots: int) -> None:
        self.num_slots = num_slots
        self.state: Any
        self.headers: Any
        self.ring: Any
        if ctx is None:
            self.state = bytearray(num_slots)
            self.headers = bytearray(num_slots * HEADER_BYTES)
            self.ring = [0] * num_slots
            self._sem: Any = None
        else:
            self.state = ctx.RawArray("b", num_slots)
            self.headers = ctx.RawArray("B", num_slots * HEADER_BYTES)
            self.renew(ctx)
        self._states: SlotStates | None = None  # per process (a memoryview does not pickle)
        self._headers_view: memoryview | None = None
        self._published = 0  # trainer side: slots published so far
        self._consumed = 0  # worker side: published slots taken so far

    # -- trainer side
    def renew(self, ctx: Any) -> None:
        """A fresh ring and semaphore (for a new worker: a dead one may have held permits)."""
        self.ring = ctx.RawArray("i", self.num_slots)
        self._sem = ctx.Semaphore(0)
        self._published = 0

    @property
    def states(self) -> SlotStates:
        states = self._states
        if states is None:
            states = self._states = SlotStates(self.state, self.num_slots)
        return states

    def acquire(self) -> int | None:
        """A free slot, now TAKEN, or None when all are in use."""
        return self.states.acquire()

    def publish(self, slot: int) -> None:
        """Hand a filled slot to the worker (after its data and header are written)."""
        self.mark_published(slot)
        self.ring[self._published % self.num_slots] = slot
        self._sem.release()  # a release barrier: the slot's data is visible before the permit
        self._published += 1  # after: a failed release leaves the ring as it was

    def mark_published(self, slot: int) -> None:
        """PUBLISHED, without handing it over (a worker is being replaced: it will be replayed)."""
        self.states.publish(slot)

    def published(self) -> list[int]:
        """Slots published and not yet released."""
        return self.states.published()

    # -- worker side
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_states": None, "_headers_view": None}

    @property
    def headers_view(self) -> memoryview:
        """The header bytes as a flat byte view (made once per process)."""
        if self._headers_view is None:
            self._headers_view = memoryview(self.headers).cast("B")
        return self._headers_view

    def take_published(self) -> list[int]:
        """Slots published since the last call, in the order they were published."""
        out = []
        while self._sem.acquire(False):  # an acquire barrier; never blocks
            out.append(self.ring[self._consumed % self.num_slots])
            self._consumed += 1
        return out

    def release(self, slot: int) -> None:
        self.states.release(slot)


class SlotPool:
    """``num_slots`` snapshot slots in shared (and, on CUDA, pinned) memory.

    Per slot: ``slots[i]``, one tensor per layout tensor (weights and buffers, views into
    one flat buffer per dtype); ``meta[i]``, one flat byte buffer holding ``norms[i]``
    (float64 per parameter, -1 = no gradient), ``pre_clip[i]`` (the same before clipping),
    ``scalars[i]`` (float64: loss, accuracy, total pre-clip norm),
    ``counts[i]`` (int64, the DDP label-count vector), ``failed[i]`` (FSDP2: the parts some
    rank could not add to, RANK_PARTS) and ``aux[i]`` (AUX_BYTES for the batch's labels and
    outputs) and ``replicas[i]`` (float64 per rank: the replica check's weight fingerprints,
    ``replicas`` of them; none without a replica check).
    """

    def __init__(self, layout: Layout, channel: Channel, shared: bool, replicas: int = 0) -> None:
        self.channel = channel
        num_slots = channel.num_slots
        n_params = max(len(layout.params), 1)
        meta_bytes = meta_size(n_params, replicas)
        need = (layout.nbytes + meta_bytes) * num_slots
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
        self.flats: list[dict[torch.dtype, torch.Tensor]] = []  # per slot: the flat buffer per dtype
        self.meta: list[torch.Tensor] = []
        for _ in range(num_slots):
            # One flat buffer per dtype, each tensor a view into it: a slot is then a few
            # shared-memory segments (file descriptors) however many tensors the model has,
            # instead of one per tensor (which runs into "too many open files").
            flats: dict[torch.dtype, torch.Tensor] = {}
            for dtype in dict.fromkeys(src.dtype for src in layout.sources):
                numel = sum(src.numel() for src in layout.sources if src.dtype == dtype)
                flats[dtype] = _shared_zeros(numel, dtype, shared, pin)
            starts = dict.fromkeys(flats, 0)
            tensors = []
            for src in layout.sources:
                start = starts[src.dtype]
                starts[src.dtype] = start + src.numel()
                tensors.append(flats[src.dtype][start : start + src.numel()].view(src.shape))
            self.slots.append(tensors)
            self.flats.append({dtype: flat[: starts[dtype]] for dtype, flat in flats.items()})
            self.meta.append(_shared_zeros(meta_bytes, torch.uint8, shared, pin))
        views = meta_views(self.meta, n_params, replicas)
        self.norms, self.pre_clip, self.scalars = views["norms"], views["pre_clip"], views["scalars"]
        self.counts, self.aux, self.failed = views["counts"], views["aux"], views["failed"]
        self.replicas = views["replicas"]
        self.norm_views = [list(norms[: len(layout.params)].unbind()) for norms in self.norms]  # 0-d each
        self.pre_clip_views = [list(norms[: len(layout.params)].unbind()) for norms in self.pre_clip]
        self.nbytes = need
        self._views: dict[tuple[Any, ...], torch.Tensor] = {}
        for i in range(num_slots):
            channel.release(i)

    def scalar(self, slot: int, index: int, shape: torch.Size) -> torch.Tensor:
        """``scalars[slot][index]`` viewed with ``shape`` (one element), to copy a loss into."""
        key = ("scalar", slot, index, shape)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.scalars[slot][index : index + 1].view(shape)
        return view


# FSDP2: the parts of a collection that every rank adds its share to (shards.ShardSync). A
# rank that cannot compute its share of one marks it; rank 0's worker then records that
# part as null with an error naming the rank (processor.py), never a sum without it.
RANK_PARTS = ("gradient_norm", "train_loss", "batch_stats", "train_accuracy")

# A slot's meta buffer, declared once (the hook's SlotPool and the worker's views read it):
# name, dtype, number of elements (None: one per parameter, -1 = no gradient).
# (name, dtype, numel): numel None is one per parameter, -1 one per rank when the run checks replicas
META_FIELDS: tuple[tuple[str, torch.dtype, int | None], ...] = (
    ("norms", torch.float64, None),  # each parameter's gradient norm
    ("pre_clip", torch.float64, None),  # ... before Telemetry.clip_grad_norm_ scaled it (-1: none)
    # the loss, the batch accuracy (when reduced in the hook), the total pre-clip norm
    ("scalars", torch.float64, 3),
    ("counts", torch.int64, COUNT_VECTOR_LEN),  # DDP: the all_reduced label-count vector
    # FSDP2, per RANK_PARTS: (ranks that could not add their share, the sum of those ranks);
    # zeros unless the collective says otherwise (only the sharded path writes it, every time)
    ("failed", torch.float64, 2 * len(RANK_PARTS)),
    ("aux", torch.uint8, AUX_BYTES),  # the batch's labels and the model's outputs, when they fit
    # every rank's weight fingerprint (replicas.py), one float64 per rank; sized by the run's world
    ("replicas", torch.float64, -1),
)


def _meta_layout(n_params: int, replicas: int = 0) -> list[tuple[str, torch.dtype, int, int]]:
    """(name, dtype, numel, byte offset) of each meta field, each 64-byte aligned."""
    out, offset = [], 0
    for name, dtype, numel in META_FIELDS:
        count = n_params if numel is None else replicas if numel == -1 else numel
        out.append((name, dtype, count, offset))
        offset += _align(count * _itemsize(dtype))
    return out


def meta_size(n_params: int, replicas: int = 0) -> int:
    """Bytes of one slot's meta buffer."""
    name, dtype, numel, offset = _meta_layout(n_params, replicas)[-1]
    return offset + _align(numel * _itemsize(dtype))


def meta_views(meta: Sequence[torch.Tensor], n_params: int, replicas: int = 0) -> dict[str, list[torch.Tensor]]:
    """Each META_FIELDS name -> its view in each slot's meta buffer (the worker rebuilds them too)."""
    views: dict[str, list[torch.Tensor]] = {}
    for name, dtype, numel, offset in _meta_layout(n_params, replicas):
        views[name] = [m[offset : offset + numel * _itemsize(dtype)].view(dtype) for m in meta]
    return views


def aux_view(aux: torch.Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The part of a slot's bytes (its aux bytes, a slot file's) that holds one tensor of ``dtype`` and ``shape``."""
    return aux[offset : offset + _numel(shape) * _itemsize(dtype)].view(dtype).view(tuple(shape))


class SlotFile:
    """``num_slots`` slots in a named shared-memory file, on the slot protocol (SlotStates).

    FSDP2's ranks > 0 copy their shards into theirs and rank 0's worker reads them
    (shards.Assembler). Two things differ from the main slots, both forced: ranks > 0 are
    not the worker's parent, so nothing multiprocessing shares (its semaphore, ctypes
    arrays, torch's shared tensors) reaches the worker, hence one file both map; and the
    worker wants the slot of one collection, not the next in line (either side may have
    dropped a collection the other took), so a filled slot is announced by its tag (the
    collection's ordinal) and a progress counter instead of the ring and semaphore.

    Layout: ``states`` (a byte per slot), ``tags`` (int64 per slot: the ordinal a slot
    holds), ``progress`` (int64: the last ordinal the filler has dealt with), then per
    slot its tensors, each 64-byte aligned.
    """

    def __init__(self, path: str, num_slots: int, specs: Sequence[tuple[tuple[int, ...], str]], create: bool) -> None:
        self.path = path
        self.num_slots = num_slots
        head = _align(num_slots) + _align(8 * num_slots) + 64
        fields = [(getattr(torch, dtype), tuple(shape)) for shape, dtype in specs]
        offsets, at = [], 0
        for dtype, shape in fields:
            offsets.append(at)
            at += _align(_numel(shape) * _itemsize(dtype))
        self.slot_bytes = max(at, 64)
        size = head + self.slot_bytes * num_slots
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600) if create else os.open(path, os.O_RDWR)
        try:
            if create:
                try:  # reserve the pages now: a full /dev/shm fails here, not with SIGBUS mid-run
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    os.unlink(path)
                    raise TelemetryConfigError(
                        f"the shard slots need {size / 2**20:.1f} MiB of shared memory in "
                        f"{os.path.dirname(path)} ({exc.strerror}): lower num_slots, or give the container "
                        "more (docker run --shm-size=...)") from None
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        mv = memoryview(self._mm)
        self.states = SlotStates(mv[:num_slots], num_slots)
        t0 = _align(num_slots)
        self.tags = mv[t0 : t0 + 8 * num_slots].cast("q")
        p0 = t0 + _align(8 * num_slots)
        self.progress = mv[p0 : p0 + 8].cast("q")
        if create:
            for i in range(num_slots):
                self.states.release(i)
                self.tags[i] = -2
            self.progress[0] = -2
        flat = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.slots: list[list[torch.Tensor]] = [
            [aux_view(flat, head + i * self.slot_bytes + off, dtype, shape)
             for (dtype, shape), off in zip(fields, offsets, strict=True)]
            for i in range(num_slots)]

    # -- the filler (a rank > 0, in its hook)
    def copy_in(self, ordinal: int, sources: Sequence[torch.Tensor], wait_s: float = 0.0) -> bool:
        """Copy ``sources`` into a free slot and publish it tagged ``ordinal``; False when none
        is free (within ``wait_s``: ``on_full: block`` waits as rank 0 does for its own slot)."""
        deadline = time.monotonic() + wait_s
        while True:
            i = self.states.acquire()
            if i is not None:
                try:
                    torch._foreach_copy_(self.slots[i], list(sources))
                except BaseException:  # the reader must not wait for this collection, nor the slot stay taken
                    self.states.release(i)
                    self.progress[0] = ordinal
                    raise
                self.tags[i] = ordinal  # after the data, and the state after the tag: the worker reads them first
                self.states.publish(i)
                self.progress[0] = ordinal
                return True
            if time.monotonic() >= deadline:
                self.progress[0] = ordinal
                return False
            time.sleep(0.0005)

    # -- the reader (rank 0's worker)
    def find(self, ordinal: int) -> int | None:
        """The published slot tagged ``ordinal`` (look once ``progress`` has reached it), or None."""
        for i in self.states.published():
            if self.tags[i] == ordinal:
                return i
        return None

    def release_through(self, ordinal: int) -> None:
        """Free every published slot tagged ``ordinal`` or earlier: collections the reader
        dropped, or has finished with. A slot being filled (TAKEN) is never freed here."""
        for i in self.states.published():
            if self.tags[i] <= ordinal:
                self.states.release(i)

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _shared_zeros(numel: int, dtype: torch.dtype, shared: bool, pin: bool) -> torch.Tensor:
    # zeros, not empty: touching every page now makes a too-small /dev/shm fail here,
    # at start(), rather than with SIGBUS in the middle of training.
    flat = torch.zeros(max(numel, 1), dtype=dtype, device="cpu")
    if shared:
        flat.share_memory_()
    if pin:
        pin_in_place(flat)
    return flat


def pin_in_place(t: torch.Tensor) -> None:
    """Page-lock a shared CPU tensor so device->host copies into it can be asynchronous."""
    if t.numel() == 0:
        return
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:  # not fatal: copies into it are then synchronous, still exact
        os.environ.setdefault("TRAIN_TELEMETRY_PIN_FAILED", str(int(err)))


# From this many tensors on, the hook copies the weights with one ``torch.cat`` per dtype into
# the slot's flat buffer and stacks the gradient norms into one tensor: per tensor, a
# ``_foreach_copy_`` costs ~1 us and each 0-d norm view another copy, against ~0.5 us per
# input of a cat (scripts/many_tensors_bench.py: 20,000 tensors of 256 floats).
MANY_TENSORS = 1000


def flat_sources(layout: Layout) -> list[tuple[torch.dtype, list[torch.Tensor]]] | None:
    """Per dtype (the slot's flat buffers' order), 1-D views of the layout's sources, for one
    ``torch.cat(out=)`` per dtype; None where that does not apply (few tensors, FSDP2 shards
    that are re-read at each collection, CUDA, or a non-contiguous tensor)."""
    sources = layout.sources
    if len(sources) < MANY_TENSORS or layout.sharded or layout.on_cuda:
        return None
    if not all(t.is_contiguous() for t in sources):
        return None
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in sources:
        out.setdefault(t.dtype, []).append(t.view(-1))  # views of the live weights: read at each copy
    return list(out.items())


# Many tensors of one shape: ``torch.stack`` of each shape's gradients and one norm per row
# costs ~1 us per tensor here, ``_foreach_norm`` (a per-tensor loop on the CPU) ~3 us plus
# freeing its 0-d results. Worth it where the shapes repeat this often on average.
SAME_SHAPE_MIN = 8


@dataclass
class ShapeGroups:
    """The parameters grouped by (shape, dtype), decided once (``shape_groups``), for
    ``grad_norms`` on many small CPU gradients: per group, its members' indices."""

    members: list[list[int]]
    at: list[torch.Tensor]  # the same indices, as index tensors
    numel: list[int]  # elements per member of each group


def shape_groups(params: Sequence[torch.Tensor]) -> ShapeGroups | None:
    """``params`` by (shape, dtype) when there are many and their shapes repeat (float32/64 on
    the CPU only: the row norms below are computed in the gradients' dtype); else None."""
    if len(params) < MANY_TENSORS or any(p.is_cuda or p.dtype not in (torch.float32, torch.float64) for p in params):
        return None
    by: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        by.setdefault((tuple(p.shape), p.dtype), []).append(i)
    if len(params) < SAME_SHAPE_MIN * len(by):
        return None
    members = list(by.values())
    return ShapeGroups(members=members, at=[torch.tensor(m, dtype=torch.int64) for m in members],
                       numel=[params[m[0]].numel() for m in members])


def grouped_norms(grads: list[torch.Tensor], groups: ShapeGroups) -> torch.Tensor:
    """float64 [n]: each gradient's norm, one stack and one row norm per (shape, dtype) group."""
    out = torch.empty(len(grads), dtype=torch.float64)
    for members, at, numel in zip(groups.members, groups.at, groups.numel, strict=True):
        block = torch.stack([grads[i] for i in members]).reshape(len(members), numel)  # [k, numel]: a copy
        out[at] = torch.linalg.vector_norm(block, dim=1).double()
    return out


def weight_fingerprint(tensors: Sequence[torch.Tensor], groups: ShapeGroups | None = None) -> torch.Tensor:
    """0-d float64 on the tensors' device: the sum of their squares (the replica check:
    replicas hold bitwise-equal weights, so theirs are equal). Each tensor's norm in float32
    (bf16/fp16 upcast: their own precision would hide a difference below 1e-3), added in
    float64. float64 norms would be exact to the last bit but cost 30x on the CPU (37 vs
    1.1 ms for 34 MB); the check's tolerance allows for float32 summation instead.
    ``groups`` (many small tensors, ``shape_groups``): one stack per shape, not a norm per tensor."""
    if groups is not None:
        parts = [torch.linalg.vector_norm(torch.stack([tensors[i] for i in members])).double().square()
                 for members in groups.members]
        return torch.stack(parts).sum()
    wide = all(t.dtype in (torch.float32, torch.float64) for t in tensors)
    norms = torch._foreach_norm(list(tensors)) if wide else torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
    return torch.stack(norms).double().square().sum()  # stack promotes mixed float32/float64 norms


def grad_norms(params: Sequence[torch.nn.Parameter], stack: bool,
               groups: ShapeGroups | None = None) -> list[torch.Tensor] | torch.Tensor | None:
    """Each parameter's gradient norm, computed on the gradients' device; call under no_grad.

    Common case (every parameter has a dense gradient on one device): one fused
    ``_foreach_norm``, returned as its list of 0-d tensors (``stack=False``: the hook copies
    them into the slot's 0-d views in its one fused copy) or stacked into one tensor
    (``stack=True``, CUDA: one device-to-host copy instead of one per parameter).
    Otherwise a float64 CPU tensor with -1 for parameters without a gradient. None when no
    parameter has a gradient. ``groups`` (many small CPU tensors whose shapes repeat,
    ``shape_groups``): one stack and one row norm per shape instead of a norm per tensor.
    """
    grads = [g for p in params if (g := p.grad) is not None]
    if not grads:
        return None
    if groups is not None and len(grads) == len(params):
        try:
            return grouped_norms(grads, groups)
        except RuntimeError:  # a gradient unlike its parameter (sparse, another device): below
            pass
    if len(grads) == len(params) and not grads[0].is_sparse:
        try:
            norms = torch._foreach_norm(grads)
            return torch.stack(norms) if stack else list(norms)
        except RuntimeError:  # sparse or on several devices: the general path below
            pass
    # Rare (some params without grads, sparse grads, a model split over devices): one
    # small sync per tensor, norms gathered on the CPU.
    out = torch.full((len(params),), -1.0, dtype=torch.float64)
    for i, p in enumerate(params):
        g = p.grad
        if g is not None:
            out[i] = (g.coalesce().values() if g.is_sparse else g).norm().double().cpu()
    return out


WAIT_FOR_RANK_S = 30.0  # a reader waits this long for a rank's shards before recording them missing


def find_shards(r: int, f: SlotFile, ordinal: int, late: set[int]) -> int | str:
    """The slot of rank ``r``'s file holding collection ``ordinal``, or why there is none.

    Waits up to WAIT_FOR_RANK_S for the rank to reach the collection; a rank that did not
    (``late``) is not waited for again until it catches up, so one slow or stuck rank costs
    one wait, and its later collections are read again as soon as it copies them.
    """
    if r in late and f.progress[0] < ordinal:
        return f"rank {r} is behind (it did not reach an earlier collection in time): its shards are missing"
    late.discard(r)
    deadline = time.monotonic() + WAIT_FOR_RANK_S
    while f.progress[0] < ordinal:
        if time.monotonic() > deadline:
            late.add(r)
            return f"rank {r}'s shards of this collection did not arrive within {WAIT_FOR_RANK_S:.0f} s"
        time.sleep(0.0005)
    i = f.find(ordinal)
    if i is not None:
        return i
    return (f"rank {r} has no shards of this collection (it had no free snapshot slot: raise num_slots; or its copy "
            "failed: its warning says why): its shards are missing")
