"""FSDP2 (``fully_shard``; HSDP; FSDP2 + tensor parallel): exact telemetry of a model whose parameters
are DTensors on a 1-D or 2-D device mesh.

Runs in: every rank's training process (``ShardSync``; at ``start()`` and
at collection steps) and rank 0's worker (``Assembler``). See docs/distributed.md.

Design (NOTE [sharded snapshots]):

- **Gradient norms, loss, accuracy and label counts** are summed over ranks by the one
  collective a collection step runs (the same all_reduce DDP runs for the label counts,
  decided by the step number alone): each rank adds the squares of its *local* shards'
  gradient norms (one ``_foreach_norm``), its loss, its correct predictions and its label
  counts to one float64 vector. After the all_reduce, rank 0 has each parameter's global
  gradient norm ``sqrt(sum over ranks)``, the mean loss, the global accuracy and counts:
  what one process with the full model and the global batch would record.
- **Each element counts once** (``ShardPlan.blocks``, agreed at ``start()``): every rank
  describes each tensor's block (local shape and offsets in the full tensor, from DTensor's
  own ``compute_local_shape_and_global_offset``; index lists where a ``_StridedShard``
  makes rows non-contiguous). A block counts on the ranks of rank 0's mesh whose
  coordinate is 0 on every ``Replicate()`` mesh dim; replicas elsewhere, copies on other
  sub-meshes (a non-TP layer on the other TP rank's "dp" mesh) and plain tensors on ranks
  > 0 do not: their squared norms are multiplied by 0 (``owned``) and the worker assembles
  counted blocks only. Partial gradients are redistributed to their parameter's placements
  first (the sum of the partial terms). Only the data-parallel ranks (rank 0's
  ``fully_shard`` mesh) add their loss, accuracy and label counts: a TP peer trains on its
  dp rank's rows. A
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
  value; so does a rank whose copy fails (the slot is freed and ``progress`` moves on).
- Ranks on another host than rank 0 cannot share memory with its worker. A rank's file is
  in its own host's /dev/shm; where counted blocks lie on another host (``cross_host``),
  that host's worker sums its blocks' squares and rank 0's worker adds the hosts' sums
  (NOTE [hosts] in hosts.py): weight norms, deltas and update ratios stay exact, the
  holdout is absent and each record says why.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .batches import logits_of
from .config import TelemetryConfigError
from .messages import TensorSpec
from .metrics.batch import COUNT_VECTOR_LEN, batch_accuracy, count_vector
from .snapshot import (
    RANK_PARTS,
    SlotFile,
    find_shards,
    grouped_norms,
    local_tensor,
    shape_groups,
    weight_fingerprint,
)

__all__ = ["ShardPlan", "ShardSync", "ShardFiles", "Assembler", "RankFailed", "has_dtensor_params", "plain_skeleton",
           "plan_shards", "unsupported_sharding"]

SHM_DIR = "/dev/shm"


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
# Where one rank's local tensor sits in the full tensor, per dimension: (start, length) for a
# contiguous range, or the list of global indices (a ``_StridedShard`` under FSDP2 + TP can
# give a rank rows that are not contiguous when the shards are uneven).
Index = tuple[int, int] | list[int]


@dataclass(frozen=True)
class Block:
    """One rank's part of one full tensor: its local shape and where it sits (``Index`` per dim)."""

    shape: tuple[int, ...]
    index: tuple[Index, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _whole(shape: Sequence[int]) -> Block:
    return Block(tuple(shape), tuple((0, d) for d in shape))


@dataclass
class ShardPlan:
    """How the full tensors of a sharded model are cut over the ranks (agreed at ``start()``).

    Per layout tensor (parameters, then buffers) ``j``, ``blocks[j][r]`` is the part of the
    full tensor rank r's local tensor holds *and is counted for*, or None: rank r's copy is
    not used, because it is a replica of a block another rank counts (a ``Replicate()`` mesh
    dimension where r's coordinate is not 0, a copy of the tensor on another sub-mesh, a
    plain tensor on a rank > 0). The used blocks of a tensor tile it exactly once. A tensor
    whose rank 0 block is the whole of it is "whole" (rank 0's copy is recorded, as for one
    process); the others are "sharded": stored in each using rank's slot in layout order and
    assembled by rank 0's worker. ``paths[r]`` is rank r's shard file (None for rank 0,
    whose shards are in its SlotPool, and for ranks that hold no used block).

    ``data_ranks``: the ranks whose batch, loss and outputs count (the data-parallel ranks of
    rank 0's FSDP mesh); a tensor-parallel peer sees the same batch as its data-parallel
    rank and adds nothing to the loss, accuracy or label counts.

    The 1-D form of the first version (``dims``: the dimension cut, ``sizes[j][r]``: rank r's
    length along it) still builds a plan (the unit tests use it).
    """

    world_size: int
    specs: list[TensorSpec]  # global shapes
    dims: list[int | None] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)
    num_slots: int = 2
    paths: list[str | None] = field(default_factory=list)
    hosts: int = 1
    blocks: list[list[Block | None]] = field(default_factory=list)
    data_ranks: list[int] | None = None  # None: every rank
    # several hosts (hosts.py): each rank's host (rank 0's is 0), the job's c10d store, this run's token
    host_of: list[int] = field(default_factory=list)
    store: tuple[str, int] | None = None
    token: str = ""
    # ranks whose local tensors are the same blocks of every tensor (HSDP: a shard's replicas
    # across the replicate dim): their weights should be equal (the replica check, replicas.py)
    replica_groups: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.blocks:
            return
        for j, spec in enumerate(self.specs):  # the 1-D form: contiguous cuts along one dim
            d = self.dims[j] if j < len(self.dims) else None
            if d is None:
                self.blocks.append([_whole(spec.shape), *([None] * (self.world_size - 1))])
                continue
            row: list[Block | None] = []
            at = 0
            for r in range(self.world_size):
                size = self.sizes[j][r]
                shape = list(spec.shape)
                shape[d] = size
                index = [(0, n) for n in spec.shape]
                index[d] = (at, size)
                row.append(Block(tuple(shape), tuple(index)))
                at += size
            self.blocks.append(row)

    @property
    def sharded(self) -> list[int]:
        """Indices (in layout order) of the tensors assembled from several ranks."""
        return [j for j, row in enumerate(self.blocks) if not self.is_whole(j)]

    def is_whole(self, j: int) -> bool:
        b0 = self.blocks[j][0]
        return b0 is not None and b0.shape == tuple(self.specs[j].shape) and all(b is None for b in self.blocks[j][1:])

    def owned(self, rank: int) -> list[float]:
        """1.0 for each tensor whose local copy this rank counts (its gradient norm, say), else 0.0."""
        return [0.0 if row[rank] is None else 1.0 for row in self.blocks]

    def counts_data(self, rank: int) -> bool:
        return self.data_ranks is None or rank in self.data_ranks

    def ranks_on(self, host: int) -> list[int]:
        return [r for r, h in enumerate(self.host_of) if h == host]

    def remote_hosts(self) -> list[int]:
        """The hosts other than rank 0's whose ranks count some block (hosts.py combines their numbers)."""
        return sorted({h for r, h in enumerate(self.host_of) if h != 0 and self.file_tensors(r)})

    @property
    def cross_host(self) -> bool:
        """Whether counted blocks lie on another host than rank 0's (an HSDP run that replicates
        across hosts keeps them all on rank 0's host: then everything is read through shared memory)."""
        return bool(self.host_of) and bool(self.remote_hosts())

    def file_tensors(self, rank: int) -> list[int]:
        """The tensors (layout order) rank ``rank`` (> 0) copies into its shard file."""
        return [j for j in self.sharded if self.blocks[j][rank] is not None]

    def local_shape(self, j: int, rank: int) -> tuple[int, ...]:
        block = self.blocks[j][rank]
        return tuple(self.specs[j].shape) if block is None else block.shape

    def file_specs(self, rank: int) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype) of what rank ``rank``'s shard file holds per slot."""
        return [(self.local_shape(j, rank), self.specs[j].dtype) for j in self.file_tensors(rank)]


