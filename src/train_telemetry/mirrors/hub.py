"""The mirrors' queues and threads: records in, without ever waiting; stats out at close.

Runs in: the worker process (fed by processor.SnapshotProcessor.write, right after the record
is written), the training process beside the inline builder (``mode: sync``; then ``feed``
runs on the training thread and costs an append), and ``train-telemetry mirror``.

NOTE [mirror isolation]
=======================

    writer.write(line)  ->  hub.feed(record)  --append-->  deque per mirror (bounded)
                                                              |  one daemon thread per mirror
                                                              v
                                                 open() once, log_scalars() per record,
                                                 at close: log_holdout, log_diagnoses, close()

* ``feed`` never waits and never raises: it appends the record to each mirror's queue.
  A full queue drops its **oldest** record (counted): a tracker that cannot keep up then shows
  the newest state of the run with gaps, rather than an ever older prefix of it (dropping the
  newest would leave a live dashboard stuck at the run's beginning); the JSONL holds every
  record, and ``train-telemetry mirror`` can send them all later.
* Each mirror has its own thread, so a slow or hung tracker holds up only its own queue. The
  tracker is imported and opened on that thread: one that is not installed, has bad options or
  raises in ``open`` fails alone (warned once, every record it gets counted as dropped).
* A call that raises costs that record (counted, the first one warned); the next one is tried.
* ``close(deadline, stall_s)`` lets each mirror send what it holds and end, until the deadline;
  a mirror still busy then, or one whose call has not returned for ``stall_s`` (hung: a slow
  tracker that still returns keeps its time), is abandoned (its thread is a daemon: it never
  holds up the process's exit), what it held is counted as dropped, its state ``abandoned``. The stats go to
  ``<records file>.mirrors.json``, which summary.py reads into ``TelemetrySummary.mirrors``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from ..records import TypedRecord
from .base import (
    HoldoutTable,
    Mirror,
    MirrorContext,
    MirrorStats,
    holdout_table,
    record_scalars,
    record_step,
)

__all__ = ["QUEUE_SIZE", "MirrorHub", "make_mirror", "stats_file_for"]

# Records a mirror may fall behind by before its oldest is dropped: a few minutes of a
# tracker's outage at usual collection rates, at a few KB to tens of KB per record.
QUEUE_SIZE = 256
# Of the time left at close, the diagnoses (read back from the JSONL) may take this share.
DIAGNOSE_SHARE = 0.5

Diagnoser = Callable[[], tuple[list[dict[str, Any]], str]]
Warn = Callable[[str, str], None]  # (key, message): each key printed once


def stats_file_for(records_file: Path) -> Path:
    """Where the mirrors' stats of ``records_file`` go: ``telemetry.mirrors.json`` beside it."""
    return records_file.with_suffix(".mirrors.json")


def _warn_stderr(key: str, message: str, _seen: set[str] = set()) -> None:  # noqa: B006 (the once-set)
    if key not in _seen:
        _seen.add(key)
        print(f"train-telemetry mirror (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


def make_mirror(name: str, options: dict[str, Any]) -> Mirror:
    """The mirror ``name`` with ``options``: a built-in tracker, or ``package.module:Class``."""
    from . import MIRRORS

    if name in MIRRORS:
        module_name, _, class_name = MIRRORS[name].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**options)
    if name == "framework":
        raise RuntimeError("'framework' names the trackers of the Hugging Face Trainer or Lightning, and only their "
                           "TelemetryCallback resolves it; with Telemetry directly, name the trackers")
    module_name, _, class_name = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in class_name.split("."):
        obj = getattr(obj, part)
    return obj(**options)


