#!/usr/bin/env python3
"""Stress test: what telemetry costs a training step, per mode, against no telemetry ("off").

    python scripts/stress_test.py                          # full run (~15 min on 2 cores) -> runs/stress/
    python scripts/stress_test.py --quick                  # a few steps of everything (CI)
    python scripts/stress_test.py --presets conv --every 10 200 --repeats 5 --modes drop block

Modes (each a telemetry config; ``MODE_CONFIG``): ``drop`` (the default config: ``mode:
auto``, ``on_full: drop``, ``overhead_budget: auto``, 0.10), ``block`` (``on_full: block``:
every collection; the budget is off there), ``sync`` (records built inline, the seed's
design), ``budget`` (drop with ``overhead_budget`` 0.05 unless ``stress.budget`` says
otherwise), ``worker-drop`` / ``worker-block`` (drop / block with ``mode: async``: the
worker, whatever auto would choose); ``async`` is read as ``drop``. Per mode and interval:
the mean step and the collection step as ratios to "off" in the same run, the share of
collections asked for whose record was written, and who built the records.

A benchmark, not a test: it prints ratios against "off" measured in the same run and
writes ``stress.json`` (every number) and ``stress.md`` (the table docs/benchmarks.md and
the README show). See docs/benchmarks.md for what each column means.

How it measures (nanoGPT's bench.py: the training loop with everything else removed):

- one *segment* = a fresh copy of the preset's initial weights and optimizer, warm-up
  steps with the hook on (the first collection and its one-time costs fall in it), a wait
  until the worker has written what the warm-up took, then the measured steps, starting at
  a collection step, in whole ``collect_every_n`` periods. Each step is timed with
  ``perf_counter_ns``; so is the hook call alone, exactly as users write it::

      telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch, loss=loss, outputs=outputs)

- per preset and repeat the segments run off, floor, then per collect_every_n its
  telemetry segments (one per mode) and another off; odd repeats run reversed. Every ratio divides by the
  mean of the off segments just before and after it (slow drift cancels); the table shows
  the median over repeats, and "off vs off noise" the noise floor of every ratio.
- the *floor* is what any exact snapshot must cost: one ``torch._foreach_copy_`` of the
  same weights into pre-allocated shared memory plus one ``torch._foreach_norm`` of the
  gradients, run in the loop at the point the hook would run (so with the same cache state).
- the non-collection cost of the hook is timed directly (a tight loop of
  ``on_batch_end`` on a non-collection ``batch_idx`` minus the same loop calling an empty
  function with the same signature): a few hundred ns is far below step noise.
- peak RSS: the trainer's ``VmHWM`` (reset per segment through ``/proc/self/clear_refs``)
  and the worker's ``VmHWM`` read just before ``stop()``. Shared-memory slot pages count
  in both processes' RSS; ``RssShmem`` and the slot bytes are reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as tmp
import yaml
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, read_records
from train_telemetry.demo import SiameseNet, make_optimizer
from train_telemetry.snapshot import pin_in_place

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "stress.yaml"
MODES = ("off", "drop", "block", "sync", "budget", "worker-drop", "worker-block")
ALIASES = {"async": "drop"}  # the old name of the default mode
DEFAULT_BUDGET = 0.05
# What each telemetry mode sets on top of the telemetry section of configs/stress.yaml.
# drop, block and budget keep telemetry's default mode (auto: where the records are built
# is telemetry's choice, written in each record); worker-* force the worker (mode: async).
MODE_CONFIG: dict[str, dict[str, Any]] = {
    "drop": {"mode": "auto", "on_full": "drop"},
    "block": {"mode": "auto", "on_full": "block"},
    "sync": {"mode": "sync"},
    "budget": {"mode": "auto", "on_full": "drop", "overhead_budget": DEFAULT_BUDGET},
    "worker-drop": {"mode": "async", "on_full": "drop"},
    "worker-block": {"mode": "async", "on_full": "block"},
}
TELEMETRY_MODES = tuple(MODE_CONFIG)
FLOOR_STEPS = 60
BUDGET_SETTLE_S = 3.0  # warm-up of a segment with an overhead budget: its 1 s periods x 3
SEED = 0

STRESS_KEYS = {
    "presets": list, "modes": list, "collect_every_n": list, "repeats": int, "threads": int,
    "output_dir": str, "segment_time_limit_s": (int, float), "microbench_calls": int,
    "quiet_wait_s": (int, float), "quiet_cpu": (int, float), "budget": (int, float),
    "budget_settle_s": (int, float),
}
PRESET_KEYS = {
    "kind": str, "width": int, "embed": int, "image_size": int, "in_features": int, "hidden": int,
    "depth": int, "batch_size": int, "optimizer": str, "steps": int, "warmup_steps": int,
}
# --quick: every code path, a few steps each, small wide model (tests/e2e/test_stress_script.py).
# One interval, 2: collection and idle steps alternate, so both hook paths run (each interval
# more is 12 worker starts). One trainer thread: a CI machine is busy, and a descheduled
# second thread stalls every op.
QUICK = {"collect_every_n": [2], "repeats": 1, "segment_time_limit_s": 5.0, "microbench_calls": 2000,
         "quiet_wait_s": 0.0, "threads": 1, "budget_settle_s": 0.0}
QUICK_PRESET = {"steps": 8, "warmup_steps": 2}
QUICK_SIZES = {"siamese": {"width": 8, "embed": 16, "image_size": 8, "batch_size": 16},
               "mlp": {"in_features": 64, "hidden": 256}}


class StressConfigError(ValueError):
    """configs/stress.yaml or a flag is wrong; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------- config
