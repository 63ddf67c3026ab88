"""FSDP2 (``fully_shard``): exact telemetry of a model whose parameters are sharded DTensors.

Runs in: every rank's training process (``ShardSync``; at ``start()`` and
at collection steps) and rank 0's worker (``Assembler``). See docs/distributed.md.

Design (NOTE [sharded snapshots]):

- **Gradient norms, loss, accuracy and label counts** are summed over ranks by the one
  collective a collection step runs (the same all_reduce DDP runs for the label counts,
  decided by the step number alone): each rank adds the squares of its *local* shards'
  gradient norms (one ``_foreach_norm``), its loss, its correct predictions and its label
  counts to one float64 vector. After the all_reduce, rank 0 has each parameter's global
  gradient norm ``sqrt(sum over ranks)``, the mean loss, the global accuracy and counts:
  what one process with the full model and the global batch would record. Replicated
  parameters (plain tensors, or ``Replicate()`` DTensors) count rank 0's value only. A
  rank that cannot compute its share of a part (RANK_PARTS: its labels cannot be read,
  say) marks that part in the vector; rank 0's worker records the part as null with an
  error naming the rank (``RankFailed``), never a sum this rank's share is missing from.
- **Weights** never cross a collective and no rank materialises the full model on the
  training path: each rank copies its *local* shards into its own shared-memory slots
  (rank 0: the usual SlotPool; rank r > 0: a named file in /dev/shm, snapshot.SlotFile: the
  same slot protocol, announced by the collection's ordinal instead of the ring).
  Rank 0's worker maps every rank's file, waits for the shards of the collection it is
  building (each slot is tagged with the collection's *ordinal*: the number of due
  collection steps before it, the same on every rank), and assembles full tensors in its
  own memory (``Assembler``). From there everything is the single-process path: weight
  norms, deltas against rank 0's full reference checkpoint, the holdout forward on a plain
  (unsharded) copy of the model, layers, activations and user metrics. The worker frees
  the other ranks' slots after the record is written, so a replacement worker replays
  exactly as it does for rank 0's slots.
- A rank with no free slot copies nothing and says so (its ``progress`` counter moves on);
  the record then has no weight metrics, with an error naming the rank, never a wrong
  value. Ranks on another host than rank 0 cannot share memory with its worker: the run
  then records no weight metrics (each record says why) and the rest stays exact.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .batches import logits_of
from .config import TelemetryConfigError
from .messages import TensorSpec
from .metrics.batch import COUNT_VECTOR_LEN, batch_accuracy, count_vector
from .snapshot import RANK_PARTS, SlotFile, local_tensor

__all__ = ["ShardPlan", "ShardSync", "Assembler", "RankFailed", "has_dtensor_params", "plain_skeleton",
           "plan_shards", "unsupported_sharding"]

SHM_DIR = "/dev/shm"
WAIT_FOR_RANK_S = 30.0  # the worker waits this long for a rank's shards before recording them missing


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def has_dtensor_params(model: torch.nn.Module) -> bool:
    """Whether ``model`` has DTensor parameters (FSDP2 ``fully_shard``, or tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def unsupported_sharding(model: torch.nn.Module) -> str | None:
    """Why ``model``'s sharding cannot be recorded exactly (FSDP1, DeepSpeed ZeRO-3), or None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # type: ignore[assignment,misc]  # noqa: N806
    if FullyShardedDataParallel is not None and any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return ("the model is wrapped in FSDP1 (FullyShardedDataParallel): its parameters are flattened shards, "
                "so records would describe rank 0's shard, not the model. Use FSDP2 (torch.distributed.fsdp."
                "fully_shard), which telemetry records exactly, or set enabled: false")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return ("the model's parameters are partitioned by DeepSpeed ZeRO-3: each rank holds a shard, so records "
                "would describe rank 0's shard, not the model. Use FSDP2 (fully_shard) or ZeRO stage 1-2, "
                "or set enabled: false")
    return None


# ---------------------------------------------------------------------- the plan
@dataclass
class ShardPlan:
    """How the full tensors of a sharded model are cut over the ranks (agreed at ``start()``).

    Per layout tensor (parameters, then buffers): ``dims[j]`` is the dimension the ranks'
    shards are cut along, or None when rank 0's copy is the whole tensor (replicated);
    ``sizes[j][r]`` is rank r's length along it. Sharded tensors are stored in each rank's
    slot in layout order; ``paths[r]`` is rank r's shard file (None for rank 0, whose
    shards are in its SlotPool).
    """

    world_size: int
    specs: list[TensorSpec]  # global shapes
    dims: list[int | None]
    sizes: list[list[int]]
    num_slots: int
    paths: list[str | None] = field(default_factory=list)
    same_host: bool = True
    hosts: int = 1

    @property
    def sharded(self) -> list[int]:
        """Indices (in layout order) of the tensors cut over the ranks."""
        return [j for j, d in enumerate(self.dims) if d is not None]

    def local_shape(self, j: int, rank: int) -> tuple[int, ...]:
        shape = list(self.specs[j].shape)
        d = self.dims[j]
        if d is not None:
            shape[d] = self.sizes[j][rank]
        return tuple(shape)

    def file_specs(self, rank: int) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype) of what rank ``rank``'s shard file holds per slot."""
        return [(self.local_shape(j, rank), self.specs[j].dtype) for j in self.sharded]


