"""Reading a run: its records, ``run.json`` and ``summary.json``, and the per-group lookups
that the report, the diagnoses, the plots and the exports all share.

Runs in: any process that reads a run, finished, crashed or still training (no torch).

A run directory holds ``telemetry.jsonl`` (or ``telemetry.rank<r>.jsonl`` per rank), and
usually ``run.json`` (written at start) and ``summary.json`` (written by ``stop()``); either
JSON file may be missing after a crash, so everything here treats them as optional.

Records are decoded into :class:`~train_telemetry.records.TypedRecord` (the schema,
``records.Record``, checks every core key's type once; a record that does not match is
skipped with a warning naming its line): everything downstream reads typed fields and
re-checks no type. run.json and summary.json have no schema and stay dicts.

A run resumed into its own directory (a script that restarts from its checkpoint and calls
``start()`` again) appends a new *segment* to the same records file: each record carries
``segment`` (absent = 0) and ``seq`` counts on. A resume usually goes back to a checkpoint
older than the last record, so the new segment repeats steps the previous one already
recorded; :class:`Run` reads all segments as one run in which the later segment wins (see
:attr:`Run.superseded`).
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from msgspec import UNSET, UnsetType

from train_telemetry.records import (
    BOOKKEEPING_KEYS,
    GROUP_FAMILIES,
    OVERALL,
    RECORDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    HoldoutLogits,
    TelemetryCost,
    TypedRecord,
    read_json,
    read_typed_records,
)

__all__ = [
    "GRADIENT_SOURCES",
    "GROUP_FAMILIES",
    "OVERALL",
    "PRE_CLIP",
    "SECTION_KEYS",
    "SEQUENCE_SCORED",
    "UNASSIGNED",
    "KeyedFamily",
    "Reader",
    "Run",
    "RunNotFoundError",
    "Segment",
    "TypedRecord",
    "as_float",
    "class_sort_key",
    "family_values",
    "find_record_files",
    "format_number",
    "holdout_accuracy",
    "holdout_chance",
    "holdout_class_count",
    "holdout_is_sequence",
    "holdout_perplexity",
    "load_run",
    "load_runs",
    "number",
    "numeric_leaves",
    "record_position",
    "record_segment",
    "train_accuracy",
    "train_loss",
]

# Keys with a section of their own in the report and the dashboard. Any other key whose
# value is a dict is a metric shown generically (Run.metric_keys), so a new metric needs no
# change here.
SECTION_KEYS = BOOKKEEPING_KEYS | {
    *GROUP_FAMILIES, "learning_rates", "holdout_logits", "batch_stats", "train",
    "gradient_norm_pre_clip", "gradient_clipping",
}

PRE_CLIP: Final = "gradient_norm_pre_clip"
"""The per-group family of gradient norms before clipping (``gradient_norm`` is then what
the optimizer applied)."""
# Where a run's gradient norms before any clipping come from, best first (see
# Run.gradient_norm_source): our clip helper's per-group norms; the Hugging Face integration's
# (or the helper's) total norm before clipping; the applied norms, when nothing was clipped.
GRADIENT_SOURCES = (PRE_CLIP, "gradient_clipping.pre_clip_norm", "gradient_norm")

UNASSIGNED = "unassigned"
"""The group the collector puts the parameters that no optimizer group holds in (a LoRA
model's frozen base): never updated, so a zero weight delta there is by design."""

SEQUENCE_SCORED = {
    "all": "every labelled position",
    "shifted": "the next token at each position (the labels are the inputs, shifted by the model)",
    "last": "only the model's last position",
}
"""What each ``holdout_logits.scored`` value means, in the report's words."""

_RANK_FILE = re.compile(r"^telemetry\.rank(\d+)\.jsonl$")
_ANY_CLASS_KEY = re.compile(r"^(?:.+)_(.+?)_pct$")
# math.exp overflows a float above ~709.78.
_MAX_EXP = 709.0
_GROUP_INDEX = re.compile(r"^group_(\d+)$")


class RunNotFoundError(FileNotFoundError):
    """The path holds no telemetry records; the message names the path and what was expected."""


def format_number(value: Any, digits: int = 3) -> str:
    """A short human form of a number (3 significant digits, exponent when far from 1)."""
    f = number(value)
    if f is None:
        return "-" if value is None else str(value)
    if not math.isfinite(f):
        return {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}[repr(f)]
    if f == 0:
        return "0"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if 1e-3 <= abs(f) < 1e5:
        return f"{f:.{digits}g}"
    return f"{f:.{max(digits - 1, 1)}e}"


def number(value: Any) -> float | None:
    """``value`` as a float if it is a number (NaN and +-Inf included), else None.

    For values of no fixed type only: run.json and summary.json (no schema), a metric's
    leaves (numbers, nulls or nested dicts), report data. A record's typed fields need none.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def numeric_leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, float) for each number under ``value``; strings, nulls and lists are skipped.

    A metric's value is a dict whose leaves are numbers, nulls or dicts (``activations``'
    also strings): several types by the schema, hence the checks.
    """
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from numeric_leaves(inner, f"{prefix}.{key}" if prefix else str(key))
        return
    f = number(value)
    if f is not None:
        yield prefix, f


def as_float(value: float | None) -> float | None:
    """A recorded number as a float, None kept: ``batch_stats`` and ``model_mode`` hold ints
    (counts) beside floats, and what is computed from them is a float."""
    return None if value is None else float(value)


KeyedFamily = Literal[
    "gradient_norm",
    "weight_delta",
    "weight_norm",
    "update_ratio",
    "gradient_norm_pre_clip",
    "learning_rates",
    "gradient_clipping",
    "batch_stats",
    "model_mode",
]
"""The record keys typed ``dict[str, number | null]``: {group or name: value}."""


def family_values(record: TypedRecord, family: KeyedFamily) -> dict[str, float | None] | None:
    """``record``'s dict for ``family``, None when the record has none."""
    # getattr by name: every KeyedFamily field has this one type (records.Record).
    values: dict[str, float | None] | UnsetType = getattr(record, family)
    return None if values is UNSET else values


_NO_VALUES: Mapping[str, float | None] = MappingProxyType({})

Reader = Callable[[TypedRecord], float | None]
"""One number of a record (None when it is not recorded), for :meth:`Run.points`."""


def train_loss(record: TypedRecord) -> float | None:
    return record.train.loss if record.train else None


def train_accuracy(record: TypedRecord) -> float | None:
    return record.train.accuracy if record.train else None


def record_segment(record: TypedRecord) -> int:
    """The run segment a record belongs to: its ``segment`` key, 0 when absent (older runs)."""
    return record.segment or 0


def record_position(record: TypedRecord) -> tuple[int, int]:
    """Where a record sits in training: (``epoch``, ``batch_idx``); ordered as training ran.

    Compared across segments to find what a resume repeated: the epoch comes first so that
    a ``batch_idx`` that restarts each epoch still orders correctly.
    """
    return record.epoch, record.batch_idx


def _written_step(record: TypedRecord) -> int | None:
    """The record's own ``step`` (rundir.StepClock); None for records of versions before it."""
    return record.step if record.step is not UNSET else None


class Segment(NamedTuple):
    """One start of the run in its directory: its number, first step and first record index."""

    segment: int
    first_step: int
    first_index: int


@dataclass
class Run:
    """One run (one rank of it) as read from disk: records plus the optional JSON files.

    ``records`` are the records of the run as trained: where a resumed segment repeats steps
    of an earlier one, the earlier segment's records from the resume's position on are moved
    to ``superseded`` (see :meth:`extend`). A run of one segment keeps the list it was given.
    """

    path: Path
    records: list[TypedRecord]
    meta: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    rank: int | None = None
    records_file: Path | None = None
    superseded: list[TypedRecord] = field(default_factory=list)
    # groups is derived from meta and records, which grow while a run is watched: cache it
    # against their identity and length.
    _groups: tuple[tuple[int, int], list[str]] | None = field(default=None, init=False, repr=False)
    # steps are extended, not recomputed, as records are appended (watch).
    _steps: list[int] | None = field(default=None, init=False, repr=False)
    _step_state: tuple[int, int] = field(default=(0, 0), init=False, repr=False)

    def __post_init__(self) -> None:
        records = self.records
        if records and any(record_segment(r) != record_segment(records[0]) for r in records):
            self.records = []
            self.extend(records)

    def extend(self, records: Iterable[TypedRecord]) -> int:
        """Append records in file order, resolving resumes; returns where the new ones start.

        A record whose segment differs from the last record's starts a segment: the records
        before it at the same or a later position (:func:`record_position`) were recorded
        again by the resumed run and move to :attr:`superseded`. ``self.records[start:]``
        (``start`` the returned index) are then exactly the new records still kept.
        """
        start = len(self.records)
        for record in records:
            kept = self.records
            if kept and record_segment(record) != record_segment(kept[-1]):
                here = record_position(record)
                cut = len(kept)
                # From the end back: a batch_idx that restarts each epoch must not cut at an
                # earlier epoch's equal batch_idx.
                while cut and record_position(kept[cut - 1]) >= here:
                    cut -= 1
                if cut < len(kept):
                    self.superseded.extend(kept[cut:])
                    del kept[cut:]
                    start = min(start, cut)
                    self._steps, self._groups = None, None
            self.records.append(record)
        return start

    @property
    def segments(self) -> list[Segment]:
        """(segment, first step, first index) of each segment with records, in run order.

        One entry for a run that was never resumed (or an older run without ``segment``).
        """
        out: list[Segment] = []
        steps = self.steps
        for i, record in enumerate(self.records):
            segment = record_segment(record)
            if not out or out[-1].segment != segment:
                out.append(Segment(segment, steps[i], i))
        return out

    @property
    def resumes(self) -> list[int]:
        """The steps at which the run was resumed (the first step of each later segment)."""
        return [s.first_step for s in self.segments[1:]]

    def seq_gaps(self) -> int:
        """Snapshots missing from the ``seq`` numbering (dropped ones).

        Superseded records count as present: a resume leaves a gap in the kept records'
        ``seq`` that is not a loss.
        """
        seqs = sorted(r.seq for r in (*self.records, *self.superseded))
        return sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False) if b > a + 1)

    @property
    def worker_restarts(self) -> int:
        """How often the collector's worker was restarted: summary.json's count, else the
        largest ``restarts`` a record carries (a run that has not stopped has no summary)."""
        counted = (self.summary or {}).get("worker_restarts")
        if isinstance(counted, int) and not isinstance(counted, bool):
            return counted
        return max((r.restarts or 0 for r in self.records), default=0)

    def records_after_restart(self) -> int:
        """How many records were written by a restarted worker (``restarts`` > 0)."""
        return sum(1 for r in self.records if (r.restarts or 0) > 0)

    @property
    def name(self) -> str:
        base = self.path.name or str(self.path)
        return f"{base}[rank {self.rank}]" if self.rank is not None else base

    @property
    def config(self) -> dict[str, Any]:
        """The TelemetryConfig the run was started with, as a dict ({} if run.json is missing)."""
        config = (self.meta or {}).get("config")
        return config if isinstance(config, dict) else {}

    @property
    def groups(self) -> list[str]:
        """The param-group names, in optimizer order.

        From run.json when present (its order is the optimizer's), else from the per-group
        families' keys; ``learning_rates`` is the last resort because it holds every group
        twice (``group_<i>`` and the name), so it must not be read as the group list.
        """
        stamp = (id(self.meta), len(self.records))
        if self._groups is None or self._groups[0] != stamp:
            self._groups = (stamp, self._find_groups())
        return self._groups[1]

    def _find_groups(self) -> list[str]:
        declared = (self.meta or {}).get("groups")
        if isinstance(declared, dict) and declared:
            return [str(name) for name in declared]
        seen: dict[str, None] = {}
        for record in self.records:
            for family in GROUP_FAMILIES:
                seen.update((k, None) for k in family_values(record, family) or () if k != OVERALL)
        if seen:
            return list(seen)
        for record in self.records:
            if lrs := record.learning_rates:
                named = [k for k in lrs if not _GROUP_INDEX.match(k)]
                return named or list(lrs)
        return []

    @property
    def steps(self) -> list[int]:
        """A step per record that never goes back: the record's ``step`` as the collector wrote it.

        Records written before the collector wrote ``step`` get one reconstructed: where
        ``batch_idx`` drops (a loop that restarts it each epoch), the steps go on from the
        previous epoch's largest recorded ``batch_idx`` (undercounting an epoch by the fewer
        than ``collect_every_n`` steps after its last collection).
        """
        if self._steps is None or len(self._steps) != len(self.records):
            done = list(self._steps or [])[: len(self.records)]
            offset, epoch_max = self._step_state if done else (0, 0)
            for i in range(len(done), len(self.records)):
                raw = self._raw_step(i)
                if i and raw < self._raw_step(i - 1):
                    offset += epoch_max
                    epoch_max = 0
                epoch_max = max(epoch_max, raw)
                done.append(offset + raw)
            self._steps, self._step_state = done, (offset, epoch_max)
        return self._steps

    def _raw_step(self, index: int) -> int:
        record = self.records[index]
        written = _written_step(record)
        return written if written is not None else record.batch_idx

    def step(self, index: int) -> int:
        """The (monotonic) step of record ``index``; see :attr:`steps`."""
        return self.steps[index]

    def index_of(self, step: int) -> int | None:
        """The index of the record at ``step`` (the first one, if several)."""
        steps = self.steps
        lo, hi = 0, len(steps)
        while lo < hi:  # steps never decrease: bisect
            mid = (lo + hi) // 2
            if steps[mid] < step:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(steps) and steps[lo] == step else None

    @property
    def restarts_each_epoch(self) -> bool:
        """Whether ``batch_idx`` restarts each epoch (so steps and batch_idx differ)."""
        return any(r.batch_idx != s for r, s in zip(self.records, self.steps, strict=True))

    def value(self, record: TypedRecord, family: KeyedFamily, key: str) -> float | None:
        """``record``'s ``family.key`` as a float, None when absent or null."""
        values = family_values(record, family)
        return as_float(values.get(key)) if values is not None else None

    def learning_rate(self, record: TypedRecord, group: str) -> float | None:
        """The LR of ``group`` in ``record``, by name, else by its ``group_<i>`` index key."""
        lrs = record.learning_rates or _NO_VALUES
        if group in lrs:
            return lrs[group]
        if group in self.groups:
            return lrs.get(f"group_{self.groups.index(group)}")
        return None

    def series(self, family: KeyedFamily, key: str, *, finite: bool = False) -> list[tuple[int, float]]:
        """(step, value) for each record holding a number at ``family.key``."""
        return self.points(lambda record: self.value(record, family, key), finite=finite)

    def points(self, read: Reader, *, finite: bool = False) -> list[tuple[int, float]]:
        """(step, ``read(record)``) for each record where it is a number (e.g. :func:`train_loss`)."""
        out: list[tuple[int, float]] = []
        for i, record in enumerate(self.records):
            v = read(record)
            if v is not None and (not finite or math.isfinite(v)):
                out.append((self.step(i), v))
        return out

    def lr_series(self, group: str) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        for i, record in enumerate(self.records):
            v = self.learning_rate(record, group)
            if v is not None:
                out.append((self.step(i), v))
        return out

    def metric_keys(self) -> list[str]:
        """Record keys without a section of their own whose value is a dict: one per extra metric.

        ``layers``, ``activations``, ``model_mode`` and any user metric's key, in the order
        they first appear.
        """
        seen: dict[str, None] = {}
        for record in self.records:
            # Every such key holds a dict: layers, activations, model_mode, or a metric's.
            seen.update((k, None) for k in record if k not in SECTION_KEYS)
        return list(seen)

    def leaf_series(self, key: str) -> dict[str, list[tuple[int, float]]]:
        """{leaf path under ``key``: [(step, value)...]} for every number in ``record[key]``.

        Nested dicts give dotted paths (``gradient_norm.fc1`` under ``layers``), in the
        order they first appear.
        """
        out: dict[str, list[tuple[int, float]]] = {}
        for i, record in enumerate(self.records):
            if key in record:
                for path, value in numeric_leaves(record[key]):
                    out.setdefault(path, []).append((self.step(i), value))
        return out

    def holdout(self) -> list[tuple[int, TypedRecord, HoldoutLogits]]:
        """(step, record, holdout_logits) for each record with a holdout evaluation."""
        return [
            (self.step(i), record, record.holdout_logits)
            for i, record in enumerate(self.records)
            if record.holdout_logits
        ]

    def costs(self) -> list[tuple[int, TelemetryCost]]:
        """(step, telemetry) for each record that says what collecting it cost."""
        return [(self.step(i), r.telemetry) for i, r in enumerate(self.records) if r.telemetry]

    def _label_pattern(self, stats: Mapping[str, float | None]) -> re.Pattern[str]:
        """``<label>_<class>_pct`` for the config's label_key when the record's keys use it,
        else any ``<key>_<class>_pct`` (the label name of a batch format found at start(),
        e.g. "labels" for Hugging Face batches, differs from the default label_key)."""
        label_key = self.config.get("label_key")
        if isinstance(label_key, str):
            own = re.compile(rf"^{re.escape(label_key)}_(.+)_pct$")
            if any(own.match(k) for k in stats):
                return own
        return _ANY_CLASS_KEY

    def batch_label(self) -> str | None:
        """The label name the batch stats are keyed by (``<label>_<class>_pct``), else the
        config's label_key, else None."""
        for record in self.records:
            if stats := record.batch_stats:
                pattern = self._label_pattern(stats)
                for key in stats:
                    if match := pattern.match(key):
                        return key[: match.start(1) - 1]
        label_key = self.config.get("label_key")
        return str(label_key) if label_key is not None else None

    def batch_classes(self) -> list[tuple[int, dict[str, float], float | None]]:
        """(step, {class: pct of the batch}, batch_size) for each record with batch stats.

        The class keys are ``<label_key>_<class>_pct`` (see :meth:`_label_pattern`). Records
        of the many-class layout (:meth:`token_batches`) are left out: their shares are the
        top few labels only, not the batch's class balance.
        """
        out = []
        for i, record in enumerate(self.records):
            stats = record.batch_stats
            if not stats or "distinct_labels" in stats:
                continue
            pattern = self._label_pattern(stats)
            classes = {}
            for key, value in stats.items():
                match = pattern.match(key)
                pct = as_float(value)
                if match and pct is not None and math.isfinite(pct):
                    classes[match.group(1)] = pct
            if classes:
                out.append((self.step(i), classes, as_float(stats.get("batch_size"))))
        return out

    def token_batches(self) -> list[tuple[int, dict[str, float | None], dict[str, float]]]:
        """(step, batch_stats, {label: pct}) for each record of the many-class layout.

        Labels with more than 64 values (token ids) are recorded as ``batch_size``,
        ``tokens``, ``ignored_pct``, ``distinct_labels`` (its presence marks the layout) and
        ``<label>_<id>_pct`` for the batch's 5 most common ids only.
        """
        out = []
        for i, record in enumerate(self.records):
            stats = record.batch_stats
            if not stats or "distinct_labels" not in stats:
                continue
            pattern = self._label_pattern(stats)
            top = {
                match.group(1): pct
                for key, value in stats.items()
                if (match := pattern.match(key)) and (pct := as_float(value)) is not None
                and math.isfinite(pct)
            }
            out.append((self.step(i), stats, top))
        return out

    def gradient_norm_source(self, key: str = OVERALL) -> str:
        """Where ``key``'s gradient norms before clipping come from: one of :data:`GRADIENT_SOURCES`.

        Clipping bounds the applied norm (``gradient_norm``) at max_norm, which hides the
        spikes and growth the gradient diagnoses look for: the pre-clip norms are read
        whenever the run recorded them.
        """
        if any(self.value(r, PRE_CLIP, key) is not None for r in self.records):
            return PRE_CLIP
        if any(self.value(r, "gradient_clipping", "pre_clip_norm") is not None for r in self.records):
            return GRADIENT_SOURCES[1]
        return "gradient_norm"

    def pre_clip_norm(self, record: TypedRecord, key: str) -> float | None:
        """``key``'s gradient norm before clipping in ``record``; None when it was not recorded.

        From ``gradient_norm_pre_clip``, else from ``gradient_clipping``: its ``pre_clip_norm``
        is the overall norm, and a group's is its applied norm scaled back up by
        ``pre_clip_norm / gradient_norm.overall`` (clip_grad_norm_ scales every gradient by
        that one factor) when the step was clipped.
        """
        if record.gradient_norm_pre_clip is not UNSET:
            return self.value(record, PRE_CLIP, key)
        total = self.value(record, "gradient_clipping", "pre_clip_norm")
        if total is None:
            return None
        if key == OVERALL:
            return total
        applied = self.value(record, "gradient_norm", key)
        applied_total = self.value(record, "gradient_norm", OVERALL)
        max_norm = self.value(record, "gradient_clipping", "max_norm")
        clipped = max_norm is None or total > max_norm
        if (
            applied is None
            or not clipped
            or not math.isfinite(total)
            or applied_total is None
            or not math.isfinite(applied_total)
            or applied_total <= 0
        ):
            return applied
        return applied * total / applied_total

    def gradient_norm_series(self, key: str, *, finite: bool = False) -> list[tuple[int, float]]:
        """(step, gradient norm of ``key`` before clipping) per record: see :meth:`gradient_norm_source`.

        A record without clipping data (in a run that has some) contributes its applied norm.
        """
        if self.gradient_norm_source(key) == "gradient_norm":
            return self.series("gradient_norm", key, finite=finite)
        out: list[tuple[int, float]] = []
        for i, record in enumerate(self.records):
            clipping = (
                record.gradient_norm_pre_clip is not UNSET or record.gradient_clipping is not UNSET
            )
            v = (
                self.pre_clip_norm(record, key)
                if clipping
                else self.value(record, "gradient_norm", key)
            )
            if v is not None and (not finite or math.isfinite(v)):
                out.append((self.step(i), v))
        return out

    def clip_max_norm(self) -> float | None:
        """The largest ``gradient_clipping.max_norm`` the run recorded, None if none."""
        values = [
            v
            for r in self.records
            if (v := self.value(r, "gradient_clipping", "max_norm")) is not None
            and math.isfinite(v)
        ]
        return max(values) if values else None

    def median_lrs(self) -> dict[str, float]:
        """Each group's median finite LR over the run (groups without LRs left out)."""
        out = {}
        for group in self.groups:
            values = [v for _, v in self.lr_series(group) if math.isfinite(v)]
            if values:
                out[group] = statistics.median(values)
        return out

    def class_shares(self, extra_classes: Iterable[str] = ()) -> dict[str, float]:
        """Each class's share (0..1) of all samples in the recorded batches, pooled by batch size.

        ``extra_classes`` (e.g. the holdout's labels) are included with share 0 if no batch
        held them.
        """
        batches = self.batch_classes()
        classes = {c for _, cs, _ in batches for c in cs} | set(extra_classes)
        weights = [bs if bs and bs > 0 else 1.0 for _, _, bs in batches]
        total = sum(weights) or 1.0
        return {
            c: sum(cs.get(c, 0.0) * w for (_, cs, _), w in zip(batches, weights, strict=True))
            / 100
            / total
            for c in sorted(classes, key=class_sort_key)
        }

    def torn_tail(self) -> bool:
        """Whether the records file ends in a partial line (a crash mid-write)."""
        file = self.records_file
        if file is None:
            return False
        try:
            with open(file, "rb") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except OSError:
            return False


