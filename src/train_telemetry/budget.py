"""The overhead budget: collect less often, evenly, when telemetry costs more than its share.

Runs in: the training process, on a thread of its own (never in the hook). Over each
window (at least PERIOD_S, below) it estimates what telemetry took from training:

    overhead = hook time / wall time + max(0, worker cores - idle cores)

``worker cores`` is the worker's CPU time per wall second; ``idle cores`` the cores
training leaves idle: the usable cores minus the trainer process's CPU time per wall
second (its spinning OpenMP threads count as busy, as they are to the scheduler). The
worker's CPU costs training only where it does not fit into the idle cores: on a CPU
trainer whose threads take every core, every second it runs is taken from training; on a
GPU machine, or a CPU trainer with a core to spare, it is free. (The first version
charged it in proportion to the share of the machine training keeps busy: with one
trainer thread on two cores, a worker on the idle core was charged half its CPU, and the
budget kept 20% of conv's records at every step where the worker kept up with all of them
at 0.95x of off; measured with ``scripts/stress_test.py --threads 1``.) The overhead a window measures is close
to proportional to one over the stride, so each window sets the stride from it directly:
``target = stride * overhead / budget`` is the stride at which that window would have
cost exactly the budget. Over the budget the stride becomes the power of two at or above
``target`` (at most 8x per window, up to MAX_STRIDE); under a third of it, the power of
two at or above ``2 * target`` (so the next window costs about half the budget); in
between it holds (the hysteresis that keeps it from flapping). Both ways in one window:
measured on the wide stress preset at every step, doubling every 2 s still cost 1.17x
over a 9 s segment, and halving once a period kept a stride raised by the first
collection's one-time costs long enough to skip the next collection due 13 s later.
A window is at least PERIOD_S and holds at least MIN_DUE_PER_WINDOW due collections
and at least ``stride`` of them (taken or skipped; up to MAX_WINDOW_S): with collections
rarer than the period, a 1 s window holding one wide collection reads ~10% while the run
pays under 1% (100 ms every 13 s at every 200th step), and would skip every other one;
and a window shorter than the stride can hold no taken collection at all: it read 0%
and sent the stride from 16 to 1 (wide, records built inline, every step: the next
window then read 54%, so the stride sawed 1 -> 8 -> 32 -> 1 and a third of the run
paid full price). The
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
MAX_GROWTH = 8  # per window: one noisy window cannot send the stride to MAX_STRIDE
MIN_DUE_PER_WINDOW = 2  # a window spans at least this many due collections ...
MAX_WINDOW_S = 60.0  # ... or this long


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _pow2_at_least(x: float) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


class OverheadBudget:
    """Keeps ``stride`` (1, 2, 4, ...) so that telemetry's overhead stays under ``budget``."""

    def __init__(self, budget: float, worker_pid: Callable[[], int | None], sample: bool = True) -> None:
        """``sample``: start the thread that reads the totals every PERIOD_S (False: the
        caller feeds ``observe`` or ``update`` itself)."""
        self.budget = budget
        self.worker_pid = worker_pid
        self.stride = 1  # read by the hook: collect one due collection in `stride`
        self.hook_seconds = 0.0  # added to by the hook (plain float: the GIL makes += safe enough here)
        self.due = 0  # collections due so far (taken or skipped), counted by the hook
        self.last_overhead: float | None = None
        self.cores = usable_cores()
        self._window: tuple[float, float, float, int, float | None] | None = None  # totals at its start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-budget", daemon=True)
        if sample:
            self._thread.start()

    def _run(self) -> None:
        self.observe(time.monotonic(), time.process_time(), self.hook_seconds, self.due, self._worker_cpu())
        while not self._stop.wait(PERIOD_S):
            self.observe(time.monotonic(), time.process_time(), self.hook_seconds, self.due, self._worker_cpu())

    def _worker_cpu(self) -> float | None:
        pid = self.worker_pid()
        return _cpu_seconds(pid) if pid else None

    def observe(self, wall: float, own_cpu: float, hook: float, due: int, worker_cpu: float | None) -> bool:
        """One reading of the running totals (wall clock, our CPU, hook seconds, due
        collections, the worker's CPU); when the window since the last update is whole
        (PERIOD_S and MIN_DUE_PER_WINDOW due collections, at least one stride of them, or
        MAX_WINDOW_S), update the
        stride from it and start the next. Returns whether it updated."""
        if self._window is None:
            self._window = (wall, own_cpu, hook, due, worker_cpu)
            return False
        wall0, own0, hook0, due0, worker0 = self._window
        span = wall - wall0
        if span <= 0 or (due - due0 < max(MIN_DUE_PER_WINDOW, self.stride) and span < MAX_WINDOW_S):
            return False
        worker = worker_cpu - worker0 if worker_cpu is not None and worker0 is not None else 0.0
        idle_cores = max(0.0, self.cores - (own_cpu - own0) / span)
        self.update(hook - hook0, max(0.0, worker), span, idle_cores)
        self._window = (wall, own_cpu, hook, due, worker_cpu)
        return True

    def update(self, hook_s: float, worker_cpu_s: float, wall_s: float, idle_cores: float) -> None:
        """One window's measurements -> the next stride. ``idle_cores``: the cores training
        left idle over the window (its CPU seconds per wall second, from the usable cores)."""
        if wall_s <= 0:
            return
        overhead = hook_s / wall_s + max(0.0, worker_cpu_s / wall_s - idle_cores)
        self.last_overhead = overhead
        target = self.stride * overhead / self.budget
        if overhead > self.budget:
            self.stride = min(MAX_STRIDE, self.stride * MAX_GROWTH, _pow2_at_least(target))
        elif overhead < self.budget / 3:
            self.stride = min(self.stride, _pow2_at_least(2 * target))

    def skips(self, due_index: int) -> bool:
        """Whether the hook skips due collection number ``due_index`` (``batch_idx //
        collect_every_n``): every one not on the stride, so the records that remain are
        spread evenly over the run."""
        return self.stride > 1 and due_index % self.stride != 0

    def close(self) -> None:
        self._stop.set()