def plan_shards(tensors: Sequence[tuple[str, torch.Tensor]], num_slots: int) -> ShardPlan | Exception:
    """Every rank: describe its shards, gather the descriptions, agree on one plan.

    Called on every rank at ``start()`` before anything that can fail on one rank only (one
    ``all_gather_object``), so the ranks always make the same collectives. Returns the plan,
    or the error every rank raises (the same on each).
    """
    dist = torch.distributed
    world = dist.get_world_size()
    mine: dict[str, Any] = {"host": host_identity(dist.get_rank(), world), "token": uuid.uuid4().hex[:12], "error": None}
    try:
        mine["tensors"] = [_describe(name, t, world) for name, t in tensors]
    except Exception as exc:
        mine["error"] = f"rank {dist.get_rank()}: {exc}"
    said: list[Any] = [None] * world
    dist.all_gather_object(said, mine)
    errors = [s["error"] for s in said if s["error"]]
    if errors:
        return TelemetryConfigError(f"this sharded model is not supported: {errors[0]}")
    first = said[0]["tensors"]
    specs: list[TensorSpec] = []
    dims: list[int | None] = []
    sizes: list[list[int]] = []
    for j, (name, shape, dtype, dim, _coord, _length) in enumerate(first):
        specs.append(TensorSpec(name, tuple(shape), dtype))
        dims.append(dim)
        if dim is None:
            sizes.append([])
            continue
        by_coord = {s["tensors"][j][4]: s["tensors"][j][5] for s in said}
        if sorted(by_coord) != list(range(world)):
            return TelemetryConfigError(
                f"parameter {name!r} is sharded over a mesh that is not one shard per rank of the whole "
                "job (HSDP, or FSDP over a subgroup): not supported; use fully_shard over all ranks")
        sizes.append([by_coord[c] for c in range(world)])
        if sum(sizes[-1]) != shape[dim]:
            return TelemetryConfigError(f"parameter {name!r}: its shards do not add up to its shape {tuple(shape)}")
    token = said[0]["token"]
    hosts = len({s["host"] for s in said})
    same_host = hosts == 1
    plan = ShardPlan(world_size=world, specs=specs, dims=dims, sizes=sizes, num_slots=num_slots,
                     same_host=same_host, hosts=hosts)
    plan.paths = [None, *(os.path.join(SHM_DIR, f"train-telemetry-{token}-rank{r}") if same_host else None
                          for r in range(1, world))]
    return plan


