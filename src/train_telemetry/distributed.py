"""torch.distributed: which rank this is, who writes, and one strategy per layout of the ranks.

Runs in: the training process, at ``start()`` and in the hook at collection steps; see
docs/distributed.md.

A strategy is chosen once, in ``start()`` (``open_strategy``), and the facade
(telemetry.py) calls every one the same way, never asking which one it has (the
DataLoader's single- vs multi-process iterator split, applied to layouts):

- ``at_start(model)``: start()'s own collectives and preparation, on every rank, before
  anything that can fail on one rank only;
- ``at_collection(ordinal, batch, loss, outputs)``: every rank, at every due collection
  step, before anything that may return (a worker that died, no free slot, an error, the
  overhead budget): a rank that skipped the collective would leave the others waiting in
  it for good. It never raises before the collective. It returns what the record needs
  from it (:class:`Shared`), or None: this rank records nothing (it joined the collective
  and, under FSDP2, copied its shards for rank 0's worker) and the hook returns;
- ``eval_copy(module, slot)``: the model rank 0's worker evaluates the holdout with;
- ``plan``: what the worker needs to assemble the full weights (FSDP2), else None;
- ``close()``: at ``stop()`` (and when ``start()`` fails).

The strategies: :class:`Local` (no collective: one process, ``per_rank``, DDP without
batch statistics), :class:`DataParallel` (DDP: the label-count all_reduce) and
:class:`Sharded` (FSDP2: global gradient norms, loss, accuracy and counts in one
all_reduce, each rank's weight shards in shared memory; NOTE [sharded snapshots] in
shards.py), on 1-D and 2-D meshes alike (HSDP, FSDP2 + tensor parallel). On several
hosts ``Sharded`` also starts, on the lowest rank of each other host holding counted
shards, that host's worker (NOTE [hosts] in hosts.py); pipeline parallelism is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .batches import BatchFormatCache
from .config import TelemetryConfig, TelemetryConfigError
from .hosts import NO_STORE, HostWorker
from .metrics.batch import count_vector
from .shards import (
    ShardPlan,
    ShardSync,
    has_dtensor_params,
    plain_skeleton,
    plan_shards,
    unsupported_sharding,
)
from .snapshot import (
    Layout,
    ShapeGroups,
    build_layout,
    model_on_slot,
    shape_groups,
    unwrap_model,
    weight_fingerprint,
)
from .worker_handle import TelemetryStartError

__all__ = ["DataParallel", "DistInfo", "Local", "Shared", "Sharded", "Strategy", "agree_on_start",
           "detect_distributed", "open_strategy"]

Warn = Callable[[str, str], None]  # (key, message): warn once per key


@dataclass
class DistInfo:
    """Rank, world size, and whether this process writes and joins the label-count all_reduce."""

    rank: int = 0
    world_size: int = 1
    per_rank: bool = False
    global_batch: bool = False  # batch stats summed over ranks (one all_reduce per collection)
    count_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where that vector lives
    formats: BatchFormatCache | None = None  # reads labels for the collective

    @property
    def writes(self) -> bool:
        """Whether this process writes records (rank 0, or every rank with per_rank)."""
        return self.rank == 0 or self.per_rank


def detect_distributed(config: TelemetryConfig) -> tuple[DistInfo, str | None]:
    """This process's DistInfo, and a warning to show when the launch looks wrong.

    Without ``per_rank`` only rank 0 writes, and the batch statistics of each collection
    are summed over the ranks (``global_batch``). That all_reduce is the only collective
    a collection step runs; every rank joins it at every collection step.
    """
    info = DistInfo(per_rank=config.per_rank)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        info.rank = dist.get_rank()
        info.world_size = dist.get_world_size()
        info.global_batch = info.world_size > 1 and not config.per_rank and config.track_batch_stats
        if info.global_batch:
            info.formats = BatchFormatCache(config.input_keys, config.label_key, config.keys_are_default,
                                            need_inputs=False)
            if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
                info.count_device = torch.device("cuda", torch.cuda.current_device())
        return info, None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # Launched by torchrun, but start() came before init_process_group: without the
        # rank every process would write the same files. No collective is possible.
        info.rank = int(os.environ.get("RANK", "0") or 0)
        info.world_size = int(os.environ["WORLD_SIZE"])
        return info, (
            f"WORLD_SIZE={info.world_size} but torch.distributed is not initialised at start(): "
            f"taking rank {info.rank} from $RANK; batch statistics cover this rank's batch only. "
            "Call start() after init_process_group for global batch statistics"
        )
    return info, None


def agree_on_start(error: Exception | None) -> Exception | None:
    """Under torch.distributed, start() succeeds on every rank or fails on every rank.

    One small collective (every rank calls start()): a failure on one rank alone would
    leave the others waiting in the label-count all_reduce, or in the user's own
    collectives, for good. The failing rank keeps its own error; the others get one that
    names it.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return error
    mine = None if error is None else f"rank {dist.get_rank()}: {type(error).__name__}: {error}"
    said: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(said, mine)
    failed = [m for m in said if m]
    if error is None and failed:
        return TelemetryStartError(
            f"telemetry start() failed on another rank ({failed[0]}); it fails on every rank, so that no rank "
            "is left alone in a collective: fix that rank's problem, or catch this error on every rank"
        )
    return error


