"""Following a run that is still training: each new record's key values, each new diagnosis.

Runs in: any process that reads a run (no torch), typically a second terminal next to
training. It only reads the files the worker appends to; it never locks or writes them.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import msgspec
from msgspec import UNSET

from train_telemetry.analysis.load import (
    OVERALL,
    PRE_CLIP,
    KeyedFamily,
    Run,
    TypedRecord,
    family_values,
    format_number,
    holdout_is_sequence,
    holdout_perplexity,
    record_segment,
    records_file_of,
)
from train_telemetry.analysis.report import render_diagnoses
from train_telemetry.analysis.rules import Diagnosis, diagnose

# records.py owns the format (the NaN/Inf strings, the schema); the tail reader decodes
# line by line into the same typed records as load_run.
from train_telemetry.records import (
    RUN_FILE,
    SUMMARY_FILE,
    RecordError,
    decode_typed_record,
    read_json,
)

__all__ = ["RecordFollower", "format_record_line", "watch"]

DEFAULT_INTERVAL_S = 1.0
DEFAULT_TAIL = 5


class RecordFollower:
    """Reads the whole lines appended to a records file since the previous :meth:`poll`."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._offset = 0
        self._partial = b""
        self._lines = 0  # whole lines read so far: the number of the next one, less 1

    def poll(self) -> list[TypedRecord]:
        """The records completed since the last poll ([] if the file does not exist yet)."""
        try:
            with open(self.file, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < self._offset:
                    # Truncated: a restarted run repaired a torn tail; the torn bytes we held are gone.
                    self._offset, self._partial = size, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        # The last piece is a line still being written (or b""): keep it for the next poll.
        self._partial = lines.pop()
        out: list[TypedRecord] = []
        for line in lines:
            self._lines += 1
            if not line.strip():
                continue
            try:
                out.append(decode_typed_record(line))
            except msgspec.DecodeError:
                warnings.warn(f"{self.file}:{self._lines}: skipped a corrupt line", stacklevel=2)
            except RecordError as exc:
                warnings.warn(
                    f"{self.file}:{self._lines}: skipped a record that does not match the schema: {exc}",
                    stacklevel=2,
                )
        return out


# The per-group families of a record's line: (family, label).
_LINE_FAMILIES: tuple[tuple[KeyedFamily, str], ...] = (
    ("gradient_norm", "grad"),
    (PRE_CLIP, "pre-clip"),
    ("weight_delta", "dw"),
    ("update_ratio", "upd"),
)


def _group_values(run: Run, record: TypedRecord, family: KeyedFamily, label: str) -> str | None:
    """Each group's value of ``family`` ("-" when null), None when the record lacks it."""
    if family_values(record, family) is None:
        return None
    groups = run.groups or [OVERALL]
    return f"{label} " + " ".join(
        f"{group} {format_number(run.value(record, family, group))}" for group in groups
    )


def _lr_values(run: Run, record: TypedRecord) -> str | None:
    """The LR of each group that has one, None when none has."""
    groups = run.groups or [OVERALL]
    lrs = [(g, lr) for g in groups if (lr := run.learning_rate(record, g)) is not None]
    return "lr " + " ".join(f"{g} {format_number(lr)}" for g, lr in lrs) if lrs else None


def format_record_line(run: Run, record: TypedRecord, index: int) -> str:
    """One line of a record's key values: grads (pre-clip too when clipped), deltas, LRs,
    holdout (loss and perplexity for token labels) and train accuracy, cost."""
    step = run.step(index)
    where = f" (epoch {record.epoch}, batch {record.batch_idx})" if step != record.batch_idx else ""
    parts = [f"step {step}{where}"]
    for family, label in _LINE_FAMILIES:
        text = _group_values(run, record, family, label)
        if text:
            parts.append(text)
    if text := _lr_values(run, record):
        parts.append(text)
    clip = record.gradient_clipping
    if clip is not UNSET and record.gradient_norm_pre_clip is UNSET:
        parts.append(f"pre-clip {format_number(clip.get('pre_clip_norm'))}")
    holdout = record.holdout_logits
    if holdout is not UNSET and holdout_is_sequence(holdout):
        parts.append(
            f"holdout loss {format_number(holdout.loss)} "
            f"ppl {format_number(holdout_perplexity(holdout))} "
            f"acc {format_number(holdout.accuracy)}"
        )
    elif holdout is not UNSET:
        parts.append(f"holdout acc {format_number(holdout.accuracy)}")
    if record.train is not UNSET:
        parts.append(
            f"train loss {format_number(record.train.loss)} acc {format_number(record.train.accuracy)}"
        )
    if cost := record.telemetry:
        if cost.hook_ms is not None and math.isfinite(cost.hook_ms):
            parts.append(f"hook {format_number(cost.hook_ms)} ms")
        if cost.dropped_before:
            parts.append(f"DROPPED {cost.dropped_before}")
    if record.nonfinite:
        parts.append("NaN/Inf: " + ",".join(record.nonfinite))
    if record.errors:
        parts.append(f"{len(record.errors)} errors")
    return " | ".join(parts)


def _summary_is_current(summary: dict[str, Any], run: Run, directory: Path) -> bool:
    """Whether ``summary`` was written by the run's latest segment (so the run has stopped).

    A run resumed into its directory still has the previous segment's summary.json while
    the resumed segment trains; that one does not end the watch.
    """
    latest = record_segment(run.records[-1]) if run.records else 0
    if latest == 0 and not isinstance((run.meta or {}).get("segment"), int):
        return True
    meta = read_json(directory / RUN_FILE) or run.meta or {}
    declared = meta.get("segment")
    latest = max(latest, declared if isinstance(declared, int) else 0)
    written = summary.get("segment")
    if (written if isinstance(written, int) else 0) < latest:
        return False
    run.meta = meta  # the latest segment's run.json (its segments list)
    return True


def watch(
    path: str | os.PathLike[str],
    *,
    out: TextIO,
    interval_s: float = DEFAULT_INTERVAL_S,
    max_seconds: float | None = None,
    once: bool = False,
    tail: int = DEFAULT_TAIL,
    rank: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print each new record of a run and each diagnosis the first time it appears.

    Stops when the run writes ``summary.json`` (it stopped), after ``max_seconds``, or
    after one read with ``once``. Of the records already there at start only the last
    ``tail`` are printed. Returns 1 if a serious diagnosis was printed, else 0.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    file = records_file_of(path, rank)
    follower = RecordFollower(file)
    run = Run(path=directory, records=[], records_file=file, rank=rank)
    shown: set[tuple[str, str | None]] = set()
    serious = False
    started = clock()
    first = True
    waiting_said = False
    while True:
        # Read before the records: all of them are on disk once summary.json is.
        summary = read_json(directory / SUMMARY_FILE)
        new = follower.poll()
        if run.meta is None:
            run.meta = read_json(directory / RUN_FILE)
        superseded = len(run.superseded)
        # A resumed run repeats steps: extend() drops what it recorded again, so the new
        # records start at `start`, which may be before the previous end.
        start = run.extend(new)
        added = len(run.records) - start
        finished = summary is not None and _summary_is_current(summary, run, directory)
        if not first and len(run.superseded) > superseded:
            print(
                f"resumed at step {run.step(start)}: {len(run.superseded) - superseded} "
                "records of the previous segment superseded",
                file=out,
            )
        # Of the records already there at start, only the last `tail` are printed.
        shown_from = start + max(added - tail, 0) if first else start
        if shown_from > start:
            print(
                f"... {shown_from - start} earlier records (steps {run.step(start)}.."
                f"{run.step(shown_from - 1)})",
                file=out,
            )
        for i in range(shown_from, len(run.records)):
            print(format_record_line(run, run.records[i], i), file=out)
        if not run.records and not waiting_said:
            print(f"waiting for records in {file} ...", file=out)
            waiting_said = True
        if new or (finished and first):
            if finished:
                run.summary = summary
            # finished=False leaves out the rules about how a run ended (no summary.json yet).
            fresh: list[Diagnosis] = [
                d for d in diagnose(run, finished=finished) if d.key not in shown
            ]
            if fresh:
                print("\n".join(render_diagnoses([d.to_dict() for d in fresh])), file=out)
                shown.update(d.key for d in fresh)
                serious |= any(d.severity == "serious" for d in fresh)
        out.flush()
        first = False
        if finished:
            print(f"run finished: {len(run.records)} records", file=out)
            break
        if once:
            break
        if max_seconds is not None and clock() - started >= max_seconds:
            print(
                f"stopped watching after {max_seconds:g} s ({len(run.records)} records so far)",
                file=out,
            )
            break
        sleep(interval_s)
    out.flush()
    return 1 if serious else 0