TEST_HOSTS_ENV = "TRAIN_TELEMETRY_TEST_HOSTS"


def host_identity(rank: int, world: int) -> str:
    """The host this rank runs on: its hostname. For tests only, ``TRAIN_TELEMETRY_TEST_HOSTS=N``
    puts rank r on host ``r * N // world``, so that one machine stands in for N hosts that
    share no memory (the multi-host path, tested without a second machine)."""
    hosts = os.environ.get(TEST_HOSTS_ENV)
    if hosts:
        return f"test-host-{rank * int(hosts) // world}"
    return socket.gethostname()


def _describe(name: str, t: torch.Tensor, world: int) -> tuple[str, list[int], str, int | None, int, int]:
    """(name, global shape, dtype, shard dim or None, this rank's mesh coordinate, local length)."""
    dtype = str(t.dtype).removeprefix("torch.")
    placements = getattr(t, "placements", None)
    if placements is None:  # a plain tensor: every rank holds all of it (rank 0's copy is recorded)
        return name, list(t.shape), dtype, None, 0, 0
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1:
        raise ValueError(f"parameter {name!r} lives on a {mesh.ndim}-D device mesh (HSDP or tensor parallelism): "
                         "only fully_shard over a 1-D mesh of all ranks is supported")
    placement = placements[0]
    if isinstance(placement, Replicate):
        return name, list(t.shape), dtype, None, 0, 0
    if not isinstance(placement, Shard):
        raise ValueError(f"parameter {name!r} has placement {placement}: only Shard and Replicate are supported")
    if mesh.size() != world:
        raise ValueError(f"parameter {name!r} is sharded over {mesh.size()} of the {world} ranks (HSDP, or FSDP "
                         "over a subgroup): only fully_shard over all ranks is supported")
    coord = mesh.get_coordinate()
    local = local_tensor(t)
    dim = placement.dim % max(t.dim(), 1)
    return name, list(t.shape), dtype, dim, int(coord[0]) if coord else 0, int(local.shape[dim])


# ---------------------------------------------------------------------- the hook's collective
class RankFailed(RuntimeError):
    """A rank could not add its share to a part of a collection's global values (RANK_PARTS)."""


