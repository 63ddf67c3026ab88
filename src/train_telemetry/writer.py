"""Appending records: whole JSON lines to ``telemetry.jsonl``, and the once-per-kind log.

Runs in: the worker process (or the training process in sync mode). Imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from .records import decode_record, repair_torn_tail


class OnceLog:
    """Prints a warning to stderr once per key, so a repeated failure cannot flood the log."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.seen: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        print(f"train-telemetry {self.who} (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


class RecordWriter:
    """Appends whole lines to the records file; an I/O error costs records, never a crash.

    A full disk is usually transient (a checkpoint is deleted, a quota is raised): after a
    failed write the file is truncated back to its last whole line, so a reader never
    sees half a record, and the line waits in memory, with those after it, up to
    ``buffer_bytes``; each later write (and close) first retries them, in order. Only
    what does not fit in the buffer, or is still waiting at close, is lost (counted).
    """

    CLOSE_RETRIES = 3  # close() retries a waiting buffer this often, CLOSE_RETRY_S apart
    CLOSE_RETRY_S = 0.2

    def __init__(self, path: Path, fsync: bool, log: OnceLog, buffer_bytes: int = 4 << 20) -> None:
        self.path = path
        self.log = log
        self.fsync_enabled = fsync
        self.buffer_bytes = buffer_bytes
        self.records_written = 0
        self.io_errors = 0
        self.records_lost = 0
        self.waiting: list[bytes] = []  # lines not written yet because the disk refused them
        self.waiting_bytes = 0
        self.problems: dict[str, str] = {}  # "write"/"fsync" -> the latest such I/O error, for the summary
        self.repaired_bytes = repair_torn_tail(path)
        if self.repaired_bytes:
            self.log.once("repair", f"removed a torn last line ({self.repaired_bytes} bytes) from {path}, "
                          "left by a crash mid-write; appending after the last whole record")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.good_offset = os.fstat(self.fd).st_size

    def write(self, line: bytes) -> bool:
        """Append ``line`` (after any waiting ones); False if it could not be written now."""
        if self.waiting and not self._flush_waiting():
            self._wait(line)
            return False
        if self._append(line):
            return True
        self._wait(line)
        return False

    def _append(self, line: bytes) -> bool:
        try:
            view = memoryview(line)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.io_errors += 1
            self.problems["write"] = (f"writes to {self.path} failed ({exc}); {len(self.waiting) + 1} record(s) "
                                      f"waiting in memory, {self.records_lost} lost")
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.good_offset)
            self.log.once(f"io:{exc.errno}", f"could not write a record to {self.path}: {exc}; keeping records "
                          f"in memory (up to {self.buffer_bytes >> 10} KiB) and retrying with each new one")
            return False
        self.good_offset += len(line)
        self.records_written += 1
        return True

    def _wait(self, line: bytes) -> None:
        if self.waiting_bytes + len(line) > self.buffer_bytes:
            self.records_lost += 1
            self.problems["write"] = (f"{self.records_lost} record(s) could not be written to {self.path} "
                                      f"and did not fit the {self.buffer_bytes >> 10} KiB buffer: No space left on device "
                                      "or another I/O error (see above)")
            return
        self.waiting.append(line)
        self.waiting_bytes += len(line)

    def _flush_waiting(self) -> bool:
        while self.waiting:
            if not self._append(self.waiting[0]):
                return False
            self.waiting_bytes -= len(self.waiting.pop(0))
        return True

    def close(self) -> None:
        for attempt in range(self.CLOSE_RETRIES):
            if not self.waiting or self._flush_waiting():
                break
            if attempt + 1 < self.CLOSE_RETRIES:
                time.sleep(self.CLOSE_RETRY_S)
        if self.waiting:
            self.records_lost += len(self.waiting)
            self.problems["write"] = (f"{self.records_lost} record(s) could not be written to {self.path}: "
                                      f"{self.problems.get('write', 'I/O error')}")
            self.waiting.clear()
        if self.fsync_enabled:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.io_errors += 1
                self.problems["fsync"] = f"fsync of {self.path} failed: {exc}"
                self.log.once("fsync", self.problems["fsync"])
        os.close(self.fd)


def last_seq(path: Path) -> int | None:
    """The ``seq`` of the last whole record in ``path`` (None: no file or no record)."""
    record = last_record(path)
    return None if record is None else record["seq"]


def last_record(path: Path) -> dict[str, Any] | None:
    """The last whole record in ``path`` that has a ``seq`` (None: no file or no record)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - (1 << 20)))
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines[:-1]):  # whole lines only: the last element follows the final newline
        with contextlib.suppress(Exception):
            record = decode_record(line)
            if isinstance(record.get("seq"), int):
                return record
    return None


def count_records(path: Path) -> int:
    """Whole lines in ``path`` (0 if it does not exist or is no regular file, e.g. /dev/full)."""
    try:
        if not path.is_file():
            return 0
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0