def global_counts(formats: BatchFormatCache | None, batch: Any, device: torch.device) -> torch.Tensor:
    """DDP: this rank's label-count vector for the all_reduce; never raises."""
    labels, size = None, None
    try:
        fmt = formats.get(batch) if batch is not None and formats is not None else None
        if fmt is not None:
            labels, size = fmt.labels(batch), fmt.batch_size(batch)
    except Exception:
        pass
    return count_vector(labels, size, device)


def replica_fingerprint(tensors: Sequence[torch.Tensor], groups: ShapeGroups | None, device: torch.device) -> Any:
    """This rank's weight fingerprint for the replica check (a 0-d tensor on ``device``, no host
    sync), or NaN where it cannot be taken (no model; weights on several devices): that rank is
    then reported as not compared, never as diverged. Never raises (it runs before the collective)."""
    if not tensors:
        return float("nan")
    try:
        return weight_fingerprint(tensors, groups).to(device)
    except Exception:
        return float("nan")


class Shared:
    """What a collection's collective gave the rank that records it (tensors: no host sync).

    ``counts``: the label-count vector summed over ranks (DDP, FSDP2 with batch stats);
    ``reduced``: FSDP2's global gradient norms, loss, accuracy and the parts a rank could
    not contribute (``ShardSync.unpack``).
    """

    __slots__ = ("counts", "reduced", "replicas")

    def __init__(self, counts: torch.Tensor | None = None, reduced: dict[str, torch.Tensor | None] | None = None,
                 replicas: torch.Tensor | None = None) -> None:
        self.counts = counts
        self.reduced = reduced
        self.replicas = replicas  # float64 per rank: each rank's weight fingerprint (the replica check)


_NOTHING_SHARED = Shared()  # no collective: the record holds this rank's own values


class Strategy(Protocol):
    """One layout of the ranks (the module docstring says when the facade calls what)."""

    info: DistInfo
    plan: ShardPlan | None

    def at_start(self, model: torch.nn.Module | None) -> None: ...

    def at_collection(self, ordinal: int, batch: Any, loss: Any, outputs: Any) -> Shared | None: ...

    def eval_copy(self, module: torch.nn.Module, slot: Sequence[torch.Tensor]) -> torch.nn.Module: ...

    def close(self) -> None: ...

    def replica_groups(self) -> list[list[int]]: ...


class Local:
    """No collective: one process, ``per_rank``, DDP without batch statistics, or ranks
    started before ``init_process_group``. A rank that does not write records returns at once."""

    plan: ShardPlan | None = None

    def __init__(self, info: DistInfo | None = None) -> None:
        self.info = info if info is not None else DistInfo()

    def at_start(self, model: torch.nn.Module | None) -> None:
        pass

    def at_collection(self, ordinal: int, batch: Any, loss: Any, outputs: Any) -> Shared | None:
        return _NOTHING_SHARED if self.info.writes else None

    def eval_copy(self, module: torch.nn.Module, slot: Sequence[torch.Tensor]) -> torch.nn.Module:
        """A CPU copy whose weights are the slot's (snapshot.model_on_slot)."""
        return model_on_slot(module, slot)

    def close(self) -> None:
        pass

    def replica_groups(self) -> list[list[int]]:
        return []