class ShardSync:
    """The collection step's one collective under FSDP2, and the shard copy of ranks > 0.

    The vector (float64): loss sum and count, correct predictions and rows, each
    parameter's squared local gradient norm and whether it has a gradient, the
    label-count vector, then per RANK_PARTS (ranks that could not add their share, the
    sum of those ranks).
    """

    HEAD = 4

    def __init__(self, params: Sequence[torch.nn.Parameter], plan: ShardPlan, rank: int, device: torch.device,
                 formats: Any, want_counts: bool) -> None:
        self.params = list(params)
        self.plan = plan
        self.rank = rank
        self.device = device
        self.formats = formats
        self.want_counts = want_counts
        n = len(self.params)
        self.n = n
        self.counts_at = self.HEAD + 2 * n
        self.failed_at = self.counts_at + COUNT_VECTOR_LEN
        self.size = self.failed_at + 2 * len(RANK_PARTS)
        # rank 0 counts every parameter; the others only their shards (replicated ones are rank 0's)
        owned = [1.0 if rank == 0 or plan.dims[j] is not None else 0.0 for j in range(n)]
        self.owned = torch.tensor(owned, dtype=torch.float64, device=device)
        self.file: SlotFile | None = None
        self.sources: list[torch.Tensor] = []
        self.failures: list[tuple[str, Exception]] = []  # this rank's failed parts at the last reduce

    def reduce(self, batch: Any, loss: Any, outputs: Any) -> torch.Tensor:
        """All ranks: build this rank's vector and all_reduce it (SUM). Never raises before the collective.

        A part this rank cannot compute (its labels cannot be read, say) is marked failed
        in the vector, and ``failures`` says why: rank 0 then records that part as null with
        an error naming this rank. Left at zero, it would make rank 0 record a global value
        this rank's share is missing from (an under-counted gradient norm): a wrong value.
        """
        vec = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        self.failures = []
        try:
            self._fill(vec, batch, loss, outputs)
        except Exception as exc:  # outside the guarded parts: none of this rank's share counts
            for where in RANK_PARTS:
                self._fail(vec, where, exc)
        torch.distributed.all_reduce(vec)
        return vec

    def _fail(self, vec: torch.Tensor, where: str, exc: Exception) -> None:
        at = self.failed_at + 2 * RANK_PARTS.index(where)
        vec[at] = 1.0
        vec[at + 1] = float(self.rank)
        self.failures.append((where, exc))

    def _fill(self, vec: torch.Tensor, batch: Any, loss: Any, outputs: Any) -> None:
        """This rank's share, part by part: a part that fails is marked, the others still count."""
        try:
            self._add_grad_norms(vec)
        except Exception as exc:
            self._fail(vec, "gradient_norm", exc)
        try:
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                vec[0] = loss.detach().reshape(()).to(vec.device, torch.float64)
                vec[1] = 1.0
            elif isinstance(loss, (int, float)):
                vec[0], vec[1] = float(loss), 1.0
        except Exception as exc:
            self._fail(vec, "train_loss", exc)
        labels = None
        if (batch is None or self.formats is None) and self.want_counts:
            # no batch from this rank: the counts say "unknown", as DDP's do (distributed.global_counts)
            vec[self.counts_at : self.failed_at] = count_vector(None, None, vec.device)
        elif batch is not None and self.formats is not None:
            try:
                fmt = self.formats.get(batch)
                labels = fmt.labels(batch)
                if self.want_counts:
                    vec[self.counts_at : self.failed_at] = count_vector(labels, fmt.batch_size(batch), vec.device)
            except Exception as exc:  # the labels are what both parts need
                if self.want_counts:
                    self._fail(vec, "batch_stats", exc)
                if outputs is not None:
                    self._fail(vec, "train_accuracy", exc)
                return
        if outputs is not None and isinstance(labels, torch.Tensor) and labels.dim() > 0:
            try:
                out = outputs if isinstance(outputs, torch.Tensor) else logits_of(outputs)
                rows = labels.shape[0]
                vec[2] = batch_accuracy(out, labels).to(vec.device, torch.float64) * rows
                vec[3] = float(rows)
            except Exception as exc:
                self._fail(vec, "train_accuracy", exc)

    def _add_grad_norms(self, vec: torch.Tensor) -> None:
        n, head = self.n, self.HEAD
        grads = [g for p in self.params if (g := p.grad) is not None]
        if not grads:
            return
        locals_ = [local_tensor(g) for g in grads]
        if len(grads) == n:
            norms = torch.stack(torch._foreach_norm(locals_)).to(vec.device, torch.float64)
            vec[head : head + n] = norms.square() * self.owned
            vec[head + n : head + 2 * n] = self.owned
            return
        it = iter(torch._foreach_norm(locals_))
        for j, p in enumerate(self.params):
            if p.grad is not None:
                value = next(it)
                if self.owned[j]:
                    vec[head + j] = value.double().square()
                    vec[head + n + j] = 1.0

    def unpack(self, vec: torch.Tensor, want_loss: bool, want_accuracy: bool) -> dict[str, torch.Tensor | None]:
        """Rank 0: the global values, as tensors the hook copies into its slot (no host sync).

        ``failed`` goes into the slot as it is: rank 0's worker reads which parts some rank
        could not add to, and records those as null (processor.py), so the hook never
        waits for the collective's result to decide.
        """
        n, head = self.n, self.HEAD
        sq, has = vec[head : head + n], vec[head + n : head + 2 * n]
        norms = torch.where(has > 0, sq.sqrt(), torch.full_like(sq, -1.0))  # on the collective's device
        return {
            "norms": norms,
            "loss": (vec[0] / vec[1].clamp(min=1)).reshape(()) if want_loss else None,
            "accuracy": (vec[2] / vec[3].clamp(min=1)).float() if want_accuracy else None,
            "counts": vec[self.counts_at : self.failed_at].to(torch.int64) if self.want_counts else None,
            "failed": vec[self.failed_at :],
        }

    # -- ranks > 0: the shards
    def open_file(self, rank: int) -> None:
        path = self.plan.paths[rank]
        if path is None:
            return
        self.file = SlotFile(path, self.plan.num_slots, self.plan.file_specs(rank), create=True)
        self.sharded = self.plan.sharded

    def copy_shards(self, ordinal: int, all_tensors: Sequence[torch.Tensor], wait_s: float = 0.0) -> bool:
        """Rank > 0: copy this rank's shards (of ``all_tensors``, layout order) into a free slot."""
        if self.file is None:
            return False
        return self.file.copy_in(ordinal, [all_tensors[j] for j in self.sharded], wait_s)

    def close(self) -> None:
        if self.file is not None:
            self.file.unlink()