def class_sort_key(name: str) -> tuple[int, int, str]:
    """Sort class names numerically when they are integers ("2" before "10"), else by text."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def holdout_accuracy(holdout: HoldoutLogits) -> float | None:
    """A holdout evaluation's accuracy: the recorded one, else from predictions and labels."""
    if holdout.accuracy is not None:
        return holdout.accuracy
    preds, labels = holdout.predictions, holdout.labels
    if preds and labels and len(preds) == len(labels):
        return sum(p == t for p, t in zip(preds, labels, strict=True)) / len(labels)
    return None


def holdout_is_sequence(holdout: HoldoutLogits) -> bool:
    """Whether a holdout evaluation is of sequence labels (tokens): per-token loss and
    accuracy, perplexity and per-sequence values, no per-example logits or predictions."""
    sequence_only = (
        holdout.perplexity, holdout.tokens, holdout.example_loss, holdout.example_accuracy,
        holdout.scored,
    )
    return any(value is not None and value is not UNSET for value in sequence_only)


def holdout_perplexity(holdout: HoldoutLogits) -> float | None:
    """A sequence holdout's perplexity: the recorded one, else exp of its per-token loss."""
    if holdout.perplexity is not None and holdout.perplexity is not UNSET:
        return holdout.perplexity
    loss = holdout.loss
    if loss is None or not holdout_is_sequence(holdout):
        return None
    return math.exp(loss) if loss < _MAX_EXP else math.inf


