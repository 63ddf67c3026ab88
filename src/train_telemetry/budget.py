"""The overhead budget: collect less often, evenly, when telemetry costs more than its share.

Runs in: the training process, on a thread of its own; the hook only stamps the time of
each call (``tick``) and of each due collection (``collected``).

What it promises: with ``overhead_budget: b`` the mean training step is at most ``1 + b``
times the step without telemetry. So it measures exactly that, from the trainer's own step
times (NOTE [measured overhead]), and keeps a cheaper estimate beside it for the windows
the measurement cannot judge.

NOTE [measured overhead]
------------------------
The hook stamps ``perf_counter`` at every call (a ring of RING floats; ~0.1 us a call), so
a step is the time between two calls: the training step plus whatever telemetry did in
the call before it. A step is *plain* when telemetry has not touched it: no collection
was taken in the call that starts it nor in the AFTER_STEPS calls before (a record leaves
caches and the allocator cold: on conv the two steps after an inline record ran 1.5 and
1.0 ms slower), and the worker has had time to build the last record (SETTLE_FACTOR times
its CPU seconds per record, so its contention for the trainer's cores has ended). The
mean of the plain steps is the step without telemetry (the *baseline*; gaps over
PAUSE_FACTOR times it, an eval loop or a checkpoint between two calls, are left out of
everything), and a window's overhead is its mean step over the baseline, minus one:
everything a collection costs the steps around it, which the estimate below cannot see
(the issue-27 runs: 1.23x conv and 1.15x wide at every step where the estimate read 10%).

A window measures whole cycles: its steps end where the last collection it took begins, so
the steps that collection slows are measured with it in the next window (cut at the
window's end instead, a window at stride 8 held a collection but not the steps it slowed
and read 0.1%, the next one twice the truth, and the stride sawed 8 -> 1 -> 2 -> 1 -> 8).
A window with MIN_PLAIN plain steps measures its own baseline (the same second of the
run, so a trainer whose step time drifts is compared with itself); one with fewer (every
step collected, the worker always busy) uses the last baseline if it is younger than
BASELINE_MAX_AGE_S and the window's few plain steps, if any, are within STALE_FACTOR of it
(a test sharing two cores with another job read 178% against a baseline measured before
the other job began, where the loop's own clock said 7%), else starts a *probe*: due collections are skipped (and counted as
skipped) until MIN_PLAIN plain steps are in, at most MAX_PROBE_S. At every step on conv,
a probe of about a second every 30 s costs 3% of the records it would have kept.

The estimate, for windows without a baseline (the first, and a run whose probe found no
plain steps), and as a floor under the measurement (one noisy window cannot read less
than what was certainly spent):

    estimate = hook time / wall time + max(0, worker cores - idle cores)

``worker cores`` is the worker's CPU time per wall second; ``idle cores`` the cores
training leaves idle: the usable cores minus the trainer process's CPU time per wall
second (its spinning OpenMP threads count as busy, as they are to the scheduler). The
worker's CPU costs training only where it does not fit into the idle cores (measured with
``scripts/stress_test.py --threads 1``: charging it by the share of the machine training
keeps busy kept 20% of conv's records at every step where the worker kept up with all of
them at 0.95x of off).

The stride. The overhead a window measures is close to proportional to one over the
stride, so each window sets the stride from it directly: ``target = stride * overhead /
budget`` is the stride at which that window would have cost exactly the budget. Over the
budget the stride becomes the power of two at or above ``target`` (at most 8x per window,
up to MAX_STRIDE); under a third of it, the power of two at or above ``2 * target`` (so the
next window costs about half the budget); in between it holds (the hysteresis that keeps
it from flapping). Both ways in one window: measured on the wide stress preset at every
step, doubling every 2 s still cost 1.17x over a 9 s segment, and halving once a period
kept a stride raised by the first collection's one-time costs long enough to skip the
next collection due 13 s later.
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
in ``snapshots_skipped``. ``measured_overhead()`` (the run's excess step time over its
baseline, every measured window together) goes to the summary and the report.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PERIOD_S = 1.0
MAX_STRIDE = 64
MAX_GROWTH = 8  # per window: one noisy window cannot send the stride to MAX_STRIDE
MIN_DUE_PER_WINDOW = 2  # a window spans at least this many due collections ...
MAX_WINDOW_S = 60.0  # ... or this long
RING = 1 << 16  # hook call times kept (a window longer than this many calls reads its last RING // 2)
_MASK = RING - 1
_now = time.perf_counter
AFTER_STEPS = 2  # steps after a taken collection that are not plain
SETTLE_FACTOR = 2.0  # ... nor those before the worker had this times its CPU per record to build it
MIN_PLAIN = 8  # plain steps that measure a baseline
PAUSE_FACTOR = 10.0  # a step this many times the baseline is a pause (eval, checkpoint), not a step
BASELINE_MAX_AGE_S = 30.0  # an older baseline is measured again (a probe)
STALE_FACTOR = 1.25  # ... and one that a window's few plain steps miss by more than this is not used
MAX_PROBE_S = 10.0  # a probe that finds too few plain steps in this long ends without a baseline


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


@dataclass
class Steps:
    """One window's steps, measured (NOTE [measured overhead])."""

    baseline: float | None  # the plain step's seconds: this window's own, or the one passed in
    own_baseline: bool  # measured from this window's plain steps
    plain: int  # plain steps in the window
    steps: int  # steps counted (pauses left out)
    excess_s: float  # their time beyond steps * baseline (0 without a baseline)

    @property
    def overhead(self) -> float | None:
        """Mean step over the baseline, minus one; None without a baseline or a step."""
        if self.baseline is None or not self.steps:
            return None
        return self.excess_s / (self.steps * self.baseline)


