"""Reading run directories: records, run.json/summary.json, groups, steps, crashed, resumed and per-rank runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_telemetry.analysis import RunNotFoundError, load_run, load_runs
from train_telemetry.analysis.load import Run, Segment
from train_telemetry.records import RECORDS_FILE, TypedRecord, decode_typed_record, encode_record
from train_telemetry.testing import (
    add_metric,
    make_meta,
    make_records,
    make_resumed_records,
    make_summary,
    write_pathology,
    write_resumed_run,
    write_run,
)


def typed(records: list[dict]) -> list[TypedRecord]:
    """Records as load_run gives them (a Run holds typed records)."""
    return [decode_typed_record(r) for r in records]


def test_load_run_reads_records_and_both_json_files(tmp_path: Path) -> None:
    """A complete run directory loads its records, its run.json config and its summary.json."""
    run = load_run(write_pathology(tmp_path / "run", "healthy", n=7))
    assert len(run.records) == 7
    assert run.config["label_key"] == "winner"
    assert run.summary is not None and run.summary["records_written"] == 7
    assert run.name == "run"


def test_groups_come_from_run_json_not_from_the_doubled_lr_keys(tmp_path: Path) -> None:
    """learning_rates holds group_0/group_1 and the names; the group list is backbone, head once each."""
    run = load_run(write_pathology(tmp_path / "run", "healthy", n=3))
    assert set(run.records[0]["learning_rates"]) == {"group_0", "group_1", "backbone", "head"}
    assert run.groups == ["backbone", "head"]


def test_groups_without_run_json_come_from_the_per_group_families(tmp_path: Path) -> None:
    """Without run.json the groups are the gradient_norm keys minus overall."""
    run = load_run(write_run(tmp_path / "run", make_records(n=3)))
    assert run.meta is None
    assert run.groups == ["backbone", "head"]


def test_learning_rate_falls_back_to_the_group_index_key(tmp_path: Path) -> None:
    """A record whose LRs are only under group_<i> still gives each named group its LR."""
    records = make_records(n=3)
    for record in records:
        record["learning_rates"] = {"group_0": 1e-3, "group_1": 1e-2}
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta()))
    assert [v for _, v in run.lr_series("head")] == [1e-2] * 3
    assert [v for _, v in run.lr_series("backbone")] == [1e-3] * 3


def test_crashed_run_loads_whole_records_and_reports_the_torn_tail(tmp_path: Path) -> None:
    """A run killed mid-write (no summary.json, half a line at the end) loads every whole record."""
    records = make_records(n=5)
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta(), torn_tail=True))
    assert len(run.records) == 5
    assert run.summary is None
    assert run.torn_tail()


def test_steps_count_on_across_epochs_when_batch_idx_restarts(tmp_path: Path) -> None:
    """A loop that restarts batch_idx each epoch still gets steps that never go back."""
    records = make_records(n=6)
    for i, record in enumerate(records):
        record["epoch"], record["batch_idx"] = divmod(i, 3)
        record["batch_idx"] = (record["batch_idx"] + 1) * 10  # 10, 20, 30 in each epoch
    run = load_run(write_run(tmp_path / "run", records))
    assert run.steps == [10, 20, 30, 40, 50, 60]
    assert run.restarts_each_epoch
    assert run.index_of(40) == 3 and run.index_of(41) is None


def test_steps_extend_as_records_are_appended(tmp_path: Path) -> None:
    """Steps computed for a growing run (watch) agree with steps computed for the whole run."""
    records = make_records(n=6)
    for i, record in enumerate(records):
        record["batch_idx"] = (i % 3 + 1) * 10
    whole = load_run(write_run(tmp_path / "run", records))
    growing = load_run(write_run(tmp_path / "run2", records[:2]))
    first = list(growing.steps)
    growing.records.extend(typed(records[2:]))
    assert first == whole.steps[:2]
    assert growing.steps == whole.steps


def test_per_rank_files_load_as_separate_runs(tmp_path: Path) -> None:
    """telemetry.rank<r>.jsonl files load as one run per rank, each with its own records."""
    directory = tmp_path / "run"
    directory.mkdir()
    for rank, n in ((0, 4), (1, 2)):
        with open(directory / f"telemetry.rank{rank}.jsonl", "wb") as f:
            for record in make_records(n=n):
                f.write(encode_record(record | {"rank": rank}))
    runs = load_runs(directory)
    assert [(r.rank, len(r.records)) for r in runs] == [(0, 4), (1, 2)]
    assert runs[1].name == "run[rank 1]"
    assert load_run(directory, rank=1).records[0]["rank"] == 1
    with pytest.raises(RunNotFoundError, match="one records file per rank"):
        load_run(directory)


def test_missing_run_names_the_path(tmp_path: Path) -> None:
    """A path that is not a run raises an error naming the path and what was expected."""
    with pytest.raises(RunNotFoundError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match=RECORDS_FILE):
        load_run(tmp_path / "empty")


def test_a_records_file_path_loads_its_directory_sidecars(tmp_path: Path) -> None:
    """Pointing at telemetry.jsonl itself still picks up run.json and summary.json next to it."""
    directory = write_run(
        tmp_path / "run", make_records(n=2), meta=make_meta(), summary=make_summary(2)
    )
    run = load_run(directory / RECORDS_FILE)
    assert run.meta is not None and run.summary is not None


def test_any_metric_key_is_found_with_its_numeric_leaves(tmp_path: Path) -> None:
    """Keys without a section of their own are metrics; their numbers are series by dotted path, strings skipped."""
    records = add_metric(make_records(n=3, layers=True), "mean_abs_weight", lambda r: {"overall": r["seq"] / 2})
    for record in records:
        record["activations"] = {"fc1": {"kind": "relu", "dead_fraction": 0.25}}
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta()))
    assert run.metric_keys() == ["layers", "mean_abs_weight", "activations"]
    assert run.leaf_series("mean_abs_weight") == {"overall": [(0, 0.0), (20, 0.5), (40, 1.0)]}
    assert run.leaf_series("activations") == {"fc1.dead_fraction": [(0, 0.25), (20, 0.25), (40, 0.25)]}
    assert run.leaf_series("layers")["gradient_norm.head"] == [
        (s, r["layers"]["gradient_norm"]["head"]) for s, r in zip(run.steps, run.records, strict=True)
    ]


def test_a_resumed_run_reads_as_one_run_where_the_later_segment_wins(tmp_path: Path) -> None:
    """Segment 1 restarts from step 140: segment 0's records from 140 on are superseded, steps go on."""
    records = make_resumed_records(n=10, resume_at=7, n_after=6)
    run = load_run(write_run(tmp_path / "run", records, meta=make_meta()))
    assert run.steps == [20 * i for i in range(13)]
    assert [r.get("segment", 0) for r in run.records] == [0] * 7 + [1] * 6
    assert [r["batch_idx"] for r in run.superseded] == [140, 160, 180]
    assert all(r["segment"] == 0 for r in run.superseded)
    assert run.segments == [Segment(0, 0, 0), Segment(1, 140, 7)]
    assert run.resumes == [140]
    # Step 140's record is the resumed run's own, with its values.
    assert run.records[7]["seq"] == records[10]["seq"] == 10
    assert run.records[7]["gradient_norm"] == records[10]["gradient_norm"]
    assert run.records[7]["gradient_norm"] != records[7]["gradient_norm"]
    assert run.seq_gaps() == 0  # the superseded records' seqs are no loss


