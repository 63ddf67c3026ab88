"""What a mirror is: the :class:`Mirror` protocol a tracker implements, and what it is sent.

Runs in: wherever records are built (the worker process, or the training process beside the
inline builder), on the mirror's own thread (hub.py); and in ``train-telemetry mirror``. Imports
no torch: the replay command runs where torch is absent.

A mirror is sent, in this order, on one thread: ``open(context)`` once (import the tracker,
attach to or start a run), ``log_scalars(step, scalars)`` per record, then at the end
``log_holdout(step, table)`` (the last record's holdout, per example),
``log_diagnoses(diagnoses, text)`` and ``close()``. Only ``log_scalars`` is required: the
hub calls the others where the class has them (:class:`BaseMirror` has them all, as no-ops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgspec
from msgspec import UNSET

from ..records import NOT_SCALARS as RECORD_NOT_SCALARS
from ..records import TypedRecord

__all__ = [
    "BaseMirror",
    "HoldoutTable",
    "Mirror",
    "MirrorContext",
    "MirrorStats",
    "holdout_table",
    "record_scalars",
    "record_step",
]

# export's bookkeeping, and two keys export --tensorboard keeps (its event files are ours
# alone): a mirror may log into the framework's own run (mirror: framework, an active MLflow
# / wandb run), where the Trainer and Lightning log an `epoch` series of their own: ours would
# be interleaved into it, at other steps. The step axis says where a record is anyway.
NOT_SCALARS = RECORD_NOT_SCALARS | {"epoch", "reference_batch_idx"}


@dataclass
class MirrorContext:
    """What a mirror knows of the run when it opens."""

    run_dir: Path  # the output_dir
    run_name: str  # output_dir's name: the default run / project name
    rank: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the TelemetryConfig, as run.json holds it
    replay: bool = False  # sent by `train-telemetry mirror`, not live


@dataclass
class HoldoutTable:
    """The holdout's per-example table of one record: ``columns`` and one row per example
    (classifier: example, label, prediction, correct, logit_<k>; tokens: example, loss, accuracy)."""

    step: int
    columns: list[str]
    rows: list[list[Any]]

    def to_csv(self) -> str:
        lines = [",".join(self.columns)]
        lines += [",".join("" if v is None else str(v) for v in row) for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + " --- |" * len(self.columns)]
        lines += ["| " + " | ".join("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                    for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@runtime_checkable
class Mirror(Protocol):
    """A tracker the records are mirrored to: one class. Only ``log_scalars`` is required;
    ``open(context)``, ``log_holdout(step, table)``, ``log_diagnoses(diagnoses, text)`` and
    ``close()`` are called where the class defines them (see :class:`BaseMirror`).

    Every call comes from one thread of its own, never the training thread; a call may be
    slow or raise: that costs this mirror's records only (counted in the summary).
    """

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...


class BaseMirror:
    """A base for your own tracker: override ``log_scalars`` and what else the tracker has.

    ``name`` is the mirror's name in the summary (default: the class name, lower case).
    """

    name: str = ""

    def open(self, context: MirrorContext) -> None:
        """Once, before the first record: import the tracker, attach to or start a run."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One record's numbers, named by export's columns (``gradient_norm.head``)."""
        raise NotImplementedError

    def log_holdout(self, step: int, table: HoldoutTable) -> None:
        """At the end: the last record's holdout, one row per example."""

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        """At the end: train_telemetry.analysis.diagnose's findings (``code``, ``severity``,
        ``message`` ...) and the report's text of them."""

    def close(self) -> None:
        """At the end: flush, and end the run if this mirror started it."""


class MirrorStats(msgspec.Struct, kw_only=True):
    """What one mirror did: in ``summary.json``'s ``mirrors`` and TelemetrySummary.mirrors."""

    sent: int = 0  # records the tracker accepted
    dropped: int = 0  # records it never got: its queue was full (oldest first), a call raised, it failed, or stop() left it
    failed_calls: int = 0  # calls that raised
    state: str = "ok"  # ok; failed (could not open: not installed, bad options); abandoned (stop()'s deadline)
    error: str | None = None  # the first error, as "Type: message"


def record_step(record: TypedRecord) -> int:
    """The record's step axis: ``step`` (monotonic), ``batch_idx`` in records without it."""
    step = record.step
    return int(step) if step is not UNSET and step is not None else int(record.batch_idx)


def record_scalars(record: TypedRecord, prefix: str = "") -> dict[str, float]:
    """Every finite number of ``record`` by export's column name (``gradient_norm.head``,
    ``holdout_logits.accuracy``, ``layers.gradient_norm.fc1`` ...), bookkeeping left out.
    Non-finite values are left out too: not every tracker stores NaN (the JSONL has them)."""
    from ..analysis.export import flatten_record  # no torch; imported on the mirror's thread

    out: dict[str, float] = {}
    for key, value in flatten_record(record).items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        f = float(value)
        if math.isfinite(f):
            out[prefix + key] = f
    return out


def holdout_table(record: TypedRecord, step: int) -> HoldoutTable | None:
    """The per-example table of ``record``'s holdout, None when it has none."""
    holdout = record.holdout_logits
    if holdout is UNSET or holdout is None:
        return None
    if holdout.example_loss is not UNSET and holdout.predictions is UNSET:
        accuracy = holdout.example_accuracy if holdout.example_accuracy is not UNSET else []
        accuracy = accuracy or []
        rows = [[i, loss, accuracy[i] if i < len(accuracy) else None] for i, loss in enumerate(holdout.example_loss)]
        return HoldoutTable(step, ["example", "loss", "accuracy"], rows)
    predictions = holdout.predictions if holdout.predictions is not UNSET else []
    if not predictions:
        return None
    labels = holdout.labels if holdout.labels is not UNSET else []
    logits = holdout.logits if holdout.logits is not UNSET else []
    width = max((len(v) if isinstance(v, list) else 1 for v in logits), default=0)
    rows = []
    for i, pred in enumerate(predictions):
        label = labels[i] if i < len(labels) else None
        scores = logits[i] if i < len(logits) else []
        scores = scores if isinstance(scores, list) else [scores]
        rows.append([i, label, pred, None if label is None else label == pred,
                     *scores, *([None] * (width - len(scores)))])
    return HoldoutTable(step, ["example", "label", "prediction", "correct", *(f"logit_{k}" for k in range(width))], rows)