PIPELINE_HINT = ("pipeline parallelism (each stage holds its own parameters) is not supported: set enabled: false "
                 "for pipeline-parallel runs")


def plan_shards(tensors: Sequence[tuple[str, torch.Tensor]], num_slots: int,
                model: torch.nn.Module | None = None) -> ShardPlan | Exception:
    """Every rank: describe its shards, gather the descriptions, agree on one plan.

    Called on every rank at ``start()`` before anything that can fail on one rank only (one
    ``all_gather_object``), so the ranks always make the same collectives. Returns the plan,
    or the error every rank raises (the same on each).
    """
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    mine: dict[str, Any] = {"host": host_identity(rank, world), "token": uuid.uuid4().hex[:12], "error": None,
                            "store": store_address() if rank == 0 else None}
    try:
        mine["tensors"] = [_describe(name, t) for name, t in tensors]
        mine["data_mesh"] = _data_mesh_ranks(model) if model is not None else None
    except Exception as exc:
        mine["error"] = f"rank {rank}: {exc}"
    said: list[Any] = [None] * world
    dist.all_gather_object(said, mine)
    errors = [s["error"] for s in said if s["error"]]
    if errors:
        return TelemetryConfigError(f"this sharded model is not supported: {errors[0]}")
    try:
        plan = _agree(said, world, num_slots)
    except ValueError as exc:
        return TelemetryConfigError(f"this sharded model is not supported: {exc}")
    plan.token = token = said[0]["token"]
    plan.store = said[0]["store"]
    # each rank's file is in its own host's shared memory: rank 0's worker reads those on its host,
    # a host worker (hosts.py) those on another
    plan.paths = [None, *(os.path.join(SHM_DIR, f"train-telemetry-{token}-rank{r}")
                          if plan.file_tensors(r) else None for r in range(1, world))]
    return plan


