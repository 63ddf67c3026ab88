"""Synthetic runs with known pathologies: test analysis code (ours or yours) without training.

Runs in: tests and any process checking analysis code (no torch).

:func:`make_records` builds the records a two-group model (``backbone`` at LR 1x, ``head``
at 10x) would produce, healthy or with one injected :data:`PATHOLOGIES` entry; every record
passes :func:`train_telemetry.records.validate_record` (nulls, NaN, ``group_<i>`` LR keys
and all). ``layers=True`` adds the per-module ``layers`` breakdown, consistent with the
per-group numbers (the modules of a group combine to its L2 norm), so a pathology shows in
its layers too. :func:`add_metric` adds any metric key of your own to each record.
:func:`write_run` puts records, ``run.json`` and ``summary.json`` into a directory the way
the collector does, optionally crashed (no summary, torn last line).
:func:`make_resumed_records` / :func:`write_resumed_run` make a run resumed into its own
directory from an older checkpoint: two segments whose steps overlap::

    from train_telemetry.testing import add_metric, make_records, write_run
    records = add_metric(make_records("exploding"), "my_metric", lambda r: {"overall": 1.0})
    my_analysis(load_run(write_run(tmp_path / "run", records)))
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from train_telemetry.records import (
    GROUP_FAMILIES,
    OVERALL,
    RECORDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    encode_record,
    nonfinite_keys,
    to_strict_json_value,
    validate_record,
)

__all__ = [
    "GROUPS",
    "LAYERS",
    "PATHOLOGIES",
    "add_metric",
    "make_meta",
    "make_records",
    "make_resumed_records",
    "make_summary",
    "write_pathology",
    "write_resumed_run",
    "write_run",
]

# What each pathology injects, and the diagnosis code that must name it.
PATHOLOGIES: dict[str, tuple[str, str]] = {
    "healthy": ("", "nothing wrong"),
    "frozen_backbone": ("frozen_group", "backbone has no grads and does not move"),
    "zero_lr_backbone": ("frozen_group", "backbone LR is 0"),
    "head_lr_100x": ("lr_ratio_mismatch", "head LR 100x the backbone's, 10x expected"),
    "update_inverted": (
        "update_ratio_inverted",
        "backbone updates 10x faster than the 10x-LR head",
    ),
    "single_class_batches": ("single_class_batches", "every batch holds one class"),
    "imbalanced": ("data_imbalance", "85% of samples are class 0"),
    "shuffled_labels": ("overfitting", "train improves, holdout stays at chance"),
    "overfitting": ("overfitting", "holdout peaks then falls while train accuracy reaches 1"),
    "no_learning": ("no_learning", "nothing moves: train and holdout at chance"),
    "prediction_collapse": ("prediction_collapse", "holdout predictions all class 1 late on"),
    "exploding": ("exploding_gradients", "grad norms grow 10x per record, then Inf"),
    "vanishing": ("vanishing_gradients", "backbone grad norms ~1e-9"),
    "nan_loss": ("nonfinite", "train loss NaN from the middle on"),
    "dropped": ("dropped_snapshots", "a third of the snapshots dropped"),
    "errors": ("telemetry_errors", "holdout eval failed in two records"),
}

GROUPS = ("backbone", "head")
LABEL_KEY = "winner"
# Modules of each group, with the share of the group's squared norm each holds: the
# modules' L2 norms combine to the group's, as the collector's per-layer numbers do.
LAYERS: dict[str, dict[str, float]] = {
    "backbone": {"backbone.0": 0.7, "backbone.2": 0.3},
    "head": {"head": 1.0},
}


def make_meta(
    *,
    expected_lr_ratios: dict[str, float] | None = None,
    collect_every_n: int = 20,
    segments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``run.json`` as the collector writes it, for the two demo groups.

    ``segments`` (``[{"segment", "started", "first_seq"}, ...]``) makes it a resumed run's.
    """
    resumed = {"segment": segments[-1]["segment"], "segments": segments} if segments else {}
    return resumed | {
        "schema": 1,
        "config": {
            "collect_every_n": collect_every_n,
            "label_key": LABEL_KEY,
            "holdout_size": 50,
            "expected_lr_ratios": expected_lr_ratios,
        },
        "groups": {
            "backbone": {"num_params": 12000, "num_tensors": 6},
            "head": {"num_params": 600, "num_tensors": 2},
        },
        "started": "2025-01-01T00:00:00",
        "pid": 4242,
        "torch_version": "2.13.0",
    }