# ---------------------------------------------------------------------- rank 0's worker
class Assembler:
    """Rank 0's worker: full tensors of a collection from every rank's shards (same host)."""

    def __init__(self, plan: ShardPlan, rank0_slots: Sequence[Sequence[torch.Tensor]]) -> None:
        self.plan = plan
        self.rank0_slots = rank0_slots
        self.files: dict[int, SlotFile] = {}
        self.gone: set[int] = set()
        self.error: str | None = None
        self.full: dict[int, torch.Tensor] = {}
        self._held: list[tuple[int, int]] = []  # (rank, slot) to free after the record is written
        if not plan.same_host:
            self.error = (f"the ranks run on {plan.hosts} hosts: rank 0's worker cannot read the other hosts' "
                          "shards, so weight metrics (norms, deltas, holdout) are not recorded; gradient norms, "
                          "LRs, loss and batch statistics are exact")
            return
        for r in range(1, plan.world_size):
            path = plan.paths[r]
            assert path is not None
            self.files[r] = SlotFile(path, plan.num_slots, plan.file_specs(r), create=False)
        self.full = {j: torch.empty(plan.specs[j].shape, dtype=getattr(torch, plan.specs[j].dtype)) for j in plan.sharded}

    def tensors(self, slot: int, ordinal: int | None) -> tuple[list[torch.Tensor] | None, str | None]:
        """The full tensors (layout order) of the collection in rank 0's ``slot``; or None and why not.

        ``ordinal`` None: whatever the slots hold (the setup's check of the holdout forward).
        """
        if self.error is not None:
            return None, self.error
        parts: dict[int, list[torch.Tensor]] = {}
        for r, f in self.files.items():
            found = self._find(r, f, ordinal)
            if isinstance(found, str):
                return None, found
            parts[r] = f.slots[found]
            if ordinal is not None:
                self._held.append((r, found))
        mine = self.rank0_slots[slot]
        out: list[torch.Tensor] = []
        for j, t0 in enumerate(mine):
            d = self.plan.dims[j]
            if d is None:
                out.append(t0)
                continue
            full = self.full[j]
            k = self.plan.sharded.index(j)
            at = 0
            for r in range(self.plan.world_size):
                size = self.plan.sizes[j][r]
                if size:
                    full.narrow(d, at, size).copy_(t0 if r == 0 else parts[r][k])
                at += size
            out.append(full)
        return out, None

    def _find(self, r: int, f: SlotFile, ordinal: int | None) -> int | str:
        if ordinal is None:
            return 0
        if r in self.gone:
            return f"rank {r} stopped answering: its shards are missing"
        deadline = time.monotonic() + WAIT_FOR_RANK_S
        while f.progress[0] < ordinal:
            if time.monotonic() > deadline:
                self.gone.add(r)
                return f"rank {r}'s shards of this collection did not arrive within {WAIT_FOR_RANK_S:.0f} s"
            time.sleep(0.0005)
        i = f.find(ordinal)
        if i is not None:
            return i
        return f"rank {r} had no free snapshot slot at this collection (raise num_slots): its shards are missing"

    def release(self, ordinal: int | None) -> None:
        """After the record of ``ordinal`` is written: free the shards it used, and stale ones."""
        for r, i in self._held:
            self.files[r].states.release(i)
        self._held = []
        if ordinal is None:
            return
        for f in self.files.values():  # collections rank 0 dropped but another rank copied
            f.release_through(ordinal)