def _agree(said: list[dict[str, Any]], world: int, num_slots: int) -> ShardPlan:
    """The plan from every rank's description (the same on every rank); ValueError says what is wrong."""
    first = said[0]["tensors"]
    signature = [(d["name"], d["shape"], d["dtype"]) for d in first]
    for r, s in enumerate(said):
        theirs = [(d["name"], d["shape"], d["dtype"]) for d in s["tensors"]]
        if theirs != signature:
            diff = next((f"{a} vs {b}" for a, b in zip(signature, theirs, strict=False) if a != b),
                        f"{len(signature)} vs {len(theirs)} tensors")
            raise ValueError(f"rank {r} holds other parameters than rank 0 ({diff}): {PIPELINE_HINT}")
    specs = [TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in signature]
    blocks: list[list[Block | None]] = []
    for j, spec in enumerate(specs):
        d0 = first[j]
        if d0["mesh"] is None:  # a plain tensor: every rank holds all of it; rank 0's copy counts
            blocks.append([_whole(spec.shape), *([None] * (world - 1))])
            continue
        row: list[Block | None] = []
        for s in said:
            d = s["tensors"][j]
            used = d["mesh"] == d0["mesh"] and not d["replica"]
            row.append(Block(tuple(d["block"][0]), tuple(d["block"][1])) if used else None)
        total = sum(b.numel for b in row if b is not None)
        numel = _whole(spec.shape).numel
        if total != numel:
            raise ValueError(f"parameter {spec.name!r}: the ranks' blocks hold {total} of its {numel} elements "
                             f"(placements {d0['placements']} on mesh {d0['mesh']})")
        blocks.append(row)
    data_mesh = said[0]["data_mesh"]
    if data_mesh is None and any(d["mesh"] is not None and d["model_parallel"] for d in first):
        raise ValueError("DTensor parameters without fully_shard (tensor parallelism alone): which ranks see "
                         "different batches is not known; apply fully_shard over the data-parallel mesh dimension "
                         "(FSDP2 + TP), or set enabled: false")
    host_index: dict[str, int] = {}
    host_of = [host_index.setdefault(s["host"], len(host_index)) for s in said]  # rank 0's host is 0
    same_blocks: dict[str, list[int]] = {}
    for r, s in enumerate(said):  # every tensor's block, with the mesh's shape but not its ranks
        key = repr([(d["block"], d["placements"], d["mesh"] and d["mesh"][d["mesh"].index(-1):]) for d in s["tensors"]])
        same_blocks.setdefault(key, []).append(r)
    replica_groups = [ranks for ranks in same_blocks.values() if len(ranks) > 1]
    return ShardPlan(world_size=world, specs=specs, num_slots=num_slots, hosts=len(host_index), blocks=blocks, host_of=host_of, replica_groups=replica_groups,
                     data_ranks=None if data_mesh is None or len(data_mesh) == world else list(data_mesh))