def test_a_resume_with_batch_idx_restarting_each_epoch_counts_steps_on(tmp_path: Path) -> None:
    """Per-epoch batch_idx 10..50: a resume in epoch 1 at batch 30 supersedes only epoch 1's tail."""
    def record(seq: int, epoch: int, batch: int, segment: int) -> dict:
        base = make_records(n=1)[0]
        return base | {"seq": seq, "epoch": epoch, "batch_idx": batch, "segment": segment}

    first = [record(i, *divmod(i, 5), 0) for i in range(9)]  # epoch 1 ends at batch 3 (index 8)
    for r in first:
        r["batch_idx"] = (r["batch_idx"] + 1) * 10
    second = [record(9 + i, 1, 30 + 10 * i, 1) for i in range(3)] + [record(12, 2, 10, 1)]
    run = load_run(write_run(tmp_path / "run", first + second))
    assert [(r["epoch"], r["batch_idx"]) for r in run.superseded] == [(1, 30), (1, 40)]
    assert run.steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]
    assert run.resumes == [80]


def test_a_run_without_segments_is_read_as_before(tmp_path: Path) -> None:
    """Records without a segment key: one segment, no resumes, nothing superseded, the same list."""
    records = typed(make_records(n=4))
    run = Run(path=tmp_path, records=records)
    assert run.records is records
    assert run.segments == [Segment(0, 0, 0)] and run.resumes == [] and run.superseded == []
    assert run.worker_restarts == 0 and run.records_after_restart() == 0


def test_extend_resolves_a_resume_that_arrives_later(tmp_path: Path) -> None:
    """Records appended in pieces (watch) give the same run as records read at once."""
    records = make_resumed_records(n=10, resume_at=7, n_after=6)
    whole = Run(path=tmp_path, records=typed(records))
    growing = Run(path=tmp_path, records=typed(records[:9]))
    assert growing.steps[-1] == 160
    start = growing.extend(typed(records[9:12]))
    assert start == 7  # the new records replace steps 140.. onward
    assert [r["batch_idx"] for r in growing.records[start:]] == [140, 160]
    growing.extend(typed(records[12:]))
    assert growing.steps == whole.steps
    assert growing.records == whole.records and growing.superseded == whole.superseded


def test_worker_restarts_come_from_the_summary_else_the_records(tmp_path: Path) -> None:
    """summary.json's worker_restarts wins; a run still training counts its records' restarts."""
    directory = write_resumed_run(tmp_path / "run", restart_at=2, n_after=5)
    run = load_run(directory)
    assert run.worker_restarts == 1 and run.records_after_restart() == 3
    (directory / "summary.json").unlink()
    assert load_run(directory).worker_restarts == 1
