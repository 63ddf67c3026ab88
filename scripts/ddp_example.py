#!/usr/bin/env python3
"""Telemetry under torchrun with DistributedDataParallel or FSDP2: a tiny classifier with two param groups.

    torchrun --nproc-per-node=2 scripts/ddp_example.py --out runs/ddp            # 2 ranks (gloo on CPU)
    torchrun --nproc-per-node=2 scripts/ddp_example.py --out runs/ddp --per-rank # one file set per rank
    torchrun --nproc-per-node=2 scripts/ddp_example.py --out runs/ddp --accum 2  # no_sync accumulation
    torchrun --nproc-per-node=2 scripts/ddp_example.py --out runs/fsdp --fsdp full    # FSDP2 fully_shard
    torchrun --nproc-per-node=4 scripts/ddp_example.py --out runs/hsdp --fsdp hsdp    # HSDP, a 2x2 mesh
    torchrun --nproc-per-node=4 scripts/ddp_example.py --out runs/fsdp-tp --fsdp tp   # FSDP2 + tensor parallel, 2x2
    python scripts/ddp_example.py --out runs/single                              # the same, one process

Every optimizer step trains on the same global batch of GLOBAL_BATCH rows however many
ranks there are (rank r takes its contiguous share, split into --accum micro-batches), so
the single-process run is the reference the DDP runs must agree with. Without --per-rank
only rank 0 writes (``<out>/telemetry.jsonl``), and each record's batch_stats cover the
global batch. tests/e2e/test_distributed.py runs this script; the flags under "for the
tests" exist for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, TelemetryStartError

GLOBAL_BATCH = 16  # rows per optimizer step, summed over ranks and micro-batches
NUM_FEATURES = 6
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """backbone -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # [B, NUM_FEATURES] -> [B, NUM_CLASSES]


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The whole batch of optimizer step ``step``: the same on every rank and in every run."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, NUM_FEATURES, generator=g)
    y = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    return {"x": x, "y": y}