def measure_steps(ticks: Sequence[float], first: int, dues: dict[int, tuple[float, bool]],
                  last_taken: tuple[int, float] | None, settle_s: float, baseline: float | None,
                  ) -> tuple[Steps, tuple[int, float] | None]:
    """Measure the steps between consecutive ``ticks`` (the start times of hook calls
    ``first``, ``first + 1``, ...). ``dues``: call -> (hook seconds, taken) for the due calls;
    ``last_taken``: (call, end time) of the last taken collection before ``first``;
    ``baseline``: the last one measured, used if the window has too few plain steps.
    Returns the window's Steps and the last taken collection as of its end."""
    rests: list[tuple[float, float, bool]] = []  # (step seconds, of which not the hook's, plain)
    for j in range(1, len(ticks)):
        call = first + j - 1  # the call that starts this step
        hook_s, taken = dues.get(call, (0.0, False))
        if taken:
            last_taken = (call, ticks[j - 1] + hook_s)
        step = ticks[j] - ticks[j - 1]
        plain = last_taken is None or (call - last_taken[0] > AFTER_STEPS and ticks[j - 1] - last_taken[1] >= settle_s)
        rests.append((step, step - hook_s, plain))
    plain_rests = [r for _, r, p in rests if p]
    own = False
    if len(plain_rests) >= MIN_PLAIN:
        median = statistics.median(plain_rests)
        kept = [r for r in plain_rests if r <= PAUSE_FACTOR * median]
        baseline, own = sum(kept) / len(kept), True
    elif baseline is not None and plain_rests:  # the last baseline, if the few plain steps here agree
        median = statistics.median(plain_rests)
        if not baseline / STALE_FACTOR <= median <= baseline * STALE_FACTOR:
            baseline = None  # the machine changed since (another job came or went): not telemetry's
    if baseline is None or baseline <= 0:
        return Steps(None, False, len(plain_rests), 0, 0.0), last_taken
    counted = [s for s, r, _ in rests if r <= PAUSE_FACTOR * baseline]
    return Steps(baseline, own, len(plain_rests), len(counted), sum(counted) - len(counted) * baseline), last_taken


