#!/usr/bin/env python3
"""What the worker spends per collection, stage by stage, against each stage's memory floor.

    python scripts/worker_stages.py                       # wide preset, 1 thread (the worker's default)
    python scripts/worker_stages.py --preset conv --threads 2 --collections 20

Runs the worker's own code (processor.py, reference.py, the metrics) inline, as
``mode: sync`` does, with the worker's torch thread count, on a stress preset
(configs/stress.yaml), and times each stage with ``perf_counter`` (median over the
collections after the first two). The floors are what moving the same bytes costs on
this machine, measured in the same run:

- read: one ``_foreach_norm`` pass over the slot's weights (each byte read once);
- copy: a ``pread`` of the reference file through the same 1 MiB buffer (page cache ->
  buffer), the read the delta pass cannot avoid;
- write: a ``pwrite`` of the weights' bytes into a file in the page cache;
- forward: the model's own no-grad forward of the holdout rows, no hooks, same threads:
  the arithmetic any holdout prediction must do (it is arithmetic-bound, not memory-bound:
  50 x 25M multiply-adds on the wide preset take 6x one read of the weights).

Stages: ``delta pass`` (weight norms + deltas: floor = read + copy), ``reference save``
(floor = write), ``holdout eval`` (floor = forward; the activation statistics' hooks, the
logits' conversion and the loss are extra), ``rest`` (the other metrics, encoding, the
line write).
A benchmark, not a test; docs/benchmarks.md shows its output.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stress_test  # noqa: E402  (the presets)

from train_telemetry import Telemetry, TelemetryConfig  # noqa: E402
from train_telemetry import processor as processor_mod  # noqa: E402
from train_telemetry import reference as reference_mod  # noqa: E402


def _best(fn: Any, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def floors(weights: list[torch.Tensor], workdir: Path, forward: Any) -> dict[str, float]:
    """ms to read the weights once, to pread them back from the page cache, to write them to
    it, and for one bare holdout forward (``forward()``)."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    data = flat.numpy().tobytes()
    path = workdir / "floor.bin"
    path.write_bytes(data)
    chunk = reference_mod._READ_CHUNK
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDWR)
    try:
        def pread_all() -> None:
            for off in range(0, len(data), chunk):
                os.preadv(fd, [view[: min(chunk, len(data) - off)]], off)

        def pwrite_all() -> None:
            os.pwrite(fd, data, 0)

        return {"read": _best(lambda: torch._foreach_norm(weights)), "copy": _best(pread_all),
                "write": _best(pwrite_all), "forward": _best(forward)}
    finally:
        os.close(fd)