def rank_share(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous rows of a global batch (what a DistributedSampler would give)."""
    per_rank = GLOBAL_BATCH // world_size
    return {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}


def holdout_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"x": torch.randn(24, NUM_FEATURES, generator=g), "y": torch.randint(0, NUM_CLASSES, (24,), generator=g)}


def build(seed: int = 0) -> tuple[TinyNet, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Model, optimizer with two named groups, and an LR that changes every step."""
    torch.manual_seed(seed)  # the same initial weights on every rank and in the reference
    model = TinyNet()
    return (model, *make_optimizer(model))


def make_optimizer(model: TinyNet) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with two named groups and an LR that changes every step (FSDP2: over the sharded parameters)."""
    optimizer = torch.optim.SGD(
        [
            {"params": model.backbone.parameters(), "lr": 0.05, "name": "backbone"},
            {"params": model.head.parameters(), "lr": 0.2, "name": "head"},
        ],
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.1 * step))
    return optimizer, scheduler


def train(args: argparse.Namespace) -> dict[str, Any]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the env
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    # The ranks that see different rows: every rank, except under tensor parallelism, where
    # the two ranks of a "tp" pair train on the same rows (their data-parallel coordinate's).
    data_rank, data_world = rank, world_size
    if args.fsdp in ("tp", "hsdp_tp") and world_size > 1:
        data_rank, data_world = rank // TP_SIZE, world_size // TP_SIZE
    per_rank_rows = GLOBAL_BATCH // data_world
    if GLOBAL_BATCH % (data_world * args.accum):
        raise SystemExit(f"GLOBAL_BATCH={GLOBAL_BATCH} must divide into {data_world} ranks x {args.accum} micro-batches")
    micro = per_rank_rows // args.accum

    model, optimizer, scheduler = build()
    ddp: nn.Module = model
    if world_size > 1 and args.fsdp != "none":
        shard(model, args.fsdp, world_size)
        optimizer, scheduler = make_optimizer(model)  # over the sharded (DTensor) parameters
        ddp = model
    elif world_size > 1:
        ddp = DistributedDataParallel(model)

    config = TelemetryConfig(
        output_dir=args.out,
        collect_every_n=args.collect_every_n,
        input_keys=["x"],
        label_key="y",
        holdout_size=24,
        per_rank=args.per_rank,
        on_full=args.on_full,
        mode=args.mode,
        # the default ("auto": 10% with on_full drop) unless --overhead-budget is given
        **({"overhead_budget": args.overhead_budget} if args.overhead_budget is not None else {}),
    )
    telemetry = Telemetry(config)
    holdout = holdout_batch()
    if args.fail_start_rank == rank:  # for the tests: this rank alone cannot start telemetry
        holdout = {"x": holdout["x"], "label": holdout["y"]}
    telemetry.set_holdout_data(holdout)
    # After init_process_group, so every rank knows its rank; only rank 0 starts a worker.
    # start() succeeds on every rank or fails on every rank: a script may catch its error
    # and train on without telemetry, and no rank is left waiting in a collective.
    start_error = None
    try:
        telemetry.start(ddp, optimizer)
    except (TelemetryConfigError, TelemetryStartError) as exc:
        if args.fail_start_rank is None:
            raise
        start_error = str(exc)

    collectives: dict[int, list[list[Any]]] = {}  # --count-collectives: what each hook issued
    for step in range(args.steps):
        share = rank_share(global_batch(step), data_rank, data_world)
        step_loss, step_logits = torch.zeros(()), []
        for i in range(args.accum):
            rows = slice(i * micro, (i + 1) * micro)
            last = i == args.accum - 1
            # no_sync: gradients accumulate locally; DDP all-reduces on the last micro-batch.
            if args.fsdp != "none" and world_size > 1:
                set_gradient_sync(ddp, last)  # FSDP2: reduce-scatter on the last micro-batch only
            with _maybe_no_sync(ddp, skip=not last):
                logits = ddp(share["x"][rows])
                # The mean loss: DDP averages gradients over ranks, so these equal the
                # gradients of one process on the whole global batch.
                loss = nn.functional.cross_entropy(logits, share["y"][rows]) / args.accum
                loss.backward()
            step_loss += loss.detach()  # the mean loss of this rank's rows of the step
            step_logits.append(logits.detach())
        optimizer.step()
        if args.diverge_rank == rank and step == args.diverge_at:  # for the tests: a rank-dependent bug
            with torch.no_grad():
                next(ddp.parameters()).mul_(1.001)  # this rank's weights now differ from the others'
        hook_batch: dict[str, Any] = share
        if args.bad_labels_rank == rank:  # for the tests: labels this rank cannot count
            hook_batch = {"x": share["x"], "y": ["?"] * per_rank_rows}
        # After optimizer.step(), once per optimizer step, with the step counter (the same
        # on every rank) and this rank's whole share of the step's rows.
        outputs = torch.cat(step_logits)
        fail_fill = args.fail_fill_rank == rank and step == args.fail_fill_at
        with _counting(collectives, step, args.count_collectives), _failing_copies(fail_fill):
            telemetry.on_batch_end(ddp, optimizer, step, batch=hook_batch, loss=step_loss, outputs=outputs)
        if step == args.kill_worker_at and telemetry.worker_pid is not None:
            _kill_and_wait(telemetry.worker_pid)  # for the tests: the worker dies mid-run
        host_worker = getattr(telemetry._dist, "host_worker", None)  # for the tests only: no public handle
        if step == args.kill_host_worker_at and host_worker is not None and host_worker.proc is not None:
            _kill_and_wait(host_worker.proc.pid)  # for the tests: another host's worker dies mid-run
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)  # for the tests: a longer step, so the overhead budget's periods pass

    summary = telemetry.stop()
    result = {"rank": rank, "world_size": world_size, "worker_pid": telemetry.worker_pid, "collectives": collectives,
              "steps": args.steps, "summary": summary.to_dict(), "start_error": start_error}
    if args.result_dir:
        Path(args.result_dir, f"result.rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        print(f"rank 0: {summary.records_written} records in {args.out}, "
              f"{summary.snapshots_dropped} dropped, clean={summary.clean}", flush=True)
    if world_size > 1:
        # Ranks leave together: tearing gloo down while a peer still talks to it can abort
        # the process ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return result


TP_SIZE = 2  # --fsdp tp: the size of the mesh's "tp" dimension


def shard(model: TinyNet, how: str, world_size: int) -> None:
    """FSDP2: ``full`` shards every Linear and the root; ``mixed`` shards the backbone's
    Linears only and replicates the head (plain tensors, gradients all-reduced by ``replicate``).

    On a 2-D mesh (``world_size // 2`` x 2): ``hsdp`` shards every Linear and the root over
    the mesh's "shard" dimension and replicates them over "replicate"; ``tp`` splits the
    backbone's Linears over "tp" (column-wise, then row-wise: Megatron's MLP) and shards
    every Linear and the root over "dp" (torchtitan's FSDP2 + TP)."""
    from torch.distributed.fsdp import fully_shard

    if how in ("hsdp", "tp", "hsdp_tp"):
        from torch.distributed.device_mesh import init_device_mesh

        if how == "hsdp_tp":  # 3-D: (replicate 2, shard world / 4, tp 2); torchtitan's HSDP + TP
            names: tuple[str, ...] = ("replicate", "shard", "tp")
            mesh = init_device_mesh("cpu", (2, world_size // (2 * TP_SIZE), TP_SIZE), mesh_dim_names=names)
        else:
            names = ("replicate", "shard") if how == "hsdp" else ("dp", "tp")
            mesh = init_device_mesh("cpu", (world_size // TP_SIZE, TP_SIZE), mesh_dim_names=names)
        if how in ("tp", "hsdp_tp"):
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            parallelize_module(model.backbone, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        dp_mesh = mesh if how == "hsdp" else mesh["dp"] if how == "tp" else mesh["replicate", "shard"]
        for layer in [*model.backbone, model.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return
    for layer in model.backbone:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    if how == "full":
        fully_shard(model)
    else:
        from torch.distributed._composable.replicate import replicate

        replicate(model.head)


# torch.distributed's collectives (what a hook could call, directly or through DTensor's
# redistribute, which ends in these or in the process group's own methods, counted below too).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
               "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


@contextlib.contextmanager
def _failing_copies(enabled: bool) -> Any:
    """For the tests: every ``torch._foreach_copy_`` in the block raises (a rank > 0's shard copy,
    as a device error would make it fail)."""
    if not enabled:
        yield
        return
    original = torch._foreach_copy_

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected by --fail-fill-rank: the shard copy failed")

    torch._foreach_copy_ = fail
    try:
        yield
    finally:
        torch._foreach_copy_ = original


@contextlib.contextmanager
def _counting(counts: dict[int, list[list[Any]]], step: int, enabled: bool) -> Any:
    """For the tests: record every collective the hook issues at ``step`` as [name, group size,
    elements]: torch.distributed's functions wrapped for the hook's duration, and gloo's own
    events (the profiler) for collectives that bypass them (DTensor's functional collectives)."""
    if not enabled:
        yield
        return
    seen: list[list[Any]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            group = kwargs.get("group")
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            seen.append([name, size, tensor.numel() if tensor is not None else None])
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    gloo = [e.name for e in prof.events() if e.name.startswith("gloo:")]
    counts[step] = seen + [["gloo", None, name] for name in gloo]


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(sync, recurse=False)


def _maybe_no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone or a zombie (its parent reaps it later)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="telemetry output directory (created)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--collect-every-n", type=int, default=3)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (no_sync)")
    parser.add_argument("--per-rank", action="store_true", help="every rank writes telemetry.rank<r>.jsonl")
    parser.add_argument("--fsdp", choices=["none", "full", "mixed", "hsdp", "tp", "hsdp_tp"], default="none",
                        help="FSDP2 instead of DDP: full = fully_shard every Linear and the root; mixed = the "
                        "backbone sharded, the head replicated; on a 2-D mesh (4 ranks: 2x2): hsdp = HSDP, "
                        "tp = FSDP2 over 'dp' + tensor parallel backbone over 'tp'")
    parser.add_argument("--mode", choices=["auto", "async", "sync"], default="auto",
                        help="telemetry.mode (auto: the worker where it has a core of its own, else inline)")
    tests = parser.add_argument_group("for the tests")
    tests.add_argument("--on-full", choices=["drop", "block"], default="drop",
                       help="block: wait for the worker instead of dropping, so runs compare record by record")
    tests.add_argument("--result-dir", default=None, help="write result.rank<r>.json (summary, worker pid) here")
    tests.add_argument("--kill-worker-at", type=int, default=None, help="rank 0 SIGKILLs its worker at this step")
    tests.add_argument("--fail-start-rank", type=int, default=None,
                       help="this rank's holdout lacks the label key: start() fails there (and so on every rank)")
    tests.add_argument("--overhead-budget", type=float, default=None, help="telemetry.overhead_budget")
    tests.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    tests.add_argument("--diverge-rank", type=int, default=None,
                       help="this rank scales its first weight by 1.001 at --diverge-at (its replica drifts)")
    tests.add_argument("--diverge-at", type=int, default=None)
    tests.add_argument("--fail-fill-rank", type=int, default=None, help="this rank's shard copy fails at --fail-fill-at")
    tests.add_argument("--fail-fill-at", type=int, default=None)
    tests.add_argument("--kill-host-worker-at", type=int, default=None,
                       help="the lowest rank of another host than rank 0's SIGKILLs its host worker at this step")
    tests.add_argument("--bad-labels-rank", type=int, default=None, help="this rank passes labels it cannot count")
    tests.add_argument("--count-collectives", action="store_true",
                       help="record the collectives each on_batch_end issues (result.rank<r>.json: collectives)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