def holdout_class_count(holdout: HoldoutLogits) -> int:
    """How many classes the holdout's model distinguishes: logit width, else labels seen (>= 2)."""
    logits = holdout.logits or []
    # The schema types logits as list[Any]: a list of class scores per example, or one score
    # (a single-output model); only a list gives the class count.
    first = logits[0] if logits else None
    width = len(first) if isinstance(first, list) and len(first) > 1 else 2
    classes = {*(holdout.labels or []), *(holdout.predictions or [])}
    return max(width, len(classes), 2)


def holdout_chance(holdout: HoldoutLogits) -> tuple[float, int]:
    """(chance accuracy, holdout size): the better of 1/classes and always guessing the majority."""
    labels = holdout.labels or []
    k = holdout_class_count(holdout)
    if not labels:
        return 1.0 / k, 0
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    return max(1.0 / k, majority), len(labels)


def records_file_of(path: Path, rank: int | None = None) -> Path:
    """The records file ``watch`` and ``mirror`` follow: ``path`` itself if a file; in a run
    directory rank ``rank``'s, else the plain one, else the first rank's (it may not exist yet)."""
    if path.is_file():
        return path
    if rank is not None:
        return path / f"telemetry.rank{rank}.jsonl"
    found = find_record_files(path) if path.is_dir() else []
    return found[0][1] if found else path / RECORDS_FILE