def make_summary(
    records: int,
    *,
    dropped: int = 0,
    errors: dict[str, int] | None = None,
    worker_restarts: int = 0,
    segment: int = 0,
) -> dict[str, Any]:
    """A ``summary.json`` as ``stop()`` writes it."""
    return {
        "records_written": records,
        "snapshots_taken": records + dropped,
        "snapshots_dropped": dropped,
        "errors": errors or {},
        "worker_exitcode": 0,
        "clean": True,
        "worker_restarts": worker_restarts,
        "segment": segment,
    }


def _norms(values: dict[str, float | None]) -> dict[str, float | None]:
    known = [v for v in values.values() if v is not None]
    overall = math.sqrt(sum(v * v for v in known)) if known else None
    return {OVERALL: overall, **values}


def _split(value: float | None, share: float) -> float | None:
    return None if value is None else value * math.sqrt(share)


def _layers(record: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """The ``layers`` breakdown of ``record``'s per-group families, in model order."""
    out: dict[str, dict[str, float | None]] = {}
    for family in GROUP_FAMILIES:
        groups = record[family]
        out[family] = {
            module: _split(groups[group], share) if family != "update_ratio" else groups[group]
            for group, modules in LAYERS.items()
            for module, share in modules.items()
        }
    return out


def add_metric(
    records: list[dict[str, Any]], key: str, compute: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``records`` with ``record[key] = compute(record)`` added to each, as a user metric writes it."""
    for record in records:
        record[key] = compute(record)
        nonfinite = nonfinite_keys(record)
        if nonfinite:
            record["nonfinite"] = nonfinite
        validate_record(record)
    return records


def make_records(
    pathology: str = "healthy",
    *,
    n: int = 12,
    every: int = 20,
    holdout_size: int = 50,
    seed: int = 0,
    layers: bool = False,
) -> list[dict[str, Any]]:
    """``n`` records of a two-group binary classifier, with ``pathology`` injected.

    ``layers`` adds the per-module ``layers`` key (:data:`LAYERS`).
    """
    if pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}: one of {', '.join(PATHOLOGIES)}")
    rng = random.Random(seed)

    def noisy(x: float, spread: float = 0.15) -> float:
        return x * (1 + rng.uniform(-spread, spread))

    labels = [i % 2 for i in range(holdout_size)]
    order = list(range(holdout_size))
    rng.shuffle(order)
    weight_norm = {"backbone": 20.0, "head": 5.0}
    records = []
    for i in range(n):
        t = i / max(n - 1, 1)  # 0 -> 1 over the run
        step = i * every
        lr = {"backbone": 1e-3, "head": 1e-2}
        if pathology == "head_lr_100x":
            lr["head"] = 1e-1
        if pathology == "zero_lr_backbone":
            lr["backbone"] = 0.0

        grad: dict[str, float | None] = {
            "backbone": noisy(0.5 * (1 - 0.5 * t)),
            "head": noisy(1.0 * (1 - 0.5 * t)),
        }
        delta: dict[str, float | None] = {"backbone": noisy(0.02), "head": noisy(0.1)}
        if pathology in ("frozen_backbone", "zero_lr_backbone"):
            delta["backbone"] = 0.0
            if pathology == "frozen_backbone":
                grad["backbone"] = None
        if pathology == "update_inverted":
            delta["backbone"], delta["head"] = noisy(1.0), noisy(0.01)
        if pathology == "exploding":
            grad = {g: noisy(v * 10.0**i) for g, v in grad.items() if v is not None}
            if i >= n - 2:
                grad["head"] = math.inf
        if pathology == "vanishing":
            grad["backbone"] = noisy(1e-9)
        if pathology == "no_learning":
            grad = {"backbone": noisy(0.5), "head": noisy(1.0)}
        if i == 0:
            delta = {g: None for g in GROUPS}
        ratio = {g: (d / weight_norm[g] if d is not None else None) for g, d in delta.items()}
        record: dict[str, Any] = {
            "schema": 1,
            "batch_idx": step,
            "epoch": step // 100,
            "seq": i,
            "timestamp": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}",
            "time": 1735689600.0 + i,
            "rank": 0,
            "world_size": 1,
            "gradient_norm": _norms(grad),
            "weight_delta": _norms(delta) if i else {"overall": None, **delta},
            "weight_norm": _norms(dict(weight_norm)),
            "update_ratio": _norms(ratio) if i else {"overall": None, **ratio},
            "learning_rates": {"group_0": lr["backbone"], "group_1": lr["head"], **lr},
        }
        if layers:
            record["layers"] = _layers(record)
        for g in GROUPS:
            if delta[g] is not None:
                weight_norm[g] += 0.1 * delta[g]  # type: ignore[operator]

        # Holdout accuracy and train metrics per pathology.
        acc = 0.5 + 0.4 * t
        train_loss, train_acc = 0.7 - 0.5 * t, 0.5 + 0.45 * t
        if pathology in (
            "shuffled_labels",
            "no_learning",
            "prediction_collapse",
            "exploding",
            "nan_loss",
        ):
            acc = 0.5 + rng.choice([-0.04, -0.02, 0.0, 0.02, 0.04])
        if pathology in ("no_learning", "prediction_collapse", "exploding", "nan_loss"):
            train_loss, train_acc = 0.69, 0.5
        if pathology == "shuffled_labels":
            train_loss, train_acc = 0.7 - 0.4 * t, 0.5 + 0.45 * t  # memorising the shuffled labels
        if pathology == "overfitting":
            acc = 0.5 + 0.35 * min(t * 2, 1) - (0.3 * (t - 0.5) * 2 if t > 0.5 else 0)
            train_acc = min(1.0, 0.5 + 0.7 * t)
        correct = set(order[: round(acc * holdout_size)])
        if pathology == "prediction_collapse" and t > 0.3:
            preds = [1] * holdout_size
        else:
            preds = [labels[k] if k in correct else 1 - labels[k] for k in range(holdout_size)]
        logits = [[-1.0, 1.0] if p else [1.0, -1.0] for p in preds]
        holdout_acc = sum(p == y for p, y in zip(preds, labels, strict=True)) / holdout_size
        record["holdout_logits"] = {
            "logits": logits,
            "labels": labels,
            "predictions": preds,
            "accuracy": holdout_acc,
            "loss": noisy(0.7 - 0.4 * (holdout_acc - 0.5), 0.02),
        }
        train_loss_value = noisy(train_loss, 0.1)
        if pathology == "nan_loss" and i >= n // 2:
            train_loss_value = math.nan
        record["train"] = {"loss": train_loss_value, "accuracy": min(1.0, noisy(train_acc, 0.05))}

        pct0 = 50.0 + rng.choice([-12.5, -6.25, 0.0, 6.25, 12.5])
        if pathology == "single_class_batches":
            pct0 = 100.0 if i % 2 else 0.0
        if pathology == "imbalanced":
            pct0 = 85.0 + rng.choice([-3.125, 0.0, 3.125])
        record["batch_stats"] = {
            f"{LABEL_KEY}_0_pct": pct0,
            f"{LABEL_KEY}_1_pct": 100.0 - pct0,
            "batch_size": 32,
        }

        dropped_before = 1 if pathology == "dropped" and i % 3 == 1 else 0
        record["telemetry"] = {
            "hook_ms": noisy(1.5, 0.3),
            "dropped_before": dropped_before,
            "dropped_total": 0,  # filled below
            "worker_lag_ms": noisy(20.0, 0.5),
        }
        nonfinite = nonfinite_keys(record)
        if nonfinite:
            record["nonfinite"] = nonfinite
        if pathology == "errors" and i in (3, 4):
            record["errors"] = [
                {"where": "holdout_logits", "type": "RuntimeError", "message": "CUDA out of memory"}
            ]
            del record["holdout_logits"]
        records.append(record)

    dropped_total = 0
    for record in records:
        # A dropped snapshot still took a seq number: later records show the gap.
        dropped_total += record["telemetry"]["dropped_before"]
        record["telemetry"]["dropped_total"] = dropped_total
        record["seq"] += dropped_total
        validate_record(record)
    return records


def write_run(
    directory: str | os.PathLike[str],
    records: list[dict[str, Any]],
    *,
    meta: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    torn_tail: bool = False,
) -> Path:
    """Write ``records`` (and run.json / summary.json when given) into ``directory``.

    ``torn_tail`` appends half of one more record without its newline, as a crash mid-write
    leaves it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / RECORDS_FILE, "wb") as f:
        for record in records:
            f.write(encode_record(record))
        if torn_tail and records:
            line = encode_record(records[-1])
            f.write(line[: len(line) // 2])
    if meta is not None:
        (directory / RUN_FILE).write_text(json.dumps(to_strict_json_value(meta)))
    if summary is not None:
        (directory / SUMMARY_FILE).write_text(json.dumps(to_strict_json_value(summary)))
    return directory


def write_pathology(directory: str | os.PathLike[str], pathology: str, **kwargs: Any) -> Path:
    """A complete run directory for ``pathology`` (run.json, records, summary.json)."""
    records = make_records(pathology, **kwargs)
    dropped = records[-1]["telemetry"]["dropped_total"]
    errors = {"holdout_logits: RuntimeError": 2} if pathology == "errors" else None
    return write_run(
        directory,
        records,
        meta=make_meta(expected_lr_ratios={"backbone": 1.0, "head": 10.0}),
        summary=make_summary(len(records), dropped=dropped, errors=errors),
    )


def _stamp(record: dict[str, Any], seconds: float) -> None:
    record["time"] = 1735689600.0 + seconds
    record["timestamp"] = datetime.fromtimestamp(record["time"], timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )


def make_resumed_records(
    pathology: str = "healthy",
    *,
    n: int = 10,
    resume_at: int = 7,
    n_after: int = 6,
    every: int = 20,
    restart_at: int | None = None,
    seed: int = 0,
    layers: bool = False,
) -> list[dict[str, Any]]:
    """The records file of a run that stopped and was resumed from an older checkpoint.

    Segment 0 holds ``n`` records (steps ``0, every, ...``); the run was then resumed into
    the same directory from the checkpoint of record ``resume_at``'s step, so segment 1's
    ``n_after`` records start at step ``resume_at * every`` and the last ``n - resume_at``
    records of segment 0 are repeated (with other values: they are what the later segment
    supersedes). ``seq`` counts on across segments. ``restart_at`` marks segment 1's
    records from that index on as written after one worker restart (``restarts: 1``).
    The kept records are ``make_records(pathology, n=resume_at + n_after, ...)``.
    """
    if not 0 <= resume_at <= n:
        raise ValueError(f"resume_at={resume_at}: must be between 0 and n={n}")
    total = max(n, resume_at + n_after)
    timeline = make_records(pathology, n=total, every=every, seed=seed, layers=layers)
    repeated = make_records(pathology, n=total, every=every, seed=seed + 1, layers=layers)
    first = [dict(r) for r in timeline[:resume_at]] + [dict(r) for r in repeated[resume_at:n]]
    for i, record in enumerate(first):
        record["segment"] = 0
        _stamp(record, i)
    second = [dict(r) for r in timeline[resume_at : resume_at + n_after]]
    if second:
        shift = (first[-1]["seq"] + 1 if first else 0) - second[0]["seq"]
    for j, record in enumerate(second):
        record["segment"] = 1
        record["seq"] += shift
        if restart_at is not None and j >= restart_at:
            record["restarts"] = 1
        _stamp(record, n + 60 + j)  # resumed a minute after segment 0's last record
    records = first + second
    for record in records:
        validate_record(record)
    return records


def write_resumed_run(directory: str | os.PathLike[str], **kwargs: Any) -> Path:
    """A complete resumed run directory: :func:`make_resumed_records` (``kwargs``), a
    run.json listing both segments and the last segment's summary.json."""
    records = make_resumed_records(**kwargs)
    second = [r for r in records if r["segment"] == 1]
    segments: list[dict[str, Any]] = [
        {"segment": 0, "started": "2025-01-01T00:00:00", "first_seq": 0}
    ]
    if second:
        segments.append(
            {"segment": 1, "started": second[0]["timestamp"], "first_seq": second[0]["seq"]}
        )
    restarts = max((r.get("restarts", 0) for r in records), default=0)
    return write_run(
        directory,
        records,
        meta=make_meta(expected_lr_ratios={"backbone": 1.0, "head": 10.0}, segments=segments),
        summary=make_summary(len(second), worker_restarts=restarts, segment=len(segments) - 1),
    )