def store_address() -> tuple[str, int] | None:
    """Host and port of this job's c10d TCPStore (the one ``init_process_group`` made), or None."""
    try:
        store: Any = torch.distributed.distributed_c10d._get_default_store()
    except Exception:
        return None
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    return (str(host), int(port)) if host and port else None


TEST_HOSTS_ENV = "TRAIN_TELEMETRY_TEST_HOSTS"


def host_identity(rank: int, world: int) -> str:
    """The host this rank runs on: its hostname. For tests only, ``TRAIN_TELEMETRY_TEST_HOSTS=N``
    puts rank r on host ``r * N // world``, so that one machine stands in for N hosts that
    share no memory (the multi-host path, tested without a second machine)."""
    hosts = os.environ.get(TEST_HOSTS_ENV)
    if hosts:
        return f"test-host-{rank * int(hosts) // world}"
    return socket.gethostname()


def _data_mesh_ranks(model: torch.nn.Module) -> list[int] | None:
    """The ranks of the first FSDP2 mesh in ``model`` (the mesh ``fully_shard`` was given: its
    ranks see different batches), or None without ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        return None
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = fully_shard.state(m)  # type: ignore[attr-defined]
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            info = getattr(group, "mesh_info", None)
            if info is not None:
                return sorted(int(r) for r in info.mesh.mesh.flatten().tolist())
    return None


def _describe(name: str, t: torch.Tensor) -> dict[str, Any]:
    """What this rank holds of tensor ``name``: its mesh (the global ranks, None for a plain
    tensor), whether its copy is a replica (a Replicate() mesh dim where its coordinate is not
    0), and its block of the full tensor (DTensor's own layout: no layout re-derived here)."""
    out: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                           "mesh": None, "replica": False, "block": None, "placements": None, "model_parallel": False}
    placements = getattr(t, "placements", None)
    if placements is None:  # a plain tensor: every rank holds all of it (rank 0's copy is recorded)
        return out
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh  # type: ignore[attr-defined]
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"parameter {name!r} lives on a device mesh this rank is not part of")
    out["mesh"] = [int(r) for r in mesh.mesh.flatten().tolist()] + [-1, *mesh.mesh.shape]
    out["placements"] = str(tuple(placements))
    for dim, placement in enumerate(placements):
        if isinstance(placement, Partial):
            raise ValueError(f"parameter {name!r} has a Partial placement ({placement}) on mesh dim {dim}: its value is "
                             "a sum over ranks that no rank holds; keep parameters Shard or Replicate (Partial "
                             "gradients are fine: telemetry reduces them)")
        if isinstance(placement, Replicate) and coord[dim] != 0:
            out["replica"] = True
    out["model_parallel"] = len(placements) > 1 or not isinstance(placements[0], Replicate)
    shape, index = local_block(t.shape, mesh, placements)
    local = local_tensor(t)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"parameter {name!r}: its local tensor has shape {tuple(local.shape)}, but its placements "
                         f"{tuple(placements)} give {tuple(shape)}: a layout telemetry cannot place; set enabled: false")
    out["block"] = (list(shape), [list(i) if isinstance(i, list) else tuple(i) for i in index])
    return out


