"""The run directory: its checks at start, its file names per rank, run.json and summary.json.

Runs in: the training process (at ``start()`` and ``stop()``, never in the hook).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from .config import TelemetryConfigError
from .records import (
    CHECKPOINT_FILE,
    RECORDS_FILE,
    RUN_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    to_strict_json_value,
)


class RunDir:
    """``output_dir`` of one process: with ``per_rank`` each rank's files carry its rank."""

    def __init__(self, path: Path, rank: int, world_size: int, per_rank: bool) -> None:
        self.path = path
        self.rank = rank
        self.suffix = per_rank and world_size > 1

    def file(self, name: str) -> Path:
        """``name``, or with per_rank under DDP ``<stem>.rank<r>.<ext>`` (telemetry.rank1.jsonl)."""
        if self.suffix:
            stem, _, ext = name.partition(".")
            name = f"{stem}.rank{self.rank}.{ext}"
        return self.path / name

    @property
    def records(self) -> Path:
        return self.file(RECORDS_FILE)

    @property
    def checkpoint(self) -> Path:
        return self.file(CHECKPOINT_FILE)

    def check_writable(self) -> None:
        """Create the directory (its parent must exist) and prove it writable, or raise with the fix."""
        out = self.path
        if not out.parent.exists():
            raise TelemetryConfigError(
                f"output_dir {str(out)!r}: its parent directory {str(out.parent)!r} does not exist; create it first"
            )
        try:
            out.mkdir(exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TelemetryConfigError(
                f"output_dir {str(out)!r} is not writable ({exc.strerror}): choose a directory you can write to"
            ) from None

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        base = {
            "schema": SCHEMA_VERSION,
            "started": datetime.now(timezone.utc).astimezone().isoformat(),
            "pid": os.getpid(),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
            "host": socket.gethostname(),
        }
        write_json_atomic(self.file(RUN_FILE), {**base, **info})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.file(SUMMARY_FILE), summary)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_bytes(msgspec.json.format(msgspec.json.encode(to_strict_json_value(dict(data)))) + b"\n")
    os.replace(tmp_path, path)


def count_lines(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0