class DataParallel(Local):
    """DDP (or any data-parallel layout) with global batch statistics: one all_reduce per
    collection step of the ranks' label counts (rank 0 records the sum) and of each rank's
    weight fingerprint (the replica check: every rank should hold the same weights)."""

    def __init__(self, info: DistInfo | None = None) -> None:
        super().__init__(info)
        self.params: list[torch.Tensor] = []
        self.groups: ShapeGroups | None = None

    def at_start(self, model: torch.nn.Module | None) -> None:
        if model is not None:
            self.params = list(unwrap_model(model).parameters())  # read in the hook (grad mode off)
            self.groups = shape_groups(self.params)

    def replica_groups(self) -> list[list[int]]:
        world = self.info.world_size
        return [list(range(world))] if world > 1 and self.params else []

    def at_collection(self, ordinal: int, batch: Any, loss: Any, outputs: Any) -> Shared | None:
        # Every rank joins this all_reduce at every collection step, before anything that
        # depends on this rank's own state (worker dead, no free slot, an error) may return:
        # a rank that skipped it would leave the others waiting in it for good.
        # global_counts never raises. On CPU (gloo) this blocks until all ranks arrive.
        info = self.info
        counts = global_counts(info.formats, batch, info.count_device)
        n = counts.numel()
        vec = torch.zeros(n + info.world_size, dtype=torch.float64, device=info.count_device)
        vec[:n] = counts  # integers below 2**53: exact in float64
        vec[n + info.rank] = replica_fingerprint(self.params, self.groups, vec.device)
        torch.distributed.all_reduce(vec)  # SUM; unpacked by the worker (no sync here)
        if not info.writes:
            return None
        return Shared(counts=vec[:n].to(torch.int64), replicas=vec[n:] if self.params else None)


