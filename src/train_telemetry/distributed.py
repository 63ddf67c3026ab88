"""torch.distributed: which rank this is, who writes, and the batch-statistics collective.

Runs in: the training process, at ``start()``; see docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .batches import BatchFormatCache
from .config import TelemetryConfig
from .worker_handle import TelemetryStartError


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
    telemetry ever runs; every rank joins it at every collection step.
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