def find_record_files(directory: Path) -> list[tuple[int | None, Path]]:
    """(rank, file) for the records files of a run directory: the plain one, else per rank."""
    plain = directory / RECORDS_FILE
    if plain.is_file():
        return [(None, plain)]
    ranked: list[tuple[int | None, Path]] = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _RANK_FILE.match(entry.name)
        if match:
            ranked.append((int(match.group(1)), entry))
    return sorted(ranked, key=lambda item: item[0] if item[0] is not None else -1)


def _sidecar(directory: Path, base: str, rank: int | None) -> dict[str, Any] | None:
    # Per-rank runs may write run.rank<r>.json; fall back to the shared file.
    if rank is not None:
        stem, ext = os.path.splitext(base)
        ranked = read_json(directory / f"{stem}.rank{rank}{ext}")
        if ranked is not None:
            return ranked
    return read_json(directory / base)


def _read(directory: Path, file: Path | None, rank: int | None) -> Run:
    records = read_typed_records(file) if file is not None and file.exists() else []
    return Run(
        path=directory,
        records=records,
        meta=_sidecar(directory, RUN_FILE, rank),
        summary=_sidecar(directory, SUMMARY_FILE, rank),
        rank=rank,
        records_file=file,
    )


def load_runs(path: str | os.PathLike[str], *, allow_empty: bool = False) -> list[Run]:
    """Every run in ``path``: a run directory (one Run, or one per rank) or a ``.jsonl`` file.

    ``allow_empty`` accepts a directory that has no records file yet (a run just started),
    returning one Run with no records; otherwise that raises :class:`RunNotFoundError`.
    """
    path = Path(path)
    if path.is_file():
        match = _RANK_FILE.match(path.name)
        rank = int(match.group(1)) if match else None
        return [_read(path.parent, path, rank)]
    if not path.is_dir():
        raise RunNotFoundError(f"{path}: no such run directory or records file")
    files = find_record_files(path)
    if not files:
        if allow_empty:
            return [_read(path, path / RECORDS_FILE, None)]
        raise RunNotFoundError(
            f"{path}: no {RECORDS_FILE} (or telemetry.rank<r>.jsonl) here: "
            "is this a run directory written by train-telemetry?"
        )
    return [_read(path, file, rank) for rank, file in files]


def load_run(path: str | os.PathLike[str], *, rank: int | None = None) -> Run:
    """One run: the only one in ``path``, or the given ``rank`` of a per-rank run."""
    runs = load_runs(path)
    if rank is None:
        if len(runs) > 1:
            ranks = ", ".join(str(r.rank) for r in runs)
            raise RunNotFoundError(
                f"{path}: holds one records file per rank ({ranks}): pick one with rank="
            )
        return runs[0]
    for run in runs:
        if run.rank == rank or (run.rank is None and rank == 0):
            return run
    ranks = ", ".join(str(r.rank if r.rank is not None else 0) for r in runs)
    raise RunNotFoundError(f"{path}: no records for rank {rank} (ranks present: {ranks})")
