"""``train-telemetry mirror RUN_DIR --to TRACKER``: send a recorded run to trackers, or follow a
live one (``--follow``) as ``watch`` does.

Runs in: any process that reads a run (no torch). The same hub and mirrors as a live run, but
``blocking``: nothing is dropped, the command waits for a slow tracker instead. Diagnoses are
those of the whole run (the finished-run rules too, once it has stopped).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..config import check_mirror
from ..records import RUN_FILE, SUMMARY_FILE, TypedRecord, read_json
from .base import Mirror, MirrorContext, MirrorStats
from .hub import MirrorHub, make_mirror

# After the last record, how long the trackers may take to send what they hold and end.
CLOSE_TIMEOUT_S = 300.0


def _mirror_factories(mirrors: list[tuple[str, dict[str, Any]]] | list[Mirror]) -> list[tuple[str, Callable[[], Mirror]]]:
    out: list[tuple[str, Callable[[], Mirror]]] = []
    for item in mirrors:
        if isinstance(item, tuple):
            name, options = item
            check_mirror(name, options)
            out.append((name.rpartition(":")[2] or name, _maker(name, options)))
        else:
            label = str(getattr(item, "name", "") or type(item).__name__.lower())
            out.append((label, _given(item)))
    return out


def _maker(name: str, options: dict[str, Any]) -> Callable[[], Mirror]:
    return lambda: make_mirror(name, options)


def _given(mirror: Mirror) -> Callable[[], Mirror]:
    return lambda: mirror


def _diagnoser(directory: Path, records_file: Path, finished: Callable[[], bool]) -> Callable[[], tuple[list[dict[str, Any]], str]]:
    def run() -> tuple[list[dict[str, Any]], str]:
        from ..analysis.load import load_run
        from ..analysis.report import render_diagnoses
        from ..analysis.rules import diagnose

        found = [d.to_dict() for d in diagnose(load_run(records_file), finished=finished())]
        return found, "\n".join(render_diagnoses(found))

    return run


def _stopped(directory: Path, last: TypedRecord | None) -> bool:
    """Whether the run's latest segment wrote summary.json (it stopped)."""
    summary = read_json(directory / SUMMARY_FILE)
    if summary is None:
        return False
    segment = last.segment if last is not None and isinstance(last.segment, int) else 0
    written = summary.get("segment")
    return (written if isinstance(written, int) else 0) >= segment


def replay(path: str | Path, mirrors: list[tuple[str, dict[str, Any]]] | list[Mirror], *, follow: bool = False,
           rank: int | None = None, interval_s: float = 1.0, max_seconds: float | None = None,
           out: TextIO | None = None) -> dict[str, MirrorStats]:
    """Send every record of the run at ``path`` to ``mirrors``; with ``follow``, also what it
    appends until it stops (summary.json) or ``max_seconds``. Returns each mirror's stats."""
    from ..analysis.load import RunNotFoundError, records_file_of
    from ..analysis.watch import RecordFollower

    out = out or sys.stdout
    path = Path(path)
    directory = path.parent if path.is_file() else path
    records_file = records_file_of(path, rank)
    if not records_file.exists() and not follow:
        raise RunNotFoundError(f"{path}: no records file ({records_file.name}) here")
    meta = read_json(directory / RUN_FILE) or {}
    last: list[TypedRecord] = []
    context = MirrorContext(run_dir=directory, run_name=directory.resolve().name, rank=rank or 0,
                            config=meta.get("config") or {}, replay=True)
    hub = MirrorHub(_mirror_factories(mirrors), context, blocking=True,
                    diagnoser=_diagnoser(directory, records_file, lambda: _stopped(directory, last[-1] if last else None)))
    follower = RecordFollower(records_file)
    started = time.monotonic()
    sent = 0
    try:
        while True:
            stopped = _stopped(directory, last[-1] if last else None)  # before reading: all is on disk then
            new = follower.poll()
            for record in new:
                hub.feed(record)
            sent += len(new)
            if new:
                last[:] = new[-1:]
                print(f"read {sent} records (step {_step(new[-1])})", file=out, flush=True)
            if not follow or stopped:
                break
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                print(f"stopped following after {max_seconds:g} s", file=out, flush=True)
                break
            time.sleep(interval_s)
    finally:
        stats = hub.close(time.monotonic() + CLOSE_TIMEOUT_S)
    for name, s in stats.items():
        error = f"; {s.error}" if s.error else ""
        print(f"{name}: sent {s.sent} of {sent} records, dropped {s.dropped}, {s.state}{error}", file=out, flush=True)
    return stats


def _step(record: TypedRecord) -> int | float:
    from .base import record_step

    try:
        return record_step(record)
    except (TypeError, ValueError):
        return math.nan
