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
from typing import TextIO

import msgspec

from train_telemetry.analysis.load import (
    OVERALL,
    PRE_CLIP,
    Record,
    Run,
    find_record_files,
    format_number,
    holdout_is_sequence,
    holdout_perplexity,
    number,
    record_segment,
)
from train_telemetry.analysis.report import render_diagnoses
from train_telemetry.analysis.rules import Diagnosis, diagnose

# records.py owns the NaN/Inf string encoding; the tail reader decodes line by line.
from train_telemetry.records import (
    RECORDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    decode_record,
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

    def poll(self) -> list[Record]:
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
        out: list[Record] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(decode_record(line))
            except msgspec.DecodeError:
                warnings.warn(f"{self.file}: skipped a corrupt line", stacklevel=2)
        return out


def _values(run: Run, record: Record, family: str, label: str) -> str | None:
    parts = []
    for group in run.groups or [OVERALL]:
        v = run.learning_rate(record, group) if family == "lr" else run.value(record, family, group)
        if v is not None or isinstance(record.get(family), dict):
            parts.append(f"{group} {format_number(v)}")
    return f"{label} " + " ".join(parts) if parts else None


def format_record_line(run: Run, record: Record, index: int) -> str:
    """One line of a record's key values: grads (pre-clip too when clipped), deltas, LRs,
    holdout (loss and perplexity for token labels) and train accuracy, cost."""
    epoch = record.get("epoch")
    raw = record.get("batch_idx")
    head = f"step {run.step(index)}" + (
        f" (epoch {epoch}, batch {raw})" if run.step(index) != raw else ""
    )
    parts = [head]
    for family, label in (
        ("gradient_norm", "grad"),
        (PRE_CLIP, "pre-clip"),
        ("weight_delta", "dw"),
        ("update_ratio", "upd"),
        ("lr", "lr"),
    ):
        text = _values(run, record, family, label)
        if text:
            parts.append(text)
    clip = record.get("gradient_clipping")
    if isinstance(clip, dict) and not isinstance(record.get(PRE_CLIP), dict):
        parts.append(f"pre-clip {format_number(number(clip.get('pre_clip_norm')))}")
    holdout = record.get("holdout_logits")
    if isinstance(holdout, dict) and holdout_is_sequence(holdout):
        parts.append(
            f"holdout loss {format_number(number(holdout.get('loss')))} "
            f"ppl {format_number(holdout_perplexity(holdout))} "
            f"acc {format_number(number(holdout.get('accuracy')))}"
        )
    elif isinstance(holdout, dict):
        parts.append(f"holdout acc {format_number(number(holdout.get('accuracy')))}")
    train = record.get("train")
    if isinstance(train, dict):
        parts.append(
            f"train loss {format_number(number(train.get('loss')))} acc {format_number(number(train.get('accuracy')))}"
        )
    hook = run.value(record, "telemetry", "hook_ms")
    if hook is not None and math.isfinite(hook):
        parts.append(f"hook {format_number(hook)} ms")
    dropped = run.value(record, "telemetry", "dropped_before")
    if dropped:
        parts.append(f"DROPPED {int(dropped)}")
    if record.get("nonfinite"):
        parts.append("NaN/Inf: " + ",".join(map(str, record["nonfinite"])))
    if record.get("errors"):
        parts.append(f"{len(record['errors'])} errors")
    return " | ".join(parts)


def _records_file(path: Path, rank: int | None) -> Path:
    if path.is_file():
        return path
    if rank is not None:
        return path / f"telemetry.rank{rank}.jsonl"
    found = find_record_files(path) if path.is_dir() else []
    return found[0][1] if found else path / RECORDS_FILE


def _summary_is_current(summary: Record, run: Run, directory: Path) -> bool:
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
    file = _records_file(path, rank)
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