class OverheadBudget:
    """Keeps ``stride`` (1, 2, 4, ...) so that telemetry's overhead stays under ``budget``."""

    def __init__(self, budget: float, worker_pid: Callable[[], int | None], sample: bool = True) -> None:
        """``sample``: start the thread that reads the totals every PERIOD_S (False: the
        caller feeds ``observe`` or ``update`` itself)."""
        self.budget = budget
        self.worker_pid = worker_pid
        self.stride = 1  # read by the hook: collect one due collection in `stride`
        self.probing = False  # read by the hook: skip every due collection (a probe measures the baseline)
        self.hook_seconds = 0.0  # added to by the hook (plain float: the GIL makes += safe enough here)
        self.due = 0  # collections due so far (taken or skipped), counted by the hook
        self.calls = 0  # hook calls so far: the next one's place in `ticks`
        self.ticks = array("d", bytes(8 * RING))  # each call's start (perf_counter), a ring
        self.dues: deque[tuple[int, float, bool]] = deque()  # (call, hook seconds, taken), from the hook
        self.last_overhead: float | None = None
        self.cores = usable_cores()
        self.baseline: float | None = None  # the plain step's seconds, last measured ...
        self.baseline_at = -math.inf  # ... at this monotonic time
        self.excess_s = 0.0  # the run's measured windows: step time beyond their baselines ...
        self.base_s = 0.0  # ... and their steps times their baselines
        self._window: tuple[float, float, float, int, float | None] | None = None  # totals at its start
        self._mark = 0  # the first call of the next window's steps
        self._last_taken: tuple[int, float] | None = None
        self._settle_s = 0.0  # the worker's CPU seconds per record, times SETTLE_FACTOR
        self._probe_since: float | None = None  # wall time the running probe began
        self._next_probe = -math.inf  # monotonic time before which no probe starts (one gave up)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-budget", daemon=True)
        if sample:
            self._thread.start()

    def tick(self) -> None:
        """The hook, at every call: when it started."""
        n = self.calls
        self.ticks[n & _MASK] = _now()
        self.calls = n + 1

    def collected(self, hook_s: float, taken: bool) -> None:
        """The hook, after a due collection (taken, or skipped/dropped): its seconds."""
        self.due += 1
        self.hook_seconds += hook_s
        self.dues.append((self.calls - 1, hook_s, taken))

    def _run(self) -> None:
        self.observe(time.monotonic(), time.process_time(), self.hook_seconds, self.due, self._worker_cpu())
        while not self._stop.wait(PERIOD_S):
            self.observe(time.monotonic(), time.process_time(), self.hook_seconds, self.due, self._worker_cpu())

    def _worker_cpu(self) -> float | None:
        pid = self.worker_pid()
        return _cpu_seconds(pid) if pid else None

    def _steps(self, peek: bool = False) -> tuple[Steps, int]:
        """The steps since the last call to this (those whose hook calls have both ended),
        and the collections taken in them; ``peek``: measure them, but leave them for the
        next call (a probe waiting for enough plain steps)."""
        end = self.calls - 1  # the last call whose start is known; its step is not over
        first = max(self._mark, end - RING // 2)
        dues: dict[int, tuple[float, bool]] = {c: (h, t) for c, h, t in list(self.dues) if c < end}
        if not peek:  # whole cycles: up to the last collection taken (the steps it slows are the next window's)
            end = max((c for c, (_, taken) in dues.items() if taken and c > first), default=end)
            dues = {c: d for c, d in dues.items() if c < end}
        ticks = [self.ticks[c & _MASK] for c in range(first, end + 1)]
        now = time.monotonic()
        fresh = self.baseline if now - self.baseline_at <= BASELINE_MAX_AGE_S else None
        steps, last_taken = measure_steps(ticks, first, dues, self._last_taken, self._settle_s, fresh)
        if peek and not steps.own_baseline:
            return steps, 0
        for _ in dues:
            self.dues.popleft()
        self._mark, self._last_taken = max(self._mark, end), last_taken
        if steps.own_baseline:
            self.baseline, self.baseline_at = steps.baseline, now
        return steps, sum(taken for _, taken in dues.values())

    def observe(self, wall: float, own_cpu: float, hook: float, due: int, worker_cpu: float | None) -> bool:
        """One reading of the running totals (wall clock, our CPU, hook seconds, due
        collections, the worker's CPU); when the window since the last update is whole
        (PERIOD_S and MIN_DUE_PER_WINDOW due collections, at least one stride of them, or
        MAX_WINDOW_S), update the stride from it and start the next. A probe ends as soon as
        its plain steps are in (or after MAX_PROBE_S), and starts the next window. Returns
        whether it updated."""
        now = (wall, own_cpu, hook, due, worker_cpu)
        if self._window is None:
            self._window, self._mark = now, max(0, self.calls - 1)
            return False
        if self._probe_since is not None:
            steps, _ = self._steps(peek=wall - self._probe_since < MAX_PROBE_S)
            if steps.own_baseline or wall - self._probe_since >= MAX_PROBE_S:
                self.probing, self._probe_since, self._window = False, None, now
                self._next_probe = time.monotonic() + BASELINE_MAX_AGE_S
            return False
        wall0, own0, hook0, due0, worker0 = self._window
        span = wall - wall0
        if span <= 0 or (due - due0 < max(MIN_DUE_PER_WINDOW, self.stride) and span < MAX_WINDOW_S):
            return False
        worker = max(0.0, worker_cpu - worker0) if worker_cpu is not None and worker0 is not None else 0.0
        idle_cores = max(0.0, self.cores - (own_cpu - own0) / span)
        measured = None
        if self.calls:  # the hook stamps its calls (a test feeding totals only does not)
            steps, taken = self._steps()
            if taken:
                self._settle_s = SETTLE_FACTOR * worker / taken
            measured = steps.overhead
            if measured is not None:
                self.excess_s += steps.excess_s
                self.base_s += steps.steps * (steps.baseline or 0.0)
            elif time.monotonic() >= self._next_probe:  # no plain step and no baseline: a probe finds one
                self.probing, self._probe_since = True, wall
        self.update(hook - hook0, worker, span, idle_cores, measured)
        self._window = now
        return True

    def update(self, hook_s: float, worker_cpu_s: float, wall_s: float, idle_cores: float,
               measured: float | None = None) -> None:
        """One window's measurements -> the next stride. ``idle_cores``: the cores training
        left idle over the window (its CPU seconds per wall second, from the usable cores);
        ``measured``: the window's measured overhead, if it had a baseline."""
        if wall_s <= 0:
            return
        overhead = hook_s / wall_s + max(0.0, worker_cpu_s / wall_s - idle_cores)
        if measured is not None:
            overhead = max(overhead, measured)
        self.last_overhead = overhead
        target = self.stride * overhead / self.budget
        if overhead > self.budget:
            self.stride = min(MAX_STRIDE, self.stride * MAX_GROWTH, _pow2_at_least(target))
        elif overhead < self.budget / 3:
            self.stride = min(self.stride, _pow2_at_least(2 * target))

    def skips(self, due_index: int) -> bool:
        """Whether the hook skips due collection number ``due_index`` (``batch_idx //
        collect_every_n``): every one while probing, else every one not on the stride, so
        the records that remain are spread evenly over the run."""
        return self.probing or (self.stride > 1 and due_index % self.stride != 0)

    def measured_overhead(self) -> float | None:
        """The run's measured overhead so far: its measured windows' step time beyond their
        baselines, over the baselines (None if no window had one)."""
        return self.excess_s / self.base_s if self.base_s > 0 else None

    def close(self) -> float | None:
        """Stop the thread; returns ``measured_overhead()``."""
        self._stop.set()
        return self.measured_overhead()