def record_chain(preset: Any, tcfg: dict[str, Any], out: Path, collections_n: int,
                 metric_ms: dict[str, list[float]]) -> int:
    """Build ``collections_n`` records inline (the worker's code, ``mode: sync``) with the
    default metrics of ``tcfg``, timing each metric's ``compute`` into ``metric_ms`` (ms,
    less the delta pass / holdout forward it triggered first: those are stages)."""
    cfg = TelemetryConfig.from_dict({**tcfg, "mode": "sync", "tuning": {"fsync": False}, "collect_every_n": 1,
                                     "output_dir": str(out / "run"), "input_keys": preset.input_keys,
                                     "label_key": "winner"})
    telemetry = Telemetry(cfg)
    for m in telemetry.metrics:
        fn = m.compute

        def timed_compute(snap: Any, fn: Any = fn, key: str = m.key) -> Any:
            nested0 = sum(map(sum, (times_ref["delta pass"], times_ref["holdout eval"])))
            t0 = time.perf_counter()
            try:
                return fn(snap)
            finally:
                nested = sum(map(sum, (times_ref["delta pass"], times_ref["holdout eval"]))) - nested0
                metric_ms[key].append((time.perf_counter() - t0) * 1e3 - nested)

        m.compute = timed_compute  # type: ignore[method-assign]
    model, opt = preset.fresh()
    telemetry.set_holdout_data(preset.holdout)
    telemetry.start(model, opt)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(collections_n):
        batch = preset.batches[i % len(preset.batches)]
        out_ = model(*[batch[k] for k in preset.input_keys])
        loss = loss_fn(out_, batch["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, i, 0, None, batch, loss=loss, outputs=out_)
    return telemetry.stop().records_written


times_ref: dict[str, list[float]] = collections.defaultdict(list)  # the stage timings (main's `times`)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wide")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the worker's worker_threads: 1)")
    parser.add_argument("--collections", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, specs, tcfg = stress_test.load_config(stress_test.DEFAULT_CONFIG)
    preset = stress_test.build_preset(args.preset, specs[args.preset])
    times = times_ref

    def timed(owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[label].append((time.perf_counter() - t0) * 1e3)

        setattr(owner, attr, wrapper)

    timed(reference_mod.ReferenceCheckpoint, "distances", "delta pass")
    timed(reference_mod.ReferenceCheckpoint, "save", "reference save")
    timed(processor_mod.SnapshotProcessor, "evaluate", "holdout eval")
    timed(processor_mod.SnapshotProcessor, "handle", "whole record")
    metric_ms: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        per_record = record_chain(preset, tcfg, Path(tmp), args.collections, metric_ms)
        # The activation statistics' cost is in their hooks on the holdout forward: the same
        # chain without them, and the difference of the holdout stage.
        plain: dict[str, list[float]] = collections.defaultdict(list)
        with_hooks = list(times["holdout eval"])
        times["holdout eval"].clear()
        record_chain(preset, {**tcfg, "track_activations": False}, Path(tmp) / "b", args.collections, plain)
        without_hooks = list(times["holdout eval"])
        times["holdout eval"] = with_hooks
        model, _ = preset.fresh()
        model.eval()
        holdout_inputs = [preset.holdout[k] for k in preset.input_keys]

        def bare_forward() -> None:
            with torch.no_grad():
                model(*holdout_inputs)

        floor = floors([p.detach() for p in model.parameters()], Path(tmp), bare_forward)
    del per_record
    med = {k: statistics.median(v[2:] or v) for k, v in times.items()}
    med["rest"] = med["whole record"] - med["delta pass"] - med["reference save"] - med.get("holdout eval", 0.0)
    stage_floor = {"delta pass": floor["read"] + floor["copy"], "reference save": floor["write"],
                   "holdout eval": floor["forward"], "rest": 0.0}
    stage_floor["whole record"] = sum(stage_floor[k] for k in ("delta pass", "reference save", "holdout eval"))
    print(f"{args.preset}: {preset.describe()}, {preset.state_bytes / 2**20:.1f} MiB of weights; torch threads "
          f"{args.threads}; floors: read {floor['read']:.1f} ms, pread copy {floor['copy']:.1f} ms, "
          f"write {floor['write']:.1f} ms, holdout forward {floor['forward']:.1f} ms")
    print()
    print("| stage | ms (median) | floor ms | x floor |")
    print("|---|---|---|---|")
    for k in ("delta pass", "reference save", "holdout eval", "rest", "whole record"):
        if k in med:
            f = stage_floor[k]
            print(f"| {k} | {med[k]:.1f} | {f:.1f} | {med[k] / f:.2f}x |" if f else f"| {k} | {med[k]:.1f} | - | - |")
    record = med["whole record"]
    hooks = statistics.median(with_hooks[2:] or with_hooks) - statistics.median(without_hooks[2:] or without_hooks)
    print()
    print(f"Per metric, ms per record (median; the stages they trigger first are counted as stages above), "
          f"of a {record:.1f} ms record:")
    print()
    print("| metric (record key) | ms | share of the record |")
    print("|---|---|---|")
    rows = [(k, statistics.median(v[2:] or v)) for k, v in metric_ms.items()]
    rows.append(("activations: hooks on the holdout forward (in holdout eval)", hooks))
    for key, ms in sorted(rows, key=lambda kv: -kv[1]):
        print(f"| {key} | {ms:.2f} | {100 * ms / record:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