def local_block(global_shape: Sequence[int], mesh: Any, placements: Sequence[Any]) -> tuple[tuple[int, ...], list[Index]]:
    """This rank's local shape and its ``Index`` per dim of a DTensor (``global_shape``, ``mesh``, ``placements``).

    DTensor's own arithmetic: ``compute_local_shape_and_global_offset`` for the start of
    each dim, and, where a ``_StridedShard`` can make the rows non-contiguous, the per-dim
    global indices DTensor itself computes on the way (its ``_get_shard_size_and_offsets``).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tuple(global_shape), mesh, tuple(placements))
    index: list[Index] = [(int(o), int(s)) for o, s in zip(offset, shape, strict=True)]
    if not any(type(p).__name__ == "_StridedShard" for p in placements):
        return tuple(int(s) for s in shape), index
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import _utils as dt_utils

    coord = mesh.get_coordinate()
    local = list(global_shape)
    offsets: dict[int, torch.Tensor] = {}
    for mesh_dim, placement in enumerate(placements):
        if not (isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard"):
            continue
        d = placement.dim
        try:  # the function compute_local_shape_and_global_offset runs (private: its signature may change)
            size, at = dt_utils._get_shard_size_and_offsets(
                local[d], mesh.size(mesh_dim), coord[mesh_dim], placement, offsets.get(d), global_shape[d], False)
        except Exception as exc:
            raise ValueError(f"the rows a {placement} placement gives this rank could not be located with this "
                             f"torch version ({type(exc).__name__}: {exc}); set enabled: false") from None
        local[d] = int(size)
        if at is not None:
            offsets[d] = at
    for d, at in offsets.items():
        ids = [int(i) for i in at.tolist()][: local[d]]
        if not ids:
            index[d] = (0, 0)
        elif ids == list(range(ids[0], ids[0] + len(ids))):
            index[d] = (ids[0], len(ids))
        else:
            index[d] = ids
    return tuple(local), index


# ---------------------------------------------------------------------- the hook's collective
class RankFailed(RuntimeError):
    """A rank could not add its share to a part of a collection's global values (RANK_PARTS)."""


