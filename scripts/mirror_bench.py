"""What mirroring to a slow or hung tracker costs the training loop: mean step time with a
tracker that takes 700 ms a call, and one that never returns, against the same run without
mirroring, ratios in the same run (docs/benchmarks.md, "Mirrors").

    python scripts/mirror_bench.py                 # ~4 min on 2 cores
    python scripts/mirror_bench.py --quick         # ~30 s, every path, timings meaningless

Each segment is the training loop with telemetry on (collect_every_n 5, so a mirror gets a
record every 5 steps: far faster than a 700 ms tracker can take them), warm-up steps first,
then `--steps` timed steps; then stop(), timed. Conditions per mode (async: the worker;
sync: inline, the mirrors' threads in the training process): `none` (no mirror), `slow`
(fakes.SleepingMirror 0.7 s), `hung` (fakes.HungMirror), and `none` again; repeats run in
alternating order, and each ratio divides by the mean of the `none` segments of its repeat.
`none2 / none1` is the noise floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig

MIRRORS: dict[str, Any] = {
    "none": None,
    "slow": {"train_telemetry.mirrors.fakes:SleepingMirror": {"seconds": 0.7}},
    "hung": {"train_telemetry.mirrors.fakes:HungMirror": {}},
}


def segment(mode: str, mirror: Any, steps: int, warmup: int, root: Path, name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)
    config = TelemetryConfig(output_dir=str(root / name), collect_every_n=5, mode=mode, mirror=mirror,
                             stop_timeout_s=20.0, tuning={"mirror_drain_s": 2.0})
    telemetry = Telemetry(config)
    telemetry.set_holdout_data((x[:32], y[:32]))
    telemetry.start(model, opt)
    times = []
    for i in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, i, 0, None, (x, y), loss=loss, outputs=out)
        if i > warmup:
            times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    summary = telemetry.stop()
    stop_s = time.perf_counter() - t0
    mirrors = {k: {"sent": v.sent, "dropped": v.dropped, "state": v.state} for k, v in summary.mirrors.items()}
    return {"mean_ms": 1000 * statistics.fmean(times), "stop_s": stop_s, "records": summary.records_written,
            "taken": summary.snapshots_taken, "mirrors": mirrors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["async", "sync"])
    parser.add_argument("--quick", action="store_true", help="a few steps of every path (timings meaningless)")
    parser.add_argument("--json", metavar="FILE", help="also write every segment's figures here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 20, 5, 1
    torch.set_num_threads(1)  # the trainer's threads: leaves the worker a core on a 2-core machine
    order = ["none1", "slow", "hung", "none2"]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {c: [] for c in order} for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in args.modes:
                for cond in order if r % 2 == 0 else order[::-1]:
                    out = segment(mode, MIRRORS[cond.rstrip("12")], args.steps, args.warmup, Path(tmp),
                                  f"{mode}-{cond}-{r}")
                    results[mode][cond].append(out)
                    print(f"repeat {r} {mode:5s} {cond:5s} step {out['mean_ms']:.2f} ms  stop {out['stop_s']:.2f} s  "
                          f"records {out['records']}/{out['taken']}  mirrors {out['mirrors']}", flush=True)
    print("\nmode   condition  mean step (ms)  ratio vs none (median over repeats)  stop() (s, max)  mirror sent/dropped")
    for mode in args.modes:
        res = results[mode]
        for cond in order:
            ratios = [seg["mean_ms"] / ((a["mean_ms"] + b["mean_ms"]) / 2)
                      for seg, a, b in zip(res[cond], res["none1"], res["none2"], strict=True)]
            if cond == "none2":
                ratios = [b["mean_ms"] / a["mean_ms"] for a, b in zip(res["none1"], res["none2"], strict=True)]
            mirrors = res[cond][-1]["mirrors"]
            sent = ", ".join(f"{k} {v['sent']}/{v['dropped']} {v['state']}" for k, v in mirrors.items()) or "-"
            print(f"{mode:6s} {cond:9s}  {statistics.median(s['mean_ms'] for s in res[cond]):14.2f}  "
                  f"{statistics.median(ratios):8.3f}{' (noise: none2/none1)' if cond == 'none2' else ''}"
                  f"{'':25s}  {max(s['stop_s'] for s in res[cond]):6.2f}  {sent}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
