"""Watching a run while it trains: new records and new diagnoses are printed once, and watch ends."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from train_telemetry.analysis import watch
from train_telemetry.analysis.watch import RecordFollower
from train_telemetry.records import RECORDS_FILE, RUN_FILE, SUMMARY_FILE, encode_record
from train_telemetry.testing import (
    make_meta,
    make_records,
    make_resumed_records,
    make_summary,
    write_pathology,
    write_run,
)


def test_follower_returns_only_whole_lines(tmp_path: Path) -> None:
    """A line still being written is returned only once its newline arrives."""
    file = tmp_path / RECORDS_FILE
    records = make_records(n=2)
    line = encode_record(records[1])
    file.write_bytes(encode_record(records[0]) + line[:10])
    follower = RecordFollower(file)
    assert [r["seq"] for r in follower.poll()] == [0]
    assert follower.poll() == []
    with open(file, "ab") as f:
        f.write(line[10:])
    assert [r["seq"] for r in follower.poll()] == [1]


def test_follower_survives_a_truncated_file(tmp_path: Path) -> None:
    """After a restart truncates a torn tail, the follower goes on with the new lines."""
    file = tmp_path / RECORDS_FILE
    records = make_records(n=3)
    torn = encode_record(records[1])[:15]
    file.write_bytes(encode_record(records[0]) + torn)
    follower = RecordFollower(file)
    assert len(follower.poll()) == 1
    file.write_bytes(encode_record(records[0]))  # repair_torn_tail: back to the last newline
    assert follower.poll() == []
    with open(file, "ab") as f:
        f.write(encode_record(records[2]))
    assert [r["seq"] for r in follower.poll()] == [2]


def test_once_on_a_finished_run_prints_the_tail_and_the_diagnoses(tmp_path: Path) -> None:
    """--once on a stopped run prints the last records, its diagnoses, and exits 1 when serious."""
    directory = write_pathology(tmp_path / "run", "frozen_backbone", n=8)
    out = io.StringIO()
    status = watch(directory, out=out, once=True, tail=3)
    text = out.getvalue()
    assert status == 1
    assert "... 5 earlier records (steps 0..80)" in text
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("step ")] == [
        "step 100",
        "step 120",
        "step 140",
    ]
    assert "grad backbone - head " in text
    assert "SERIOUS  frozen_group" in text
    assert "run finished: 8 records" in text


@pytest.mark.timeout(30)
def test_watch_follows_a_growing_run_until_it_stops(tmp_path: Path) -> None:
    """Records appended while watching are each printed once; a diagnosis appears once; watch ends at stop."""
    directory = tmp_path / "run"
    directory.mkdir()
    records = make_records("frozen_backbone", n=6)

    def train() -> None:
        (directory / RUN_FILE).write_text(json.dumps(make_meta()))
        for record in records:
            time.sleep(0.05)
            with open(directory / RECORDS_FILE, "ab") as f:
                f.write(encode_record(record))
        time.sleep(0.1)
        (directory / SUMMARY_FILE).write_text(json.dumps(make_summary(len(records))))

    trainer = threading.Thread(target=train)
    trainer.start()
    out = io.StringIO()
    status = watch(directory, out=out, interval_s=0.02, max_seconds=20)
    trainer.join()
    text = out.getvalue()
    steps = [line.split(" |")[0] for line in text.splitlines() if line.startswith("step ")]
    assert steps == [f"step {20 * i}" for i in range(6)]
    assert text.count("frozen_group") == 1
    assert text.index("frozen_group") > text.index("step 20 |")  # it needs two records to show
    assert "run finished: 6 records" in text
    assert status == 1


def test_max_seconds_ends_a_watch_on_a_run_that_never_starts(tmp_path: Path) -> None:
    """Watching a directory with no records yet says it is waiting and stops at --max-seconds."""
    out = io.StringIO()
    clock = iter(range(100)).__next__
    status = watch(
        tmp_path / "later",
        out=out,
        interval_s=1,
        max_seconds=3,
        clock=lambda: float(clock()),
        sleep=lambda s: None,
    )
    assert status == 0
    assert "waiting for records in" in out.getvalue()
    assert "stopped watching after 3 s (0 records so far)" in out.getvalue()


def test_a_crashed_run_is_not_called_incomplete_while_watched(tmp_path: Path) -> None:
    """A run without summary.json is treated as still running: no incomplete_run complaint."""
    directory = write_run(tmp_path / "run", make_records(n=4), meta=make_meta())
    out = io.StringIO()
    assert watch(directory, out=out, once=True) == 0
    assert "incomplete_run" not in out.getvalue()


def test_watch_follows_a_resume_and_ignores_the_previous_segments_summary(tmp_path: Path) -> None:
    """A run resumed into its directory keeps being watched past segment 0's summary.json; the
    resume is announced, its records printed, and watch ends at segment 1's summary."""
    records = make_resumed_records(n=6, resume_at=4, n_after=4)
    first, second = records[:6], records[6:]
    directory = write_run(tmp_path / "run", first, summary=make_summary(6))
    segments = [{"segment": 0, "started": "t0", "first_seq": 0}, {"segment": 1, "started": "t1", "first_seq": 6}]
    (directory / RUN_FILE).write_text(json.dumps(make_meta(segments=segments)))  # start() of segment 1
    steps_of_training = iter(
        [
            lambda: _append(directory, second),
            lambda: (directory / SUMMARY_FILE).write_text(json.dumps(make_summary(4, segment=1))),
        ]
    )
    out = io.StringIO()
    watch(directory, out=out, interval_s=0, max_seconds=60, tail=10, sleep=lambda s: next(steps_of_training)())
    lines = out.getvalue().splitlines()
    steps = [line.split(" |")[0] for line in lines if line.startswith("step ")]
    assert steps == [f"step {20 * i}" for i in range(6)] + ["step 80", "step 100", "step 120", "step 140"]
    assert "resumed at step 80: 2 records of the previous segment superseded" in lines
    assert lines.index("resumed at step 80: 2 records of the previous segment superseded") < len(lines) - 5
    assert lines[-1] == "run finished: 8 records"


def _append(directory: Path, records: list[dict]) -> None:
    with open(directory / RECORDS_FILE, "ab") as f:
        f.write(b"".join(encode_record(r) for r in records))