def load_config(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(stress settings, presets, telemetry section) of ``path``, every key checked."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StressConfigError(f"{path}: cannot read it: {exc}") from None
    for key in data:
        if key not in ("stress", "presets", "telemetry"):
            raise StressConfigError(f"{path}: unknown top-level key {key!r} (allowed: stress, presets, telemetry)")
    stress = dict(data.get("stress") or {})
    _check_keys(stress, STRESS_KEYS, f"{path}: stress")
    stress["modes"] = [ALIASES.get(m, m) for m in stress.get("modes", [])]
    for mode in stress["modes"]:
        if mode not in MODES:
            hint = " (YAML reads a bare off as false: write 'off')" if mode is False else ""
            raise StressConfigError(f"{path}: stress.modes: {mode!r}{hint}; allowed: {', '.join(MODES)}")
    presets = dict(data.get("presets") or {})
    for name, preset in presets.items():
        _check_keys(preset, PRESET_KEYS, f"{path}: presets.{name}")
        if preset.get("kind") not in ("siamese", "mlp"):
            raise StressConfigError(f"{path}: presets.{name}.kind: {preset.get('kind')!r}; allowed: siamese, mlp")
        if preset.get("optimizer", "adamw") not in ("adamw", "sgd"):
            raise StressConfigError(f"{path}: presets.{name}.optimizer: {preset['optimizer']!r}; allowed: adamw, sgd")
    telemetry = dict(data.get("telemetry") or {})
    try:
        TelemetryConfig.from_dict(telemetry, source=f"{path}: telemetry")
    except TelemetryConfigError as exc:
        raise StressConfigError(str(exc)) from None
    return stress, presets, telemetry


def _check_keys(section: dict[str, Any], allowed: dict[str, Any], where: str) -> None:
    for key, value in section.items():
        if key not in allowed:
            raise StressConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")
        if not isinstance(value, allowed[key]) or isinstance(value, bool):
            raise StressConfigError(f"{where}.{key}: {value!r} is not a {allowed[key]}")


# ---------------------------------------------------------------------- presets
@dataclass
class Preset:
    """A model, its optimizer recipe and fixed random batches; every segment starts from ``init_state``."""

    name: str
    spec: dict[str, Any]
    model: nn.Module
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batches: list[dict[str, torch.Tensor]]
    holdout: dict[str, torch.Tensor]
    input_keys: list[str]
    init_state: dict[str, torch.Tensor] = field(default_factory=dict)
    off_step_s: float | None = None  # mean step of the latest "off" segment

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def state_bytes(self) -> int:
        """Bytes of parameters + buffers: one slot, and the worker's model copy."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.model.load_state_dict(self.init_state)
        self.model.train()
        return self.model, self.make_optimizer(self.model)

    def describe(self) -> str:
        s = self.spec
        if s["kind"] == "siamese":
            arch = f"SiameseNet(width={s['width']}, embed={s['embed']}) on {s['image_size']}x{s['image_size']} pairs"
        else:
            dims = [s["in_features"]] + [s["hidden"]] * s["depth"] + [2]
            arch = "MLP " + "->".join(str(d) for d in dims)
        return f"{arch}, batch {s['batch_size']}, {s.get('optimizer', 'adamw')}"


def build_preset(name: str, spec: dict[str, Any], device: str = "cpu") -> Preset:
    """The preset's model and training batches on ``device``; the holdout stays on the CPU (the worker's)."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    b = spec["batch_size"]
    if spec["kind"] == "siamese":
        model: nn.Module = SiameseNet(width=spec["width"], embed=spec["embed"])
        hw = spec["image_size"]

        def sample(n: int) -> dict[str, torch.Tensor]:
            return {"img1": torch.randn(n, 1, hw, hw, generator=g), "img2": torch.randn(n, 1, hw, hw, generator=g),
                    "winner": torch.randint(0, 2, (n,), generator=g)}

        input_keys = ["img1", "img2"]
    else:
        dims = [spec["in_features"]] + [spec["hidden"]] * spec["depth"]
        layers: list[nn.Module] = []
        for a, c in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, c), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(dims[-1], 2))  # torch classes only: pickles anywhere

        def sample(n: int) -> dict[str, torch.Tensor]:
            return {"x": torch.randn(n, spec["in_features"], generator=g), "winner": torch.randint(0, 2, (n,), generator=g)}

        input_keys = ["x"]
    batches = [{k: v.to(device) for k, v in sample(b).items()} for _ in range(8)]
    model.to(device)
    opt_name = spec.get("optimizer", "adamw")

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        if isinstance(m, SiameseNet) and opt_name == "adamw":
            return make_optimizer(m)  # the demo's named groups: backbone 1x, head 10x
        if opt_name == "sgd":
            return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        return torch.optim.AdamW(m.parameters(), lr=1e-4)

    preset = Preset(name, spec, model, make_opt, batches, sample(50), input_keys)
    preset.init_state = {k: v.clone() for k, v in model.state_dict().items()}
    return preset


# ---------------------------------------------------------------------- /proc readers
def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a process, in MiB (empty if it is gone)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024.0
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes have been busy since boot (every core, from /proc/stat)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    return 0.0


def wait_for_quiet(max_wait_s: float, max_cores: float) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until other processes use < ``max_cores`` cores; (waited s, their load).

    On a shared machine other jobs' bursts cost more than anything measured here (a
    2-thread trainer whose threads are descheduled waits at every parallel region).
    """
    t0 = time.perf_counter()
    while True:
        b0 = machine_busy_s()
        time.sleep(0.5)
        load = (machine_busy_s() - b0) / 0.5  # we are asleep: all of it is someone else's
        waited = time.perf_counter() - t0
        if load < max_cores or waited >= max_wait_s:
            return waited, load


def set_sched_idle(pid: int) -> bool:
    """Put every thread of ``pid`` in SCHED_IDLE (runs only on otherwise idle cores); False if refused.

    An experiment for --worker-sched idle: what a worker that yields harder than nice would cost.
    """
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _bare_worker_rss(result: Any, threads: int) -> None:
    """A spawned process that imports what the worker imports and stops: the worker's fixed RSS."""
    import train_telemetry.worker  # noqa: F401  (the import is the point: its RSS)

    torch.set_num_threads(threads)
    result.put(proc_status())