# ---------------------------------------------------------------------- the eval model
def plain_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` without FSDP: original classes, no FSDP hooks or state, and
    parameters and buffers on the meta device (no memory; the worker points them at the
    assembled tensors). Other attributes are shared with ``module`` until pickled."""
    return _skeleton(module, {})


def _orig_class(cls: type) -> type:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    for base in cls.__mro__[1:]:
        if issubclass(base, torch.nn.Module) and not issubclass(base, FSDPModule):
            return base
    return cls


def plain_type_name(module: torch.nn.Module) -> str:
    """The class name the user wrote (``Linear``, not FSDP's ``FSDPLinear``)."""
    return _orig_class(type(module)).__name__


def _is_fsdp_hook(fn: Any) -> bool:
    """Whether a module hook is FSDP's own (its state's bound method, or a torch.distributed function)."""
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        where = type(owner).__module__
    else:
        where = getattr(getattr(fn, "func", fn), "__module__", "") or ""
    return where.startswith("torch.distributed")


def _skeleton(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls: Any = _orig_class(type(module))
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state = {}
    for key, value in module.__dict__.items():
        if key.startswith("__composable_api_state_key") or key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            continue
        if key.endswith("hooks") and isinstance(value, dict):
            value = OrderedDict((k, fn) for k, fn in value.items() if not _is_fsdp_hook(fn))
        state[key] = value

    def meta(t: torch.Tensor | None, param: bool) -> Any:
        if t is None:
            return None
        if id(t) not in memo:  # tied weights stay tied
            empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
            memo[id(t)] = torch.nn.Parameter(empty, requires_grad=False) if param else empty
        return memo[id(t)]

    state["_parameters"] = {name: meta(p, True) for name, p in module._parameters.items()}
    state["_buffers"] = {name: meta(b, False) for name, b in module._buffers.items()}
    state["_modules"] = {name: None if m is None else _skeleton(m, memo) for name, m in module._modules.items()}
    clone.__dict__.update(state)
    return clone


def materialize(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    """Point a ``plain_skeleton``'s parameters and buffers at ``tensors`` (layout order:
    ``named_parameters()`` then ``named_buffers()``)."""
    params = [p for _, p in model.named_parameters()]
    buffers = [b for _, b in model.named_buffers()]
    if len(params) + len(buffers) != len(tensors):
        raise RuntimeError(f"the model copy has {len(params) + len(buffers)} tensors, the snapshot {len(tensors)}")
    new: dict[int, torch.Tensor] = {}
    for p, t in zip(params, tensors[: len(params)], strict=True):
        new[id(p)] = torch.nn.Parameter(t, requires_grad=False)
    for b, t in zip(buffers, tensors[len(params) :], strict=True):
        new[id(b)] = t.detach()  # a new tensor on the same memory: bind_model re-points it, never the slot
    for m in model.modules():
        for name, p_ in m._parameters.items():
            if p_ is not None:
                m._parameters[name] = new[id(p_)]  # type: ignore[assignment]
        for name, b_ in m._buffers.items():
            if b_ is not None:
                m._buffers[name] = new[id(b_)]
