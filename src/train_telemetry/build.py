"""Snapshot in, record out: runs the enabled metrics on one :class:`SnapshotData`.

Runs in: the worker process (or the training process in sync mode). Pure: no I/O; the
slot reading and the reference checkpoint are the processor's (processor.py), the
writing is the writer's (writer.py).

The record comes out as a :class:`~.records.TypedRecord`, checked against the schema the
readers use: a metric whose value does not fit it (a user metric returning a string) costs
its own key and an ``errors`` entry, never the record, and nothing is written that
``load_run`` would skip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from .messages import Snapshot
from .metrics.api import InputFailed, Metric, SnapshotData
from .provenance import nonfinite_origin
from .records import (
    SCHEMA_VERSION,
    Record,
    RecordError,
    TypedRecord,
    error_entry,
    nonfinite_keys,
    typed_record,
)

OnError = Callable[[str, BaseException], None]


def build_record(
    data: SnapshotData,
    metrics: Sequence[Metric],
    header: Snapshot,
    errors: list[dict[str, str]],
    on_error: OnError,
    built_by: str = "worker",
    stamp: dict[str, int] | None = None,
    since_step: int | None = None,
) -> TypedRecord:
    """The record of one snapshot: its core keys, one key per metric that returned numbers.

    ``built_by``: "worker" or "trainer" (inline), written in ``telemetry``; ``stamp``: the
    run's ``restarts`` / ``segment`` when not 0, written last; ``since_step``: the step of the
    last record with only finite values (``nonfinite_origin``, provenance.py).
    ``errors`` holds what already failed (in the hook, reading the slot); a metric that
    raises adds its entry and costs only its own key. ``on_error(where, exc)`` counts it.
    """
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "batch_idx": data.batch_idx,
        **({"step": data.step} if data.step is not None else {}),
        "epoch": data.epoch,
        "seq": data.seq,
        "timestamp": datetime.fromtimestamp(data.time, timezone.utc).astimezone().isoformat(),
        "time": data.time,
        "rank": data.rank,
        "world_size": data.world_size,
    }
    for m in metrics:
        try:
            value = m.compute(data)
        except InputFailed:
            continue  # reported once, under the metric that first needed that input
        except Exception as exc:
            errors.append(error_entry(m.key, exc))
            on_error(m.key, exc)
            continue
        if value is not None:
            record[m.key] = dict(value)
    if "weight_delta" in record:
        found = data.weight_deltas if data._deltas is not None and data._deltas.error is None else None
        record["reference_batch_idx"] = found.reference_batch_idx if found is not None else None
    record.update(header.extra.get("values", {}))  # the hook's ``extra=`` keys, as given
    record["telemetry"] = {
        "hook_ms": header.hook_ms,
        "dropped_before": header.dropped_before,
        "dropped_total": header.dropped_total,
        "worker_lag_ms": (time.time() - header.time) * 1000.0,
        "built_by": built_by,
    }
    nonfinite = nonfinite_keys(record)
    if nonfinite:
        record["nonfinite"] = nonfinite
        try:
            record["nonfinite_origin"] = nonfinite_origin(data, since_step)
        except Exception as exc:
            errors.append(error_entry("nonfinite_origin", exc))
            on_error("nonfinite_origin", exc)
    if errors:
        record["errors"] = errors
    record.update(stamp or {})
    try:
        return typed_record(record)
    except RecordError:
        return _without_misfits(record, on_error)


def _without_misfits(record: dict[str, Any], on_error: OnError) -> TypedRecord:
    """``record`` less each key whose value does not fit the schema, with its ``errors`` entry."""
    errors = list(record.pop("errors", []))
    base = {k: v for k, v in record.items() if k in _BASE}
    for key in [k for k in record if k not in _BASE]:
        try:
            typed_record(base | {key: record[key]})
        except RecordError as exc:
            del record[key]
            errors.append(error_entry(key, exc))
            on_error(key, exc)
    if errors:
        record["errors"] = errors
    return typed_record(record)


# The keys every record has (Record's fields without a default): each other key is checked beside them.
_BASE = frozenset(Record.__struct_fields__[: len(Record.__struct_fields__) - len(Record.__struct_defaults__)])
