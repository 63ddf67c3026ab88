"""The overhead budget: collect less often, evenly, when telemetry costs more than its share.

Runs in: the training process, on a thread of its own (never in the hook). Every
``PERIOD_S`` it estimates what telemetry took from training over the last period:

    overhead = hook time / wall time + worker CPU time / wall time * pressure

``pressure`` (0..1) is how much of the machine training itself keeps busy: the trainer
process's CPU time per wall second over the number of cores. On a machine whose cores
training uses (a CPU trainer) every second the worker runs is taken from training; on a
GPU machine with idle cores it is nearly free. The overhead a period measures is close
to proportional to one over the stride, so each period sets the stride from it directly:
``target = stride * overhead / budget`` is the stride at which that period would have
cost exactly the budget. Over the budget the stride becomes the power of two at or above
``target`` (at most 8x per period, up to MAX_STRIDE); under a third of it, the power of
two at or above ``2 * target`` (so the next period costs about half the budget); in
between it holds (the hysteresis that keeps it from flapping). Both ways in one period:
measured on the wide stress preset at every step, doubling every 2 s still cost 1.17x
over a 9 s segment, and halving once a period kept a stride raised by the first
collection's one-time costs long enough to skip the next collection due 13 s later. The
hook then skips due collections that are not on the stride, so the records that remain
are spread evenly over the run, and counts each skip as a drop (``dropped_before``) and
in ``snapshots_skipped``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

PERIOD_S = 1.0
MAX_STRIDE = 64
MAX_GROWTH = 8  # per period: one noisy period cannot send the stride to MAX_STRIDE


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _pow2_at_least(x: float) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


class OverheadBudget:
    """Keeps ``stride`` (1, 2, 4, ...) so that telemetry's overhead stays under ``budget``."""

    def __init__(self, budget: float, worker_pid: Callable[[], int | None]) -> None:
        self.budget = budget
        self.worker_pid = worker_pid
        self.stride = 1  # read by the hook: collect one due collection in `stride`
        self.hook_seconds = 0.0  # added to by the hook (plain float: the GIL makes += safe enough here)
        self.last_overhead: float | None = None
        self.cores = os.cpu_count() or 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-budget", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wall0, own0, hook0 = time.monotonic(), time.process_time(), self.hook_seconds
        pid = self.worker_pid()
        worker0 = _cpu_seconds(pid) if pid else None
        while not self._stop.wait(PERIOD_S):
            wall1, own1, hook1 = time.monotonic(), time.process_time(), self.hook_seconds
            pid = self.worker_pid()
            worker1 = _cpu_seconds(pid) if pid else None
            wall = wall1 - wall0
            worker = (worker1 - worker0) if worker1 is not None and worker0 is not None else 0.0
            pressure = min(1.0, max(0.0, (own1 - own0) / wall / self.cores)) if wall > 0 else 1.0
            self.update(hook1 - hook0, max(0.0, worker), wall, pressure)
            wall0, own0, hook0, worker0 = wall1, own1, hook1, worker1

    def update(self, hook_s: float, worker_cpu_s: float, wall_s: float, pressure: float) -> None:
        """One period's measurements -> the next stride."""
        if wall_s <= 0:
            return
        overhead = hook_s / wall_s + worker_cpu_s / wall_s * pressure
        self.last_overhead = overhead
        target = self.stride * overhead / self.budget
        if overhead > self.budget:
            self.stride = min(MAX_STRIDE, self.stride * MAX_GROWTH, _pow2_at_least(target))
        elif overhead < self.budget / 3:
            self.stride = min(self.stride, _pow2_at_least(2 * target))

    def close(self) -> None:
        self._stop.set()