def measure_bare_worker(threads: int) -> dict[str, float]:
    ctx = tmp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_bare_worker_rss, args=(result, threads))
    proc.start()
    try:
        return result.get(timeout=120)  # type: ignore[no-any-return]
    finally:
        proc.join(30)


# ---------------------------------------------------------------------- one segment
def wait_for_worker(telemetry: Telemetry, collections: int, timeout_s: float = 60.0) -> float:
    """Wait until the worker has written every snapshot the warm-up took; the seconds it took."""
    t0 = time.perf_counter()
    want = collections - telemetry.snapshots_dropped
    path = telemetry.records_file
    while path is not None and time.perf_counter() - t0 < timeout_s:
        with contextlib.suppress(OSError):
            if path.read_bytes().count(b"\n") >= want:
                break
        time.sleep(0.02)
    return time.perf_counter() - t0


def _empty_hook(model: Any, optimizer: Any, batch_idx: int, epoch: int = 0, device: Any = None,
                batch: Any = None, *, loss: Any = None, outputs: Any = None) -> None:
    """The baseline of the non-collection microbenchmark: on_batch_end's signature, no body."""


def time_idle_hook(hook: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any], calls: int) -> dict[str, float]:
    """ns per call of ``hook`` on a non-collection step, minus an empty function's (min and median of 7)."""
    hook_ns: list[float] = []
    empty_ns: list[float] = []
    for _ in range(7):
        for fn, acc in ((hook, hook_ns), (_empty_hook, empty_ns)):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn(*args, **kwargs)
            acc.append((time.perf_counter_ns() - t0) / calls)
    return {
        "hook_ns_min": min(hook_ns), "empty_ns_min": min(empty_ns),
        "added_ns_min": min(hook_ns) - min(empty_ns),
        "added_ns_median": statistics.median(hook_ns) - statistics.median(empty_ns),
    }


def floor_op(layout_sources: list[torch.Tensor], dst: list[torch.Tensor], params: list[nn.Parameter]) -> None:
    """What any exact snapshot must do: one fused copy into shared memory, one fused norm."""
    torch._foreach_copy_(dst, layout_sources, non_blocking=layout_sources[0].is_cuda)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_norm(grads)


def _no_sync() -> None:
    pass


def _steps_to_settle(preset: Preset, warmup: int, settle_s: float) -> int:
    """Warm-up steps that last ``settle_s`` at the preset's step time (the mean of the latest
    off segment; 50 ms before one has run); at least ``warmup``."""
    if settle_s <= 0:
        return warmup
    step_s = preset.off_step_s or 0.05
    return max(warmup, math.ceil(settle_s / step_s))


