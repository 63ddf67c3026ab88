"""Exports: to_dataframe's flattened columns, CSV/Parquet files, the per-example table, TensorBoard."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from train_telemetry.analysis import (
    MissingExtraError,
    export_tensorboard,
    holdout_dataframe,
    load_run,
    to_dataframe,
    write_table,
)
from train_telemetry.testing import (
    add_metric,
    make_meta,
    make_records,
    make_resumed_records,
    write_pathology,
    write_resumed_run,
    write_run,
)

pd = pytest.importorskip("pandas")


def test_to_dataframe_flattens_nested_keys(tmp_path: Path) -> None:
    """One row per record; nested keys become columns like gradient_norm.head with the record's values."""
    directory = write_pathology(tmp_path / "run", "healthy", n=5)
    run = load_run(directory)
    frame = to_dataframe(directory)
    assert len(frame) == 5
    assert list(frame.columns[:4]) == ["batch_idx", "epoch", "seq", "timestamp"]
    for column in (
        "gradient_norm.head",
        "learning_rates.group_0",
        "learning_rates.backbone",
        "train.loss",
        "holdout_logits.accuracy",
        "batch_stats.winner_0_pct",
        "telemetry.hook_ms",
    ):
        assert column in frame.columns, column
    assert frame["gradient_norm.head"].tolist() == [r["gradient_norm"]["head"] for r in run.records]
    assert not any(c.startswith("holdout_logits.logits") for c in frame.columns)
    assert str(frame["timestamp"].dtype).startswith("datetime64")


def test_nan_stays_a_float_and_nulls_are_missing(tmp_path: Path) -> None:
    """NaN values come back as float NaN; a null (first record's weight delta) as missing."""
    frame = to_dataframe(write_pathology(tmp_path / "run", "nan_loss", n=6))
    assert math.isnan(frame["train.loss"].iloc[-1])
    assert pd.isna(frame["weight_delta.head"].iloc[0])
    assert frame["nonfinite"].iloc[-1] == "train.loss"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_files_round_trip(tmp_path: Path, fmt: str) -> None:
    """A CSV or Parquet export reads back with the same rows and per-group columns."""
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    frame = to_dataframe(write_pathology(tmp_path / "run", "healthy", n=4))
    path = write_table(frame, tmp_path / f"t.{fmt}", fmt)  # type: ignore[arg-type]
    back = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    assert len(back) == 4
    assert back["gradient_norm.backbone"].tolist() == pytest.approx(
        frame["gradient_norm.backbone"].tolist()
    )


def test_holdout_dataframe_has_one_row_per_example_and_record(tmp_path: Path) -> None:
    """The per-example table has records x holdout rows, with label, prediction and logits."""
    directory = write_pathology(tmp_path / "run", "healthy", n=3, holdout_size=20)
    run = load_run(directory)
    frame = holdout_dataframe(run)
    assert len(frame) == 3 * 20
    last = frame[frame["batch_idx"] == run.steps[-1]]
    holdout = run.records[-1]["holdout_logits"]
    assert last["prediction"].tolist() == holdout["predictions"]
    assert last["correct"].mean() == pytest.approx(holdout["accuracy"])
    assert {"logit_0", "logit_1"} <= set(frame.columns)


def test_missing_pandas_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pandas, to_dataframe fails with the pip command that fixes it."""
    directory = write_pathology(tmp_path / "run", "healthy", n=2)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'train-telemetry\[export\]'"):
        to_dataframe(directory)


def test_tensorboard_export_writes_readable_scalars(tmp_path: Path) -> None:
    """Every numeric value becomes a TensorBoard scalar at the record's step, readable by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = load_run(write_pathology(tmp_path / "run", "healthy", n=4))
    count = export_tensorboard(run, tmp_path / "tb")
    assert count > 4 * 20
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "gradient_norm/head",
        "learning_rates/backbone",
        "holdout_logits/accuracy",
        "train/loss",
    } <= set(tags)
    head = events.Scalars("gradient_norm/head")
    assert [e.step for e in head] == run.steps
    assert [e.value for e in head] == pytest.approx(
        [r["gradient_norm"]["head"] for r in run.records], rel=1e-6
    )


def test_missing_tensorboard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without tensorboard, the export fails with the pip command that fixes it."""
    run = load_run(write_pathology(tmp_path / "run", "healthy", n=2))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'train-telemetry\[tensorboard\]'"):
        export_tensorboard(run, tmp_path / "tb")


def _metric_run(tmp_path: Path) -> Path:
    """A run whose records carry a made-up metric and the nested per-layer breakdown."""
    records = add_metric(
        make_records(n=4, layers=True),
        "mean_abs_weight",
        lambda r: {"overall": 0.5 + r["seq"], "backbone": 0.25, "head": None},
    )
    return write_run(tmp_path / "run", records, meta=make_meta())


def test_any_metric_becomes_dotted_columns(tmp_path: Path) -> None:
    """A metric unknown to the code, and nested layers, become dotted columns with the record's values."""
    frame = to_dataframe(_metric_run(tmp_path))
    assert frame["mean_abs_weight.overall"].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert frame["mean_abs_weight.backbone"].tolist() == [0.25] * 4
    assert frame["mean_abs_weight.head"].isna().all()
    for column in ("layers.gradient_norm.head", "layers.weight_norm.backbone.0", "layers.update_ratio.backbone.2"):
        assert column in frame.columns, column


def test_any_metric_becomes_tensorboard_scalars(tmp_path: Path) -> None:
    """TensorBoard gets a scalar per number of a made-up metric and of the per-layer breakdown."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = load_run(_metric_run(tmp_path))
    export_tensorboard(run, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"mean_abs_weight/overall", "mean_abs_weight/backbone", "layers/gradient_norm.head"} <= tags
    assert "mean_abs_weight/head" not in tags  # null is no scalar
    assert [e.value for e in events.Scalars("mean_abs_weight/overall")] == [0.5, 1.5, 2.5, 3.5]


def test_a_resumed_run_exports_its_kept_records_with_a_segment_column(tmp_path: Path) -> None:
    """Superseded records are left out by default; segment is 0 then 1; one row per step."""
    directory = write_resumed_run(tmp_path / "run", n=10, resume_at=7, n_after=6)
    frame = to_dataframe(directory)
    assert list(frame["batch_idx"]) == [20 * i for i in range(13)]
    assert list(frame["segment"]) == [0] * 7 + [1] * 6
    assert "superseded" not in frame.columns
    assert list(frame.columns[:5]) == ["batch_idx", "epoch", "seq", "timestamp", "segment"]


def test_include_superseded_adds_every_record_in_seq_order_marked(tmp_path: Path) -> None:
    """include_superseded=True: all 16 records in file (seq) order, the 3 superseded marked."""
    run = load_run(write_resumed_run(tmp_path / "run", n=10, resume_at=7, n_after=6))
    frame = to_dataframe(run, include_superseded=True)
    assert list(frame["seq"]) == list(range(16))
    assert list(frame["superseded"]) == [False] * 7 + [True] * 3 + [False] * 6
    assert list(frame.loc[frame["superseded"], "batch_idx"]) == [140, 160, 180]


def test_records_without_a_segment_key_are_segment_0(tmp_path: Path) -> None:
    """The collector leaves segment out of the first run's records: the column says 0 for them."""
    records = make_resumed_records(n=4, resume_at=4, n_after=2)
    for record in records[:4]:
        del record["segment"]
    frame = to_dataframe(load_run(write_run(tmp_path / "run", records)))
    assert list(frame["segment"]) == [0, 0, 0, 0, 1, 1]
