"""What ``stop()`` returns and writes to ``summary.json``: the run's collection, counted.

Runs in: the training process, at ``stop()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .mirrors.base import MirrorStats
from .mirrors.hub import read_stats, stats_file_for
from .sinks import Finished
from .worker_handle import describe_exit, signal_name
from .writer import count_records


@dataclass
class Counts:
    """The hook's counters (plain ints: the hook adds to them at collection steps)."""

    taken: int = 0  # snapshots handed to the sink
    dropped: int = 0  # due collections not taken, for any reason
    dropped_since: int = 0  # ... since the last one taken: its record's dropped_before
    skipped: int = 0  # of dropped: skipped to keep within overhead_budget
    hook_errors: int = 0  # collections the hook failed (and skipped)
    overhead: float | None = None  # set at stop(): the budget's measured overhead (budget.py)

    def drop(self) -> None:
        self.dropped += 1
        self.dropped_since += 1

    def skip(self) -> None:
        """A due collection skipped for the overhead budget: a drop too."""
        self.skipped += 1
        self.drop()


class TelemetrySummary(msgspec.Struct, kw_only=True):
    """What ``stop()`` returns (and writes to ``summary.json``)."""

    output_dir: str | None
    records_written: int
    snapshots_taken: int
    snapshots_dropped: int
    hook_errors: int
    errors: dict[str, int]
    last_errors: list[str]
    io_errors: int
    worker_pid: int | None
    worker_exitcode: int | None
    worker_exit_signal: str | None
    worker_terminated: bool  # stop() had to SIGTERM/SIGKILL the worker
    clean: bool  # every snapshot taken was written and the worker exited normally
    stop_seconds: float
    mode: str  # where records were built: "async" (the worker) or "sync" (inline); config.mode before start
    worker_restarts: int = 0  # dead workers replaced (each replayed what it held)
    segment: int = 0  # which start() in this output_dir (0: the first; resumed runs append)
    snapshots_skipped: int = 0  # of snapshots_dropped: skipped to keep within overhead_budget
    # Each mirror (config `mirror`): records sent to its tracker, dropped, and its state. A
    # mirror's losses never make the run unclean: every record is in the JSONL.
    mirrors: dict[str, MirrorStats] = {}
    # The training time telemetry added, as the overhead budget measured it from the step
    # times (NOTE [measured overhead] in budget.py): the mean step over the step without
    # telemetry, minus one. None without a budget, or when no window could be measured.
    overhead: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


def summarize(finished: Finished, mode: str, output_dir: Path | None, records_file: Path | None, counts: Counts, *,
              segment: int, seconds: float) -> TelemetrySummary:
    """The summary of a run whose sink closed with ``finished``."""
    taken, dropped, skipped, hook_errors = counts.taken, counts.dropped, counts.skipped, counts.hook_errors
    done = finished.done
    written = done.records_written if done else (count_records(records_file) if records_file else 0)
    last = list(done.last_errors) if done else []
    if done is None:
        last.append(f"the worker ended without reporting ({describe_exit(finished.exitcode)})")
    clean = (done is not None and done.clean and written == taken and not finished.terminated
             and finished.exitcode in (0, None))
    return TelemetrySummary(
        output_dir=str(output_dir) if output_dir else None,
        records_written=written,
        snapshots_taken=taken,
        snapshots_dropped=dropped,
        hook_errors=hook_errors,
        errors=dict(done.errors) if done else {},
        last_errors=last,
        io_errors=done.io_errors if done else 0,
        worker_pid=finished.pid,
        worker_exitcode=finished.exitcode,
        worker_exit_signal=signal_name(finished.exitcode),
        worker_terminated=finished.terminated,
        clean=clean,
        stop_seconds=seconds,
        mode=mode,
        worker_restarts=finished.restarts,
        segment=segment,
        snapshots_skipped=skipped,
        overhead=counts.overhead,
        mirrors=read_stats(stats_file_for(records_file)) if records_file else {},
    )


def empty_summary(mode: str, output_dir: Path | None) -> TelemetrySummary:
    """The summary of a run that collected nothing (never started, disabled, a forked child)."""
    return TelemetrySummary(
        output_dir=str(output_dir) if output_dir else None, records_written=0,
        snapshots_taken=0, snapshots_dropped=0, hook_errors=0, errors={}, last_errors=[],
        io_errors=0, worker_pid=None, worker_exitcode=None, worker_exit_signal=None,
        worker_terminated=False, clean=True, stop_seconds=0.0, mode=mode,
    )
