#!/usr/bin/env python3
"""What the replica check adds to a rank's hook at a collection step, against the weight copy.

    python scripts/replica_cost.py                       # CPU, one thread, MLPs of 0.5M to 34M parameters
    python scripts/replica_cost.py --device cuda --dtype bfloat16

A benchmark, not a test. Under DDP and HSDP every rank takes one fingerprint of its weights
per collection (snapshot.weight_fingerprint: a float32 norm per tensor, added in float64),
the replica check's only cost on the training path. This prints its median time per model
size beside the same weights' copy into a buffer (what rank 0's hook already does at each
collection), and the float64 norm it replaced (exact, but ~30x slower on the CPU), all
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from train_telemetry.snapshot import weight_fingerprint


def median_ms(fn, repeats: int, sync) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device {args.device}, {args.dtype}, {args.threads} thread(s); median of {args.repeats}")
    print(f"{'params':>10} {'MB':>7} {'fingerprint':>12} {'copy':>9} {'ratio':>6} {'float64 norm':>13}")
    for hidden in args.hidden:
        model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                    torch.nn.Linear(hidden, 10)).to(args.device, dtype)
        params = [p.detach() for p in model.parameters()]
        buffers = [torch.empty_like(p, device="cpu", pin_memory=cuda) for p in params]
        numel = sum(p.numel() for p in params)
        with torch.no_grad():
            fingerprint = median_ms(lambda p=params: weight_fingerprint(p), args.repeats, sync)
            copy = median_ms(lambda b=buffers, p=params: torch._foreach_copy_(b, p, non_blocking=cuda), args.repeats, sync)
            exact = median_ms(lambda p=params: torch._foreach_norm(p, 2, dtype=torch.float64), max(3, args.repeats // 4), sync)
        mb = numel * params[0].element_size() / 2**20
        print(f"{numel:>10,} {mb:>7.1f} {fingerprint:>9.2f} ms {copy:>6.2f} ms {fingerprint / copy:>6.2f} {exact:>10.2f} ms")


if __name__ == "__main__":
    main()
