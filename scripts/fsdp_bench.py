#!/usr/bin/env python3
"""What telemetry costs a training step under FSDP2, against the same model unsharded (DDP).

    torchrun --nproc-per-node=2 scripts/fsdp_bench.py                  # -> runs/fsdp_bench/
    torchrun --nproc-per-node=2 scripts/fsdp_bench.py --hidden 2048 --steps 120 --repeats 6

A benchmark, not a test. Per wrapper (ddp, fsdp) it trains the same MLP with telemetry off
and on (``on_full: drop``, the default; ``collect_every_n`` from --every), interleaved
``--repeats`` times (odd repeats in reverse order), and times on every rank each whole step and each ``on_batch_end``
call at a collection step. It prints (and writes to fsdp_bench.json / .md on rank 0):

- the hook's median time at a collection step per rank, and its ratio FSDP / DDP (the
  unsharded case: rank 0 copies the whole model, rank 1 only joins the collective);
- the mean step with telemetry on as a ratio to off, same wrapper, same repeat.

Under FSDP2 every rank copies only its shard and joins one all_reduce (gradient norms,
loss, label counts); rank 0's worker assembles the full weights off the training path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train_telemetry import Telemetry, TelemetryConfig


def make_model(features: int, hidden: int, depth: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def wrap(model: nn.Module, how: str) -> nn.Module:
    if how == "ddp":
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def segment(args: argparse.Namespace, how: str, on: bool, out: Path, rank: int, world: int) -> dict[str, Any]:
    model = wrap(make_model(args.features, args.hidden, args.depth, args.classes), how)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    rows = args.batch // world
    batches = [{"x": torch.randn(rows, args.features, generator=g),
                "y": torch.randint(0, args.classes, (rows,), generator=g)} for _ in range(8)]
    telemetry = None
    if on:
        config = TelemetryConfig(output_dir=str(out / f"{how}-{time.monotonic_ns()}"), collect_every_n=args.every,
                                 input_keys=["x"], label_key="y", holdout_size=64)
        telemetry = Telemetry(config)
        telemetry.set_holdout_data(batches[0])
        telemetry.start(model, optimizer)
    steps, hooks = [], []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        logits = model(batch["x"])
        loss = nn.functional.cross_entropy(logits, batch["y"])
        loss.backward()
        optimizer.step()
        if telemetry is not None:
            h0 = time.perf_counter()
            telemetry.on_batch_end(model, optimizer, step, batch=batch, loss=loss.detach(), outputs=logits.detach())
            if step >= args.warmup and step % args.every == 0:
                hooks.append((time.perf_counter() - h0) * 1000)
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            steps.append((time.perf_counter() - t0) * 1000)
    written = None
    if telemetry is not None:
        summary = telemetry.stop()
        written = summary.records_written if rank == 0 else None
    dist.barrier()
    return {"mean_step_ms": statistics.fmean(steps), "hook_ms": statistics.median(hooks) if hooks else None,
            "records": written}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over ranks)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per segment")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=5, help="collect_every_n")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fsdp_bench"))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = args.output_dir
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        order = ("ddp", "fsdp") if repeat % 2 == 0 else ("fsdp", "ddp")  # odd repeats reversed: drift cancels
        for how in order:
            if repeat % 2 == 0:
                off = segment(args, how, False, out, rank, world)
                on = segment(args, how, True, out, rank, world)
            else:
                on = segment(args, how, True, out, rank, world)
                off = segment(args, how, False, out, rank, world)
            rows.append({"repeat": repeat, "wrapper": how, "off": off, "on": on})
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        n_params = sum(p.numel() for p in make_model(args.features, args.hidden, args.depth, args.classes).parameters())
        report = summarize(gathered, args, n_params)
        (out / "fsdp_bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "num_params": n_params, "ranks": gathered,
                                                         "summary": report}, indent=1))
        (out / "fsdp_bench.md").write_text(report["table"])
        print(report["table"])
    dist.destroy_process_group()
    return 0


def summarize(by_rank: list[list[dict[str, Any]]], args: argparse.Namespace, n_params: int) -> dict[str, Any]:
    lines = [f"MLP {n_params / 1e6:.1f}M params, global batch {args.batch}, {len(by_rank)} ranks (gloo, CPU), "
             f"collect_every_n {args.every}, median over {args.repeats} repeats",
             "", "| wrapper | rank | hook at a collection (ms) | mean step on / off | records written |",
             "|---|---|---|---|---|"]
    hook: dict[tuple[str, int], float] = {}
    for rank, rows in enumerate(by_rank):
        for how in ("ddp", "fsdp"):
            mine = [r for r in rows if r["wrapper"] == how]
            h = statistics.median(r["on"]["hook_ms"] for r in mine)
            ratio = statistics.median(r["on"]["mean_step_ms"] / r["off"]["mean_step_ms"] for r in mine)
            written = mine[-1]["on"]["records"]
            hook[(how, rank)] = h
            lines.append(f"| {how} | {rank} | {h:.2f} | {ratio:.2f}x | {'' if written is None else written} |")
    lines.append("")
    worst = {how: max(v for (w, _), v in hook.items() if w == how) for how in ("ddp", "fsdp")}
    lines.append(f"Slowest rank's hook, FSDP2 / DDP: {worst['fsdp'] / worst['ddp']:.2f}x "
                 f"({worst['fsdp']:.2f} ms vs {worst['ddp']:.2f} ms)")
    return {"table": "\n".join(lines) + "\n", "hook_ms": {f"{w}/rank{r}": v for (w, r), v in hook.items()},
            "fsdp_over_ddp": worst["fsdp"] / worst["ddp"]}


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    raise SystemExit(main())