class ShardSync:
    """The collection step's one collective under FSDP2, and the shard copy of ranks > 0.

    The vector (float64): loss sum and count, correct predictions and rows, each
    parameter's squared local gradient norm and whether it has a gradient, the
    label-count vector, per RANK_PARTS (ranks that could not add their share, the sum of
    those ranks), then, where some ranks are replicas of others (``plan.replica_groups``),
    one weight fingerprint per rank at its own position (metrics/replicas.py).
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
        self.replicas_at = self.failed_at + 2 * len(RANK_PARTS)
        # the replica check: each rank's weight fingerprint at its own position (replicas.py)
        self.size = self.replicas_at + (plan.world_size if plan.replica_groups else 0)
        # 1/replication: each element is counted on the one rank whose block holds it (the first
        # replica of a Replicate() mesh dim, the copy on rank 0's sub-mesh, rank 0 for plain tensors)
        owned = plan.owned(rank)[:n]
        self.owned_list = owned
        self.owned = torch.tensor(owned, dtype=torch.float64, device=device)
        self.all_owned = all(owned)
        self.counts_data = plan.counts_data(rank)  # a tensor-parallel peer's batch is its dp rank's
        # the local shards by shape, for one norm per shape instead of one per tensor (many tensors, CPU)
        self.groups = shape_groups([local_tensor(p) for p in self.params])
        self._partial: list[int] = []  # parameters whose gradients are Partial
        self._partial_seen = -1  # ... read when this many gradients were there
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
        if self.size > self.replicas_at:
            vec[self.replicas_at + self.rank] = self.fingerprint()
        torch.distributed.all_reduce(vec)
        return vec

    def fingerprint(self) -> Any:
        """This rank's local weights' fingerprint (snapshot.weight_fingerprint), NaN if it cannot be taken."""
        try:
            local = [getattr(p, "_local_tensor", p) for p in self.params]  # grad mode is off in the hook
            return weight_fingerprint(local, self.groups).to(self.device)
        except Exception:
            return float("nan")

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
        if not self.counts_data:  # the same batch, loss and outputs as a rank that counts them
            return
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
        """Squared local gradient norms times ``owned`` (one ``_foreach_norm``, no host sync).

        Only the list comprehensions below touch each parameter in Python (reading ``.grad``
        and the DTensor's local tensor): the rest is one fused norm and a few vector ops.
        """
        n, head = self.n, self.HEAD
        params = self.params
        grads = [g for p in params if (g := p.grad) is not None]
        if not grads:
            return
        if self._partial_seen != len(grads):  # the placements a TP plan gives: read once per set of gradients
            self._partial, self._partial_seen = _partial_grads(params), len(grads)
        if self._partial:
            grads = self._reduce_partial()
        locals_ = [getattr(g, "_local_tensor", g) for g in grads]  # the hook runs with grad mode off: no detach
        if len(grads) == n:
            if self.groups is not None:  # many small shards whose shapes repeat (snapshot.shape_groups)
                norms = grouped_norms(locals_, self.groups).to(vec.device)
            else:
                norms = torch.stack(torch._foreach_norm(locals_)).to(vec.device, torch.float64)
            if self.all_owned:
                vec[head : head + n] = norms.square()
                vec[head + n : head + 2 * n] = 1.0
            else:
                vec[head : head + n] = norms.square() * self.owned
                vec[head + n : head + 2 * n] = self.owned
            return
        have = torch.tensor([p.grad is not None for p in params], device=vec.device)
        norms = torch.stack(torch._foreach_norm(locals_)).to(vec.device, torch.float64)
        squares = torch.zeros(n, dtype=torch.float64, device=vec.device)
        squares[have] = norms.square()
        vec[head : head + n] = squares * self.owned
        vec[head + n : head + 2 * n] = have.to(torch.float64) * self.owned

    def _reduce_partial(self) -> list[torch.Tensor]:
        """The gradients, with each Partial one (a sum over ranks that no rank holds)
        redistributed to its parameter's placements: the sum of the partial contributions,
        as the optimizer sees it. A collective per such parameter, over its mesh; every rank
        makes the same ones (placements are the same on every rank). Plans without Partial
        gradients never get here."""
        reduced = {}
        for j in self._partial or ():
            p = self.params[j]
            g = p.grad
            if g is not None and any(pl.is_partial() for pl in getattr(g, "placements", ())):
                reduced[j] = g.redistribute(p.device_mesh, p.placements)  # type: ignore[attr-defined]
        return [reduced.get(j, g) for j, p in enumerate(self.params) if (g := p.grad) is not None]

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
            "failed": vec[self.failed_at : self.replicas_at],
            "replicas": vec[self.replicas_at :] if self.size > self.replicas_at else None,
        }

    # -- ranks > 0: the shards
    def open_file(self, rank: int) -> None:
        path = self.plan.paths[rank]
        if path is None:
            return
        self.file = SlotFile(path, self.plan.num_slots, self.plan.file_specs(rank), create=True)
        self.sharded = self.plan.file_tensors(rank)

    def copy_shards(self, ordinal: int, all_tensors: Sequence[torch.Tensor], wait_s: float = 0.0) -> bool:
        """Rank > 0: copy this rank's shards (of ``all_tensors``, layout order) into a free slot."""
        if self.file is None:
            return False
        return self.file.copy_in(ordinal, [all_tensors[j] for j in self.sharded], wait_s)

    def close(self) -> None:
        if self.file is not None:
            self.file.unlink()


def _partial_grads(params: Sequence[torch.nn.Parameter]) -> list[int]:
    """Indices of the parameters whose gradients have a Partial placement (read once, at the
    first collection where every parameter has a gradient: a TP plan fixes them)."""
    out = []
    for j, p in enumerate(params):
        placements = getattr(p.grad, "placements", None)
        if placements is not None and any(pl.is_partial() for pl in placements):
            out.append(j)
    return out


# ---------------------------------------------------------------------- the readers
class ShardFiles:
    """The shard files one reader maps (rank 0's worker, or a host worker, hosts.py): each
    collection's slot of every rank, held until its record is written, then freed together
    with the stale ones (collections the reader dropped but a rank copied)."""

    def __init__(self, plan: ShardPlan, ranks: Iterable[int]) -> None:
        self.files: dict[int, SlotFile] = {}
        self.lost: dict[int, str] = {}  # ranks whose shard file was gone when this reader started
        self.late: set[int] = set()  # ranks that missed a collection (snapshot.find_shards)
        self._held: list[tuple[int, int]] = []  # (rank, slot) to free after the record is written
        for r in ranks:
            path = plan.paths[r] if 0 < r < len(plan.paths) else None
            if path is None:  # rank 0 (its own slots), or a rank whose every block is a replica
                continue
            try:
                self.files[r] = SlotFile(path, plan.num_slots, plan.file_specs(r), create=False)
            except FileNotFoundError:
                # A replacement reader started after rank r's stop() removed its file (a worker
                # killed near the end of a short run): the records it replays keep everything
                # but the weights, and say why, rather than the reader failing to start and
                # every snapshot it holds being lost.
                self.lost[r] = (f"rank {r}'s shard file was gone when this worker started (rank {r} had "
                                "stopped and removed it before the worker was replaced): its shards are missing")

    def take(self, r: int, ordinal: int) -> list[torch.Tensor] | str:
        """Rank ``r``'s tensors of collection ``ordinal`` (its slot, held until ``release``), or why not."""
        found = find_shards(r, self.files[r], ordinal, self.late)
        if isinstance(found, str):
            return found
        self._held.append((r, found))
        return self.files[r].slots[found]

    def release(self, ordinal: int | None) -> None:
        for r, i in self._held:
            self.files[r].states.release(i)
        self._held = []
        if ordinal is not None:
            for f in self.files.values():
                f.release_through(ordinal)


# ---------------------------------------------------------------------- rank 0's worker
class Assembler:
    """Rank 0's worker: full tensors of a collection from every rank's shards (same host)."""

    def __init__(self, plan: ShardPlan, rank0_slots: Sequence[Sequence[torch.Tensor]]) -> None:
        self.plan = plan
        self.rank0_slots = rank0_slots
        self.error: str | None = None
        self.full: dict[int, torch.Tensor] = {}
        if plan.cross_host:
            self.shards = ShardFiles(plan, [])
            self.error = (f"the model's shards lie on {plan.hosts} hosts and weights do not cross hosts, so the "
                          "holdout, activations and metrics that need the whole model in one process are not built "
                          "(weight norms, deltas and update ratios are: each host sends its sums). HSDP that "
                          "replicates across hosts keeps a whole copy on rank 0's host and records them")
            return
        self.shards = ShardFiles(plan, range(1, plan.world_size))  # every rank's file is on this host
        self.full = {j: torch.empty(plan.specs[j].shape, dtype=getattr(torch, plan.specs[j].dtype)) for j in plan.sharded}
        # per assembled tensor: (rank, its position in that rank's slot, where it goes in the full tensor)
        at_in_file = {r: {j: k for k, j in enumerate(plan.file_tensors(r))} for r in self.shards.files}
        self.places: dict[int, list[tuple[int, int, Any]]] = {}
        for j in plan.sharded:
            places = []
            for r, block in enumerate(plan.blocks[j]):
                if block is None or block.numel == 0 or r in self.shards.lost:
                    continue
                places.append((r, j if r == 0 else at_in_file[r][j], _placer(block)))
            self.places[j] = places

    def tensors(self, slot: int, ordinal: int | None) -> tuple[list[torch.Tensor] | None, str | None]:
        """The full tensors (layout order) of the collection in rank 0's ``slot``; or None and why not.

        ``ordinal`` None: whatever the slots hold (the setup's check of the holdout forward).
        """
        if self.error is not None:
            return None, self.error
        files = self.shards
        if files.lost and ordinal is not None:
            return None, next(iter(files.lost.values()))
        parts: dict[int, list[torch.Tensor]] = {}
        for r, f in files.files.items():
            found = f.slots[0] if ordinal is None else files.take(r, ordinal)
            if isinstance(found, str):
                return None, found
            parts[r] = found
        mine = self.rank0_slots[slot]
        out: list[torch.Tensor] = list(mine)
        for j, places in self.places.items():
            full = self.full[j]
            for r, k, place in places:
                place(full, mine[k] if r == 0 else parts[r][k])
            out[j] = full
        return out, None

    def release(self, ordinal: int | None) -> None:
        """After the record of ``ordinal`` is written: free the shards it used, and stale ones."""
        self.shards.release(ordinal)


def _placer(block: Block) -> Any:
    """A function copying a rank's local tensor into its block of the full tensor: a chain of
    ``narrow`` views for contiguous ranges, ``index_put_`` where a dim's indices are a list."""
    ranges = [(d, i) for d, i in enumerate(block.index) if isinstance(i, tuple)]
    if len(ranges) == len(block.index):
        def place(full: torch.Tensor, src: torch.Tensor) -> None:
            view = full
            for d, (start, length) in ranges:
                view = view.narrow(d, start, length)
            view.copy_(src.view(block.shape))
        return place
    ndim = len(block.shape)
    index = []
    for d, i in enumerate(block.index):
        ids = torch.arange(i[0], i[0] + i[1]) if isinstance(i, tuple) else torch.tensor(i, dtype=torch.int64)
        index.append(ids.view([-1 if e == d else 1 for e in range(ndim)]))

    def place_indexed(full: torch.Tensor, src: torch.Tensor) -> None:
        full.index_put_(tuple(index), src.view(block.shape))
    return place_indexed


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