class _Channel:
    """One mirror: its bounded queue, its thread and its stats."""

    def __init__(self, name: str, make: Callable[[], Mirror], context: MirrorContext, size: int, blocking: bool,
                 warn: Warn) -> None:
        self.name, self.make, self.context = name, make, context
        self.size, self.blocking, self.warn = size, blocking, warn
        self.queue: deque[TypedRecord] = deque()
        self.cond = threading.Condition()
        self.stats = MirrorStats()
        self.thread: threading.Thread | None = None
        self.ending = False
        self.abandoned = False
        self.in_flight = False
        self.call_started: float | None = None  # monotonic start of the call in progress (open too)
        self.end_payload: tuple[list[dict[str, Any]], str] | None = None

    # -- producer side (the worker's loop, or the training thread inline) ---------------
    def put(self, record: TypedRecord) -> None:
        with self.cond:
            if self.stats.state != "ok" or self.ending:
                self.stats.dropped += 1
                return
            if self.blocking:  # replay: nothing is dropped, the command waits instead
                while len(self.queue) >= self.size and self.stats.state == "ok":
                    self.cond.wait(0.1)
            elif len(self.queue) >= self.size:
                self.queue.popleft()  # the oldest: see NOTE [mirror isolation]
                self.stats.dropped += 1
                self.warn(f"{self.name}:full", f"{self.name}: the tracker is slower than the records; the oldest "
                          "waiting records are dropped (counted in the summary; every record is in the JSONL)")
            self.queue.append(record)
            self.cond.notify_all()
        if self.thread is None:  # started with the first record: an unused mirror costs nothing
            self.thread = threading.Thread(target=self._run, name=f"train-telemetry-mirror-{self.name}", daemon=True)
            self.thread.start()

    # -- the mirror's thread -------------------------------------------------------------
    def _fail(self, exc: BaseException, what: str) -> None:
        with self.cond:
            self.stats.state = "failed"
            self.stats.error = self.stats.error or f"{type(exc).__name__}: {exc}"
            self.stats.dropped += len(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        self.warn(f"{self.name}:failed", f"{self.name}: {what} failed ({type(exc).__name__}: {exc}); this mirror "
                  "is off for the run (its records are counted as dropped; training and the JSONL are unaffected)")

    def _call_failed(self, exc: BaseException, what: str) -> None:
        self.stats.failed_calls += 1
        self.stats.error = self.stats.error or f"{type(exc).__name__}: {exc}"
        self.warn(f"{self.name}:call", f"{self.name}: {what} raised {type(exc).__name__}: {exc}; the record is "
                  "counted as dropped, later failures are counted silently")

    def _run(self) -> None:
        self.call_started = time.monotonic()
        try:
            mirror = self.make()
            opener = getattr(mirror, "open", None)
            if opener is not None:
                opener(self.context)
        except BaseException as exc:  # not installed, bad options, no server: this mirror only
            self._fail(exc, "opening the tracker")
            return
        finally:
            self.call_started = None
        prefix = str(getattr(mirror, "prefix", "") or "")
        last_holdout: tuple[TypedRecord, int] | None = None
        while True:
            with self.cond:
                while not self.queue and not self.ending:
                    self.cond.wait()
                if self.abandoned:
                    return
                if not self.queue:
                    break
                record = self.queue.popleft()
                self.in_flight = True
                self.cond.notify_all()
            step = record_step(record)
            self.call_started = time.monotonic()
            try:
                mirror.log_scalars(step, record_scalars(record, prefix))
                ok = True
            except Exception as exc:
                self._call_failed(exc, "log_scalars")
                ok = False
            with self.cond:
                self.call_started = None
                self.in_flight = False
                if self.abandoned:  # stop() counted it as dropped already
                    return
                if ok:
                    self.stats.sent += 1
                else:
                    self.stats.dropped += 1
            if record.holdout_logits:
                last_holdout = (record, step)
        self._finish(mirror, last_holdout)

    def _finish(self, mirror: Mirror, last_holdout: tuple[TypedRecord, int] | None) -> None:
        calls: list[tuple[str, Callable[[], Any]]] = []
        log_holdout = getattr(mirror, "log_holdout", None)
        table: HoldoutTable | None = holdout_table(*last_holdout) if last_holdout is not None else None
        if log_holdout is not None and table is not None:
            calls.append(("log_holdout", lambda: log_holdout(table.step, table)))
        log_diagnoses = getattr(mirror, "log_diagnoses", None)
        payload = self.end_payload
        if log_diagnoses is not None and payload is not None:
            calls.append(("log_diagnoses", lambda: log_diagnoses(*payload)))
        closer = getattr(mirror, "close", None)
        if closer is not None:
            calls.append(("close", closer))
        for what, call in calls:
            if self.abandoned:
                return
            self.call_started = time.monotonic()
            try:
                call()
            except Exception as exc:
                self._call_failed(exc, what)
            finally:
                self.call_started = None

    # -- close ---------------------------------------------------------------------------
    def end(self, payload: tuple[list[dict[str, Any]], str] | None) -> None:
        with self.cond:
            self.end_payload = payload
            self.ending = True
            self.cond.notify_all()

    def abandon(self) -> None:
        with self.cond:
            self.abandoned = True
            self.stats.state = "abandoned"
            self.stats.dropped += len(self.queue) + (1 if self.in_flight else 0)
            self.in_flight = False
            self.queue.clear()
            self.cond.notify_all()
        self.warn(f"{self.name}:abandoned", f"{self.name}: still busy at stop()'s deadline; abandoned (what it "
                  "held is counted as dropped; `train-telemetry mirror` can send the run from its JSONL)")


class MirrorHub:
    """The mirrors of one records file: ``feed`` each record, ``close`` once.

    ``mirrors``: (name, factory) pairs; each factory runs on its mirror's thread, so an import
    or an ``open`` that fails or hangs costs that mirror only. ``blocking`` (replay): a full
    queue waits instead of dropping.
    """

    def __init__(self, mirrors: list[tuple[str, Callable[[], Mirror]]], context: MirrorContext, *,
                 stats_file: Path | None = None, diagnoser: Diagnoser | None = None, warn: Warn | None = None,
                 blocking: bool = False, queue_size: int = QUEUE_SIZE) -> None:
        self.context = context
        self.stats_file = stats_file
        self.diagnoser = diagnoser
        self.closed = False
        self.channels: list[_Channel] = []
        taken: set[str] = set()
        for name, make in mirrors:
            unique, n = name, 2
            while unique in taken:
                unique, n = f"{name}_{n}", n + 1
            taken.add(unique)
            self.channels.append(_Channel(unique, make, context, queue_size, blocking, warn or _warn_stderr))
        if stats_file is not None:  # an earlier run's stats never pass for this one's
            with contextlib.suppress(OSError):
                stats_file.unlink()

    def feed(self, record: TypedRecord) -> None:
        """Hand ``record`` to every mirror; never waits (unless ``blocking``), never raises."""
        if self.closed:
            return
        for channel in self.channels:
            try:
                channel.put(record)
            except Exception:  # e.g. no thread can be started: counted as that mirror's drop
                channel.stats.dropped += 1

    def _diagnoses(self, deadline: float) -> tuple[list[dict[str, Any]], str] | None:
        diagnoser = self.diagnoser
        if diagnoser is None:
            return None
        out: list[tuple[list[dict[str, Any]], str]] = []

        def run() -> None:
            with contextlib.suppress(Exception):  # no diagnoses is better than no mirror
                out.append(diagnoser())

        thread = threading.Thread(target=run, name="train-telemetry-mirror-diagnose", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()) * DIAGNOSE_SHARE)
        return out[0] if out else None

    def close(self, deadline: float, stall_s: float | None = None) -> dict[str, MirrorStats]:
        """Let each mirror send what it holds, its holdout table and the diagnoses, and end, until
        ``deadline`` (time.monotonic()); abandon those still busy then, and, sooner, any whose
        call has not returned for ``stall_s``. Returns each mirror's stats."""
        if self.closed:
            return {c.name: c.stats for c in self.channels}
        self.closed = True
        started = [c for c in self.channels if c.thread is not None]
        payload = self._diagnoses(deadline) if any(c.stats.state == "ok" for c in started) else None
        for channel in self.channels:
            channel.end(payload)
        waiting = [c for c in started if c.thread is not None and c.thread.is_alive()]
        while waiting:
            now = time.monotonic()
            for channel in list(waiting):
                assert channel.thread is not None
                started_at = channel.call_started
                if not channel.thread.is_alive():
                    waiting.remove(channel)
                elif now >= deadline or (stall_s is not None and started_at is not None
                                         and now - started_at >= stall_s):
                    channel.abandon()
                    waiting.remove(channel)
            if waiting:
                waiting[0].thread.join(min(0.05, max(0.0, deadline - time.monotonic())))  # type: ignore[union-attr]
        stats = {c.name: c.stats for c in self.channels}
        if self.stats_file is not None and self.channels:
            with contextlib.suppress(OSError):
                tmp = self.stats_file.with_suffix(".tmp")
                tmp.write_bytes(msgspec.json.encode(stats))
                os.replace(tmp, self.stats_file)
        return stats


def read_stats(stats_file: Path) -> dict[str, MirrorStats]:
    """The stats a hub wrote to ``stats_file`` ({} when there are none)."""
    try:
        return msgspec.json.decode(stats_file.read_bytes(), type=dict[str, MirrorStats])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}