class Sharded:
    """FSDP2 (``fully_shard``, DTensor parameters; 1-D or 2-D meshes: HSDP, FSDP2 + TP):
    NOTE [sharded snapshots] in shards.py.

    ``at_start`` agrees on the plan with the other ranks; each collection runs ShardSync's
    all_reduce (global gradient norms, loss, accuracy, counts), then rank 0 records and
    every other rank copies its local shards into its shard file for rank 0's worker.
    """

    def __init__(self, info: DistInfo, config: TelemetryConfig, needs: frozenset[str], warn: Warn) -> None:
        self.info = info
        self.config = config
        self.needs = needs
        self.warn = warn
        self.plan: ShardPlan | None = None
        self.sync: ShardSync | None = None
        self.layout: Layout | None = None
        self.host_worker: HostWorker | None = None  # on another host than rank 0's: its lowest rank's (hosts.py)
        # on_full: block makes a rank > 0 wait for a free shard slot as rank 0 waits for its own
        self.copy_wait_s = config.block_timeout_s if config.on_full == "block" else 0.0

    def at_start(self, model: torch.nn.Module | None) -> None:
        """Agree with the other ranks on how the shards make the full tensors (docs/distributed.md)."""
        assert model is not None  # chosen for a model with DTensor parameters only
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise TelemetryConfigError(
                "the model has DTensor parameters but torch.distributed is not initialised: "
                "call start() on every rank after init_process_group and fully_shard")
        inner = unwrap_model(model)
        plan = plan_shards(list(inner.named_parameters()) + list(inner.named_buffers()), self.config.num_slots, inner)
        if isinstance(plan, Exception):
            raise plan
        if self.config.per_rank:
            raise TelemetryConfigError(
                "per_rank: true with a sharded (FSDP2) model would record each rank's shard, not the model: "
                "remove per_rank; rank 0 records the exact global values")
        if plan.cross_host and "weights" in self.needs and self.info.writes:
            self.warn("shards_hosts", f"the model's counted shards lie on {plan.hosts} hosts: weight norms, deltas "
                      "and update ratios are summed over the hosts, but the holdout and activations (which need the "
                      "whole model in one process) are not recorded; records say so (docs/distributed.md)"
                      + ("" if plan.store is not None else f". And: {NO_STORE}"))
        self.plan = plan
        info = self.info
        info.formats = info.formats or BatchFormatCache(
            self.config.input_keys, self.config.label_key, self.config.keys_are_default, need_inputs=False)
        # Ranks > 0 make their shard files now, so rank 0's worker finds them at its setup;
        # a failure (a full /dev/shm on one node) fails start() on every rank.
        error = None
        try:
            self._prepare(inner, plan)
        except Exception as exc:
            error = exc
        error = agree_on_start(error)
        if error is not None:
            raise error
        rank, host = self.info.rank, plan.host_of[self.info.rank]
        if "weights" in self.needs and plan.store is not None and host in plan.remote_hosts() \
                and rank == min(plan.ranks_on(host)):
            # after every rank made its file: this host's worker sums its ranks' shards (hosts.py)
            self.host_worker = HostWorker(plan, host, len(self.layout.params) if self.layout else 0,
                                          "weight_deltas" in self.needs, self.config, self.warn)
            try:
                self.host_worker.start()
            except Exception as exc:
                self.warn("host_worker_start", f"could not start the host worker of host {host} ({type(exc).__name__}: "
                          f"{exc}): rank 0 records this host's weight numbers as missing")

    def _prepare(self, inner: torch.nn.Module, plan: ShardPlan) -> None:
        """The collective's vector, and on a rank > 0 a shard file rank 0's worker reads (same host)."""
        info = self.info
        self.layout = layout = build_layout(inner)
        self.sync = sync = ShardSync(layout.params, plan, info.rank, info.count_device, info.formats,
                                     want_counts=info.global_batch)
        if info.rank > 0 and "weights" in self.needs:
            sync.open_file(info.rank)  # in this rank's host's shared memory
            if "weight_deltas" in self.needs:  # rank 0's first reference: every rank's shards at start
                sync.copy_shards(-1, layout.live_sources())

    def at_collection(self, ordinal: int, batch: Any, loss: Any, outputs: Any) -> Shared | None:
        # The one collective (every rank, every collection step; never raises before it):
        # global gradient norms, loss, accuracy and label counts.
        sync, layout = self.sync, self.layout
        assert sync is not None and layout is not None
        vec = sync.reduce(batch, loss, outputs)
        for where, exc in sync.failures:  # after the collective: this rank's part is marked missing
            self.warn(f"rank_part:{where}:{type(exc).__name__}", (
                f"rank {self.info.rank} could not add its part to the global {where} of a collection "
                f"({type(exc).__name__}: {exc}); rank 0 records it as null for that collection, not summed without it"))
        if not self.info.writes:  # a rank > 0: copy its shards for its host's reader, done
            if sync.file is not None:
                try:
                    sync.copy_shards(ordinal, layout.live_sources(), self.copy_wait_s)
                except Exception as exc:  # the reader records this collection's weights as missing, without waiting
                    self.warn(f"copy_shards:{type(exc).__name__}", (
                        f"rank {self.info.rank} could not copy its shards at a collection ({type(exc).__name__}: "
                        f"{exc}); rank 0 records that collection's weight metrics as missing, later ones as usual"))
            return None
        reduced = sync.unpack(vec, want_loss=loss is not None, want_accuracy=outputs is not None)
        return Shared(counts=reduced["counts"], reduced=reduced, replicas=reduced["replicas"])

    def eval_copy(self, module: torch.nn.Module, slot: Sequence[torch.Tensor]) -> torch.nn.Module:
        """A plain copy on the meta device; the worker points it at the assembled weights."""
        return plain_skeleton(module)

    def replica_groups(self) -> list[list[int]]:
        return self.plan.replica_groups if self.plan is not None else []

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()  # rank 0's worker (or our host's worker) keeps its mapping of our shard file
        if self.host_worker is not None:  # it ends when rank 0's worker has written every record
            self.host_worker.close(self.config.stop_timeout_s)


def open_strategy(config: TelemetryConfig, model: torch.nn.Module | None, needs: frozenset[str],
                  warn: Warn) -> Strategy:
    """The strategy for this process's layout (raises for a sharding that cannot be recorded exactly)."""
    info, note = detect_distributed(config)
    if note:
        warn("dist_late", note)
    if model is not None and (problem := unsupported_sharding(unwrap_model(model))) is not None:
        raise TelemetryConfigError(problem)
    if model is not None and has_dtensor_params(model):
        return Sharded(info, config, needs, warn)
    return DataParallel(info) if info.global_batch else Local(info)