def run_segment(preset: Preset, mode: str, every: int, repeat: int, tcfg: dict[str, Any], settings: dict[str, Any],
                run_dir: Path, keep_runs: bool) -> dict[str, Any]:
    """Train ``steps`` measured steps of ``preset`` with telemetry ``mode``; return every number of it."""
    spec = preset.spec
    warmup, steps = spec["warmup_steps"], spec["steps"]
    if mode == "floor":
        steps = min(steps, FLOOR_STEPS)  # only the floor op's time matters here
    steps = max(every, math.ceil(steps / every) * every)  # whole periods: collections = steps / every
    limit_s = float(settings["segment_time_limit_s"])
    model, optimizer = preset.fresh()
    loss_fn = nn.CrossEntropyLoss()
    device = torch.device(settings.get("device", "cpu"))
    # CUDA: a step's time includes its GPU work (synchronize after the hook, outside the
    # hook's own timing), so a hook that synchronized would show as a long hook time.
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    keys = preset.input_keys
    gc.collect()
    telemetry: Telemetry | None = None
    floor: Callable[[], None] | None = None
    seg: dict[str, Any] = {"preset": preset.name, "mode": mode, "every": every, "repeat": repeat}
    if mode == "floor":
        params = list(model.parameters())
        sources = [t.detach() for t in [*params, *model.buffers()]]
        dst = [torch.zeros_like(t, device="cpu").share_memory_() for t in sources]
        if device.type == "cuda":  # pinned, as the slots are: the copy is asynchronous
            for t in dst:
                pin_in_place(t)

        def floor() -> None:
            floor_op(sources, dst, params)

    seg["peak_reset"] = reset_peak_rss()
    out = run_dir / f"{preset.name}-{mode}-{every}-r{repeat}"
    if mode in TELEMETRY_MODES:
        if out.exists():
            shutil.rmtree(out)
        mode_cfg = dict(MODE_CONFIG[mode])
        if mode == "budget":
            mode_cfg["overhead_budget"] = float(settings.get("budget", DEFAULT_BUDGET))
        cfg = TelemetryConfig.from_dict({**tcfg, **mode_cfg, "collect_every_n": every, "output_dir": str(out),
                                         "input_keys": keys, "label_key": "winner"})
        telemetry = Telemetry(cfg)
        telemetry.set_holdout_data(preset.holdout)
        t0 = time.perf_counter()
        telemetry.start(model, optimizer)
        seg["start_s"] = time.perf_counter() - t0
        if settings.get("worker_sched") == "idle" and telemetry.worker_pid is not None:
            seg["worker_sched_idle"] = set_sched_idle(telemetry.worker_pid)
    load_before = os.getloadavg()[0]
    cpu0 = time.process_time()
    busy0, wall0 = machine_busy_s(), time.perf_counter()

    step_ns: list[int] = []
    hook_ns: list[int] = []
    dropped_at: list[bool] = []
    epoch = 0
    nb = len(preset.batches)
    # Warm-up batch_idx 0..warmup-1 (its collection at 0 pays the one-time costs); with an
    # overhead budget, warm-up goes on at the same cadence for BUDGET_SETTLE_S, the 2-3 budget
    # periods the budget takes to find its stride (what a run pays once, like the one-time
    # costs; a 9 s segment would otherwise measure mostly the settling). Then, once the
    # worker has written what the warm-up took, the measured steps start *at* a collection
    # step (batch_idx jumps to the next multiple of every), so the window holds steps/every
    # whole periods and the worker's work on each collection falls inside it.
    if telemetry is not None and telemetry.config.effective_overhead_budget is not None:
        warmup = _steps_to_settle(preset, warmup, float(settings.get("budget_settle_s", BUDGET_SETTLE_S)))
    base = every * math.ceil(warmup / every)
    indices = [*range(warmup), *range(base, base + steps)]
    seg["warmup_steps"] = warmup
    t_start = 0.0
    for i, batch_idx in enumerate(indices):
        measured = i - warmup
        if measured == 0:
            if telemetry is not None and telemetry.worker_pid is not None:
                seg["settle_s"] = wait_for_worker(telemetry, sum(1 for j in range(warmup) if j % every == 0))
            t_start = time.perf_counter()
        elif measured > 0 and measured % every == 0 and time.perf_counter() - t_start > limit_s:
            break
        batch = preset.batches[i % nb]
        dropped0 = telemetry.snapshots_dropped if telemetry is not None else 0
        t0 = time.perf_counter_ns()
        outputs = model(*[batch[k] for k in keys])
        loss = loss_fn(outputs, batch["winner"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter_ns()
        if telemetry is not None:
            telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch, loss=loss, outputs=outputs)
        elif floor is not None and batch_idx % every == 0:
            floor()
        t2 = time.perf_counter_ns()
        sync()
        t3 = time.perf_counter_ns()
        if measured >= 0:
            step_ns.append(t3 - t0)
            hook_ns.append(t2 - t1)
            dropped_at.append(telemetry is not None and telemetry.snapshots_dropped > dropped0)
    seg["train_cpu_s"] = time.process_time() - cpu0
    seg["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    busy, wall = machine_busy_s() - busy0, time.perf_counter() - wall0
    measured_idx = indices[warmup:warmup + len(step_ns)]
    collect = [b % every == 0 and mode != "off" for b in measured_idx]
    seg.update(step_stats(step_ns, hook_ns, collect, dropped_at))

    if telemetry is not None:
        if every > 1:  # the non-collection hook, timed directly (step noise hides it)
            idle_idx = every * 1000 + 1
            seg["idle_hook"] = time_idle_hook(
                telemetry.on_batch_end, (model, optimizer, idle_idx, epoch, device, preset.batches[0]),
                {"loss": loss, "outputs": outputs}, int(settings["microbench_calls"]))
        seg["trainer"] = proc_status()
        pid = telemetry.worker_pid
        if pid is not None:
            seg["worker"] = proc_status(pid)
            seg["worker_cpu_s"] = proc_cpu_seconds(pid)
            # The worker's CPU since start, not just in the steps: an overestimate, on the safe side.
            busy -= seg["worker_cpu_s"] or 0.0
        t0 = time.perf_counter()
        summary = telemetry.stop()
        seg["stop_s"] = time.perf_counter() - t0
        seg["summary"] = {k: getattr(summary, k) for k in (
            "records_written", "snapshots_taken", "snapshots_dropped", "hook_errors", "clean", "stop_seconds",
            "overhead")}  # overhead: what the budget measured (None without one), the whole segment
        run_info = json.loads((out / "run.json").read_text())
        seg["slot_bytes"] = run_info.get("slot_bytes")
        seg["slot_meta_bytes"] = run_info.get("slot_meta_bytes") or 0
        records = read_records(out)
        hook_ms = [r["telemetry"]["hook_ms"] for r in records if "telemetry" in r]
        seg["record_hook_ms_median"] = statistics.median(hook_ms) if hook_ms else None
        seg["record_count"] = len(records)
        # Delivered: records written for the measured window's collections / collections asked for there.
        window = set(measured_idx)
        asked = sum(collect)
        seg["records_in_window"] = sum(1 for r in records if r["batch_idx"] in window)
        seg["delivered"] = seg["records_in_window"] / asked if asked else None
        seg["built_by"] = sorted({str(r.get("telemetry", {}).get("built_by")) for r in records})
        seg["resolved_mode"] = telemetry.mode
        if not keep_runs:
            shutil.rmtree(out, ignore_errors=True)
    else:
        seg["trainer"] = proc_status()
    # Other processes' CPU during the measured steps, in cores: the noise this segment saw.
    seg["other_load_cores"] = max(0.0, (busy - seg["train_cpu_s"]) / wall) if wall > 0 else None
    return seg


def step_stats(step_ns: Sequence[int], hook_ns: Sequence[int], collect: Sequence[bool], dropped: Sequence[bool]) -> dict[str, Any]:
    """Latency statistics of one segment, in ms."""
    ms = [t / 1e6 for t in step_ns]
    hook = [t / 1e6 for t in hook_ns]
    srt = sorted(ms)
    taken = [i for i, c in enumerate(collect) if c and not dropped[i]]
    coll = [i for i, c in enumerate(collect) if c]
    normal = [i for i, c in enumerate(collect) if not c]
    # Plain: not within AFTER steps of a collection taken (its step and the ones its record
    # leaves cold caches in): the step without telemetry, measured in the same segment, so
    # conv's drift between segments (up to +-10% here) does not enter mean / plain.
    near = {j for i in taken for j in range(i, i + 3)}
    plain = [ms[i] for i in range(len(ms)) if i not in near]
    return {
        "plain_mean_ms": statistics.fmean(plain) if len(plain) >= 8 else None,
        "steps": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": _pct(srt, 50),
        "p99_ms": _pct(srt, 99),
        "max_ms": srt[-1],
        "normal_mean_ms": statistics.fmean(ms[i] for i in normal) if normal else None,
        "collections": len(coll),
        "dropped_in_measured": sum(1 for i in coll if dropped[i]),
        "collect_mean_ms": statistics.fmean(ms[i] for i in coll) if coll else None,
        "collect_taken_mean_ms": statistics.fmean(ms[i] for i in taken) if taken else None,
        "hook_collect_mean_ms": statistics.fmean(hook[i] for i in taken) if taken else None,
        "hook_collect_p50_ms": statistics.median(hook[i] for i in taken) if taken else None,
        "hook_drop_mean_ms": statistics.fmean(hook[i] for i in coll if dropped[i]) if len(coll) > len(taken) else None,
        "hook_normal_mean_ms": statistics.fmean(hook[i] for i in normal) if normal else None,
    }


def _pct(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------------- aggregation
def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def aggregate(segments: list[dict[str, Any]], preset: Preset, bare_worker: dict[str, float]) -> dict[str, Any]:
    """Per (mode, every): medians over repeats of each number and of its ratio to the off around it.

    Each segment's baseline is the mean of the off segments just before and just after it in the
    run (the plan puts one between every group), so slow drift of the machine cancels.
    """
    segs = [s for s in segments if s["preset"] == preset.name]
    offs = [s for s in segs if s["mode"] == "off"]

    def base(seg: dict[str, Any]) -> dict[str, float]:
        same = [o for o in offs if o["repeat"] == seg["repeat"]]
        before = [o for o in same if o["order"] < seg["order"]][-1:]
        after = [o for o in same if o["order"] > seg["order"]][:1]
        near = before + after or same
        if not near:
            return {}
        out = {k: statistics.fmean(o[k] for o in near) for k in ("mean_ms", "p50_ms", "p99_ms", "max_ms")}
        out["hwm"] = statistics.fmean(o["trainer"].get("VmHWM", 0.0) for o in near)
        out["rss"] = statistics.fmean(o["trainer"].get("VmRSS", 0.0) for o in near)
        return out

    bases = {id(s): base(s) for s in segs}
    aa = [abs(b["mean_ms"] / a["mean_ms"] - 1) for a, b in zip(offs[:-1], offs[1:], strict=True)
          if a["repeat"] == b["repeat"]]  # off vs the next off: the noise floor of every ratio
    floor_ms = _median([_floor_mean(s) for s in segs if s["mode"] == "floor"])
    rows: list[dict[str, Any]] = []
    for mode, every in sorted({(s["mode"], s["every"]) for s in segs}, key=_row_order):
        group = [s for s in segs if s["mode"] == mode and s["every"] == every]
        row: dict[str, Any] = {"mode": mode, "every": every if mode not in ("off",) else None, "repeats": len(group)}
        for k in ("steps", "mean_ms", "p50_ms", "p99_ms", "max_ms", "normal_mean_ms", "collections",
                  "dropped_in_measured", "collect_mean_ms", "collect_taken_mean_ms", "hook_collect_mean_ms",
                  "hook_collect_p50_ms", "hook_drop_mean_ms", "start_s", "stop_s", "worker_cpu_s",
                  "train_cpu_s", "record_hook_ms_median", "delivered"):
            row[k] = _median([s.get(k) for s in group])
        row["built_by"] = sorted({b for s in group for b in s.get("built_by", ())})
        for k in ("mean_ms", "p50_ms", "p99_ms", "max_ms"):
            row[k.replace("_ms", "_x_off")] = _median([_ratio(s[k], bases[id(s)].get(k)) for s in group])
        row["collect_x_off"] = _median([_ratio(s.get("collect_taken_mean_ms"), bases[id(s)].get("mean_ms"))
                                       for s in group])
        row["collect_x_normal"] = _median([_ratio(s.get("collect_taken_mean_ms"), s.get("normal_mean_ms")) for s in group])
        row["mean_x_plain"] = _median([_ratio(s.get("mean_ms"), s.get("plain_mean_ms")) for s in group])
        row["hook_x_floor"] = _ratio(row["hook_collect_mean_ms"], floor_ms) if mode != "floor" else 1.0
        row["hook_p50_x_floor"] = _ratio(row["hook_collect_p50_ms"], floor_ms) if mode != "floor" else 1.0
        row["trainer_peak_mb"] = _median([s["trainer"].get("VmHWM") for s in group])
        row["trainer_added_mb"] = _median([s["trainer"].get("VmHWM", 0.0) - bases[id(s)]["hwm"]
                                           for s in group if bases[id(s)] and s.get("peak_reset")])
        row["trainer_steady_added_mb"] = _median([s["trainer"].get("VmRSS", 0.0) - bases[id(s)]["rss"]
                                                  for s in group if bases[id(s)]])
        if any("worker" in s for s in group):
            row["worker_peak_mb"] = _median([s["worker"].get("VmHWM") for s in group if "worker" in s])
            row["worker_added_mb"] = _median([s["worker"].get("VmHWM", 0.0) - bare_worker.get("VmHWM", 0.0)
                                              for s in group if "worker" in s])
            row["worker_shmem_mb"] = _median([s["worker"].get("RssShmem") for s in group if "worker" in s])
        if any("summary" in s for s in group):
            row["snapshots_taken"] = _median([s["summary"]["snapshots_taken"] for s in group if "summary" in s])
            row["snapshots_dropped"] = _median([s["summary"]["snapshots_dropped"] for s in group if "summary" in s])
            row["all_clean"] = all(s["summary"]["clean"] for s in group if "summary" in s)
            row["budget_measured"] = _median([s["summary"].get("overhead") for s in group if "summary" in s])
        idle = [s["idle_hook"] for s in group if "idle_hook" in s]
        if idle:
            row["idle_hook_added_ns"] = _median([i["added_ns_min"] for i in idle])
            row["idle_hook_added_ns_median"] = _median([i["added_ns_median"] for i in idle])
        rows.append(row)
    slot_bytes = next((s["slot_bytes"] for s in segs if s.get("slot_bytes")), None)
    slot_meta_bytes = next((s["slot_meta_bytes"] for s in segs if s.get("slot_meta_bytes")), 0)
    idle_async = next((r.get("idle_hook_added_ns") for r in rows if r["mode"] in TELEMETRY_MODES and r["mode"] != "sync"
                       and "idle_hook_added_ns" in r), None)
    return {
        "preset": preset.name,
        "description": preset.describe(),
        "num_params": preset.num_params,
        "state_bytes": preset.state_bytes,
        "slot_bytes": slot_bytes,
        "slot_meta_bytes": slot_meta_bytes,
        "floor_ms": floor_ms,
        "off_mean_ms": _median([o["mean_ms"] for o in offs]),
        "off_aa_noise": _median(aa),
        "idle_hook_added_ns": idle_async,
        "rows": rows,
    }


def _floor_mean(seg: dict[str, Any]) -> float | None:
    # A floor segment runs the floor op at each collection step; the loop-timed "hook" is it.
    return seg.get("hook_collect_mean_ms")


def _row_order(key: tuple[str, int]) -> tuple[int, int]:
    order = {"off": 0, "floor": 1, **{m: i + 2 for i, m in enumerate(TELEMETRY_MODES)}}
    return order.get(key[0], 9), key[1]


# ---------------------------------------------------------------------- targets and output
def evaluate_targets(result: dict[str, Any], num_slots: int) -> list[dict[str, Any]]:
    """Issue 27's targets (and the earlier ones that still apply), each with the measured number and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, fmt: str, where: str, at_least: bool = False) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": name, "where": where, "value": value, "limit": limit,
                    "limit_text": (">= " if at_least else "<= ") + fmt.format(limit),
                    "met": met, "text": fmt.format(value) if value is not None else "n/a"})

    idle_core = result["env"]["threads"] < result["env"]["cpus"]  # a trainer that leaves a core idle
    for p in result["presets"]:
        name = p["preset"]
        add("non-collection step: hook added", p["idle_hook_added_ns"], 5000, "{:.0f} ns", name)
        rows = {(r["mode"], r["every"]): r for r in p["rows"]}
        everies = sorted({r["every"] for r in p["rows"] if r["mode"] in TELEMETRY_MODES})
        for every in everies:
            r = rows.get(("drop", every))
            if r:
                delivered = "" if r.get("delivered") is None else f", {100 * r['delivered']:.0f}% delivered"
                add(f"default (drop, budget auto 0.10): mean step / off (every {every}{delivered})",
                    r["mean_x_off"], 1.10, "{:.3f}x", name)
                # the same against the segment's own plain steps: free of the drift between segments
                add(f"default (drop): mean step / its plain steps (every {every})", r.get("mean_x_plain"), 1.10,
                    "{:.3f}x", name)
            r = rows.get(("budget", every))
            if r:
                add(f"budget 0.05: mean step / off (every {every})", r["mean_x_off"], 1.05, "{:.3f}x", name)
                add(f"budget 0.05: mean step / its plain steps (every {every})", r.get("mean_x_plain"), 1.05,
                    "{:.3f}x", name)
            r = rows.get(("block", every))
            if r and idle_core and every in (1, 10):  # every record, with a core to spare
                add(f"idle core, every record (block): mean step / off (every {every})", r["mean_x_off"],
                    1.3 if every == 1 else 1.05, "{:.3f}x", name)
        r = next((r for r in p["rows"] if r.get("worker_added_mb") is not None), None)
        if r and p["slot_bytes"]:
            # Both processes' RSS count the slot pages: subtract the pool once.
            pool = num_slots * (p["slot_bytes"] + p.get("slot_meta_bytes", 0)) / 2**20
            budget = pool + p["state_bytes"] / 2**20
            added = (r["trainer_added_mb"] or 0.0) + r["worker_added_mb"] - pool
            p["memory"] = {"slot_pool_mb": pool, "model_copy_mb": p["state_bytes"] / 2**20, "budget_mb": budget,
                           "peak_added_mb": added, "trainer_peak_added_mb": r["trainer_added_mb"],
                           "trainer_steady_added_mb": r["trainer_steady_added_mb"],
                           "worker_peak_added_mb": r["worker_added_mb"]}
            out.append({"target": "peak memory added vs slot pool + model copy", "where": name,
                        "value": added, "limit": budget, "limit_text": f"<= {budget:.1f} MiB", "met": added <= budget,
                        "text": f"{added:.0f} MiB (trainer +{r['trainer_added_mb']:.0f}, worker "
                                f"+{r['worker_added_mb']:.0f}, pool counted once)"})
    return out


def summary_table(p: dict[str, Any]) -> list[str]:
    """Per interval, one cell per mode: mean step (x off) / collection step (x off), records delivered;
    the mean step over the segment's own plain steps (x plain), and where a budget ran, the
    mean step it measured (x its baseline) over the whole segment."""
    rows = {(r["mode"], r["every"]): r for r in p["rows"]}
    modes = [m for m in TELEMETRY_MODES if any(k[0] == m for k in rows)]
    everies = sorted({k[1] for k in rows if k[0] in TELEMETRY_MODES})
    built = {m: "/".join(sorted({b for r in p["rows"] if r["mode"] == m for b in r.get("built_by", ())})) for m in modes}
    head = ["every"] + [f"{m} (built by {built[m] or '-'}): mean / collection step (x off), delivered" for m in modes]
    if "block" in modes and "sync" in modes:
        head.append("block / sync (mean)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for every in everies:
        cells = [str(every)]
        for m in modes:
            r = rows.get((m, every))
            measured = r and r.get("budget_measured")
            within = r and r.get("mean_x_plain")
            cells.append("-" if r is None else f"{_f(r['mean_x_off'])} / {_f(r['collect_x_off'])}, "
                         f"{_f(None if r.get('delivered') is None else 100 * r['delivered'], '.0f')}%"
                         + ("" if within is None else f"; x plain {within:.2f}")
                         + ("" if measured is None else f", budget read {1 + measured:.2f}"))
        if "block" in modes and "sync" in modes:
            b, s_ = rows.get(("block", every)), rows.get(("sync", every))
            cells.append(_f(_ratio(b and b["mean_x_off"], s_ and s_["mean_x_off"])))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"Measured {env['date']} on {env['cpus']} CPU cores ({env['cpu_model']})"
        f"{', training on ' + env['gpu'] if env.get('gpu') else ''}, torch {env['torch']}, "
        f"trainer torch threads {env['threads']}, worker threads {env['worker_threads']} at nice "
        f"+{env['worker_nice']}{' and SCHED_IDLE' if env['worker_sched'] == 'idle' else ''}, "
        f"{env['num_slots']} slots, {env['repeats']} repeats (medians). "
        f"Command: `{env['command']}`",
        "",
    ]
    for p in result["presets"]:
        lines += [
            f"**{p['preset']}**: {p['description']}; {p['num_params'] / 1e6:.2f}M parameters, "
            f"slot {p['state_bytes'] / 2**20:.1f} MiB; off step mean {_f(p['off_mean_ms'])} ms "
            f"(off vs off noise {_f((p['off_aa_noise'] or 0) * 100, '.1f')}%); floor (copy + fused norm) "
            f"{_f(p['floor_ms'], '.3f')} ms; non-collection hook +{_f(p['idle_hook_added_ns'], '.0f')} ns.",
            "",
            *summary_table(p),
            "",
            "| mode | every | mean ms (x off) | p50 ms (x) | p99 ms (x) | max ms (x) | collect step ms (x off) "
            "| hook at collect ms (x floor) | delivered | dropped / taken | trainer +MiB | worker MiB (+) | start s | stop s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p["rows"]:
            ev = "-" if r["every"] is None else str(r["every"])
            coll = "-" if r["collect_taken_mean_ms"] is None else f"{_f(r['collect_taken_mean_ms'])} ({_f(r['collect_x_off'], '.2f')})"
            hook = "-" if r["hook_collect_mean_ms"] is None else f"{_f(r['hook_collect_mean_ms'], '.3f')} ({_f(r['hook_x_floor'], '.2f')})"
            drops = f"{r['snapshots_dropped']:.0f} / {r['snapshots_taken']:.0f}" if "snapshots_taken" in r else "-"
            delivered = "-" if r.get("delivered") is None else f"{100 * r['delivered']:.0f}%"
            worker = f"{_f(r['worker_peak_mb'], '.0f')} (+{_f(r['worker_added_mb'], '.0f')})" if "worker_peak_mb" in r else "-"
            trainer = "-" if r["mode"] == "off" else _f(r["trainer_added_mb"], "+.0f")
            lines.append(
                f"| {r['mode']} | {ev} | {_f(r['mean_ms'])} ({_f(r['mean_x_off'], '.3f')}) | {_f(r['p50_ms'])} "
                f"({_f(r['p50_x_off'])}) | {_f(r['p99_ms'])} ({_f(r['p99_x_off'])}) | {_f(r['max_ms'])} "
                f"({_f(r['max_x_off'])}) | {coll} | {hook} | {delivered} | {drops} | {trainer} | {worker} | "
                f"{_f(r['start_s'])} | {_f(r['stop_s'])} |"
            )
        lines.append("")
    lines += ["Targets (issue 27; drop = the default config):", "", "| preset | target | measured | limit | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['where']} | {t['target']} | {t['text']} | {t['limit_text']} | {met} |")
    return "\n".join(lines) + "\n"


def summary_line(seg: dict[str, Any]) -> str:
    ev = "" if seg["mode"] == "off" else f" every {seg['every']:>3}"
    hook = f" hook@collect {seg['hook_collect_mean_ms']:.3f} ms" if seg.get("hook_collect_mean_ms") is not None else ""
    drops = (f" taken/dropped {seg['summary']['snapshots_taken']}/{seg['summary']['snapshots_dropped']}"
             f" delivered {seg['delivered']:.0%}" if "summary" in seg and seg.get("delivered") is not None else "")
    other = seg.get("other_load_cores")
    noise = f" others {other:.2f} cores" if other is not None else ""
    return (f"{seg['preset']:>5} r{seg['repeat']} {seg['mode']:>5}{ev:10s} {seg['steps']:4d} steps mean "
            f"{seg['mean_ms']:8.2f} ms p50 {seg['p50_ms']:8.2f} p99 {seg['p99_ms']:8.2f} max {seg['max_ms']:8.2f}"
            f"{hook}{drops}{noise}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def segment_plan(modes: Sequence[str], everies: Sequence[int], repeat: int) -> list[tuple[str, int]]:
    """One repeat: off, floor, then per collect_every_n one segment per telemetry mode and an off; odd repeats reversed."""
    plan: list[tuple[str, int]] = [("off", 1)]
    if any(m in TELEMETRY_MODES for m in modes):
        plan.append(("floor", 1))
    for every in everies:
        plan += [(mode, every) for mode in modes if mode != "off"]
        plan.append(("off", 1))  # an off next to every group: the baseline of the segments around it
    return plan[::-1] if repeat % 2 else plan


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="stress YAML (default configs/stress.yaml)")
    parser.add_argument("--presets", nargs="+", help="presets to run (default: stress.presets)")
    parser.add_argument("--modes", nargs="+", choices=(*MODES, *ALIASES),
                        help="modes (off always runs as the baseline; async = drop)")
    parser.add_argument("--every", nargs="+", type=int, help="collect_every_n values")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--steps", type=int, help="measured steps per segment, every preset")
    parser.add_argument("--threads", type=int, help="trainer torch threads (0 = every core)")
    parser.add_argument("--worker-nice", type=int, help="telemetry.tuning.worker_nice")
    parser.add_argument("--worker-threads", type=int, help="telemetry.tuning.worker_threads")
    parser.add_argument("--worker-sched", choices=["nice", "idle"], default="nice",
                        help="idle: also put the worker in SCHED_IDLE after start (an experiment; Linux)")
    parser.add_argument("--num-slots", type=int, help="telemetry.num_slots")
    parser.add_argument("--segment-time-limit", type=float, help="seconds after which a segment ends early")
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a few steps of every path, small wide model (CI)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each segment's telemetry run directory")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model trains (cuda: pinned slots, non-blocking copies; GPU memory not reported)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")

    try:
        settings, preset_specs, tcfg = load_config(args.config)
    except StressConfigError as exc:
        parser.error(str(exc))
    if args.quick:
        settings.update(QUICK)
        for spec in preset_specs.values():
            spec.update(QUICK_PRESET)
            spec.update(QUICK_SIZES[spec["kind"]])
    overrides = {"presets": args.presets, "modes": [ALIASES.get(m, m) for m in args.modes] if args.modes else None, "collect_every_n": args.every, "repeats": args.repeats,
                 "threads": args.threads, "segment_time_limit_s": args.segment_time_limit,
                 "worker_sched": args.worker_sched, "device": args.device,
                 "output_dir": str(args.output_dir) if args.output_dir else None}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key, flag in (("worker_nice", args.worker_nice), ("worker_threads", args.worker_threads)):
        if flag is not None:
            tcfg["tuning"] = {**(tcfg.get("tuning") or {}), key: flag}
    if args.num_slots is not None:
        tcfg["num_slots"] = args.num_slots
    tcfg_checked = TelemetryConfig.from_dict(tcfg)
    if args.steps:
        for spec in preset_specs.values():
            spec["steps"] = args.steps
    unknown = [p for p in settings["presets"] if p not in preset_specs]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; {args.config} defines {sorted(preset_specs)}")
    modes = [m for m in settings["modes"] if m in MODES]
    everies = [int(e) for e in settings["collect_every_n"]]
    if any(e < 1 for e in everies):
        parser.error(f"--every: {everies}: collect_every_n must be >= 1")

    threads = int(settings.get("threads", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    out_dir = Path(settings.get("output_dir", "runs/stress"))
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "segments"
    run_dir.mkdir(exist_ok=True)
    command = "python scripts/stress_test.py" + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    env = {
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
        "torch": str(torch.__version__), "python": platform.python_version(), "threads": threads,
        "worker_threads": tcfg_checked.worker_threads, "worker_nice": tcfg_checked.worker_nice,
        "worker_sched": settings["worker_sched"],
        "num_slots": tcfg_checked.num_slots, "repeats": int(settings["repeats"]), "command": command,
        "quick": args.quick, "loadavg_start": list(os.getloadavg()), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    print(f"stress test: presets {settings['presets']}, modes {modes}, every {everies}, "
          f"{settings['repeats']} repeats, trainer threads {threads}, output {out_dir}", flush=True)
    t_all = time.perf_counter()
    bare = measure_bare_worker(tcfg_checked.worker_threads)
    env["bare_worker_rss_mb"] = bare
    segments: list[dict[str, Any]] = []
    presets: dict[str, Preset] = {}
    for name in settings["presets"]:
        preset = build_preset(name, preset_specs[name], args.device)
        presets[name] = preset
        print(f"{name}: {preset.describe()}, {preset.num_params / 1e6:.2f}M parameters", flush=True)
        for repeat in range(int(settings["repeats"])):
            for mode, every in segment_plan(modes, everies, repeat):
                waited, load = wait_for_quiet(float(settings.get("quiet_wait_s", 0)), float(settings.get("quiet_cpu", 0.3)))
                seg = run_segment(preset, mode, every, repeat, tcfg, settings, run_dir, args.keep_runs)
                if mode == "off" and seg.get("mean_ms"):
                    preset.off_step_s = seg["mean_ms"] / 1e3
                seg["quiet_wait"] = {"waited_s": waited, "other_load_cores": load}
                seg["order"] = len(segments)
                segments.append(seg)
                print(summary_line(seg), flush=True)
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "env": env,
        "settings": settings,
        "telemetry_config": tcfg,
        "presets": [aggregate(segments, presets[n], bare) for n in settings["presets"]],
        "segments": segments,
    }
    result["targets"] = evaluate_targets(result, tcfg_checked.num_slots)
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_all
    (out_dir / "stress.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    (out_dir / "stress.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir / 'stress.json'} and {out_dir / 'stress.md'} in {env['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
