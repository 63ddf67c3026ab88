"""Runs as tables (pandas: CSV, Parquet) and as TensorBoard scalars.

Runs in: any process that reads a run (no torch). pandas (the ``export`` extra; pyarrow for
Parquet) and tensorboard (the ``tensorboard`` extra) are imported only when used. The
TensorBoard writer is tensorboard's own event-file writer and protos, the same ones
``torch.utils.tensorboard`` uses, so no torch is needed to write them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from msgspec import UNSET

from train_telemetry.analysis.extras import require
from train_telemetry.analysis.load import Run, TypedRecord, load_run, number
from train_telemetry.records import NOT_SCALARS

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "TableFormat",
    "export_tensorboard",
    "flatten_record",
    "holdout_dataframe",
    "to_dataframe",
    "write_table",
]

TableFormat = Literal["csv", "parquet"]
# The per-example holdout lists would be one column per example; they get their own long
# table (holdout_dataframe) instead.
_PER_EXAMPLE = (
    "holdout_logits.logits",
    "holdout_logits.labels",
    "holdout_logits.predictions",
    "holdout_logits.example_loss",
    "holdout_logits.example_accuracy",
)
_LEADING = ("batch_idx", "epoch", "seq", "timestamp", "segment", "superseded")


def flatten_record(record: TypedRecord, *, per_example: bool = False) -> dict[str, Any]:
    """One record as flat columns: nested keys joined with '.', e.g. ``gradient_norm.head``.

    Any metric's key flattens the same way (``layers.gradient_norm.fc1``,
    ``activations.fc1.dead_fraction``), so a new metric needs no change here. The columns
    are the record as written (:meth:`TypedRecord.to_dict`: its keys in their order).
    ``nonfinite`` becomes one ';'-joined string and ``errors`` a JSON string (both are lists);
    the holdout's per-example lists are dropped unless ``per_example``.
    """
    out: dict[str, Any] = {}

    # Walks the written record generically, whatever a metric nests: hence the type checks.
    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            if prefix == "nonfinite":
                out[prefix] = ";".join(str(v) for v in value)
            elif prefix in _PER_EXAMPLE and not per_example:
                return
            else:
                out[prefix] = json.dumps(value, default=str)
        else:
            out[prefix] = value

    walk("", record.to_dict())
    return out


def _as_run(run: Run | str | os.PathLike[str]) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def to_dataframe(
    run: Run | str | os.PathLike[str], *, include_superseded: bool = False
) -> pd.DataFrame:
    """One row per record, one column per flattened key (``gradient_norm.head``, ``train.loss``...).

    ``timestamp`` is parsed to a datetime; NaN/Inf stay floats. The per-example holdout
    lists are in :func:`holdout_dataframe`. A resumed run has a ``segment`` column (0 for
    the first run); the records its resumes recorded again (:attr:`Run.superseded`) are left
    out unless ``include_superseded``: then every record is a row, in ``seq`` order, and a
    ``superseded`` column tells them apart.
    """
    pd_ = require("pandas", extra="export", purpose="to_dataframe()")
    run = _as_run(run)
    if include_superseded:
        marked = [(r, False) for r in run.records] + [(r, True) for r in run.superseded]
        marked.sort(key=lambda item: item[0].seq)  # stable: file order
        rows = [flatten_record(r) | {"superseded": gone} for r, gone in marked]
    else:
        rows = [flatten_record(r) for r in run.records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    ordered = [c for c in _LEADING if c in columns] + [c for c in columns if c not in _LEADING]
    frame = pd_.DataFrame(rows, columns=ordered)
    if "segment" in frame.columns:  # records from before a run was first resumed may lack it
        frame["segment"] = frame["segment"].fillna(0).astype(int)
    if "timestamp" in frame.columns:
        frame["timestamp"] = pd_.to_datetime(frame["timestamp"], errors="coerce", format="ISO8601")
    return frame


def holdout_dataframe(run: Run | str | os.PathLike[str]) -> pd.DataFrame:
    """One row per (record, holdout example): step, example, label, prediction, correct, logit_<k>.

    For sequence labels (tokens) the row is the example's mean loss and accuracy per token
    (columns ``loss`` and ``accuracy``) instead.
    """
    pd_ = require("pandas", extra="export", purpose="holdout_dataframe()")
    rows = []
    for step, record, holdout in _as_run(run).holdout():
        if holdout.example_loss is not UNSET and holdout.predictions is UNSET:
            accuracy = holdout.example_accuracy or []
            rows += [
                {
                    "batch_idx": step,
                    "epoch": record.epoch,
                    "seq": record.seq,
                    "example": i,
                    "loss": loss,
                    "accuracy": accuracy[i] if i < len(accuracy) else None,
                }
                for i, loss in enumerate(holdout.example_loss)
            ]
            continue
        labels = holdout.labels or []
        logits = holdout.logits or []
        for i, pred in enumerate(holdout.predictions or []):
            row: dict[str, Any] = {
                "batch_idx": step,
                "epoch": record.epoch,
                "seq": record.seq,
                "example": i,
                "label": labels[i] if i < len(labels) else None,
                "prediction": pred,
            }
            row["correct"] = row["label"] == pred if row["label"] is not None else None
            example_logits = logits[i] if i < len(logits) else []
            # logits is list[Any] in the schema: a list of class scores, or one score.
            for k, v in enumerate(
                example_logits if isinstance(example_logits, list) else [example_logits]
            ):
                row[f"logit_{k}"] = v
            rows.append(row)
    return pd_.DataFrame(rows)


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str], fmt: TableFormat) -> Path:
    """Write ``frame`` as CSV or Parquet (Parquet needs pyarrow); returns the path written."""
    path = Path(path)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        require("pyarrow", extra="export", purpose="Parquet export")
        frame.to_parquet(path, index=False)
    else:
        raise ValueError(f"format {fmt!r} is not supported: use 'csv' or 'parquet'")
    return path


def _scalars(run: Run) -> Iterator[tuple[str, int, float, float]]:
    """(tag, step, wall time, value) for each numeric leaf of each record."""
    for i, record in enumerate(run.records):
        step = run.step(i)
        wall = record.time if math.isfinite(record.time) else time.time()
        for key, value in flatten_record(record).items():
            f = number(value)  # a flattened column: a number, a string (timestamp) or null
            if f is None or key in NOT_SCALARS:
                continue
            # TensorBoard groups tags by their first '/' part: gradient_norm/head, train/loss.
            yield key.replace(".", "/", 1), step, wall, f


def export_tensorboard(run: Run | str | os.PathLike[str], logdir: str | os.PathLike[str]) -> int:
    """Write every numeric value of the run as TensorBoard scalars under ``logdir``; returns the count."""
    require("tensorboard", extra="tensorboard", purpose="TensorBoard export")
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    Path(logdir).mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir))
    count = 0
    try:
        for tag, step, wall, value in _scalars(_as_run(run)):
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
            writer.add_event(Event(wall_time=wall, step=step, summary=summary))
            count += 1
    finally:
        writer.close()
    return count
