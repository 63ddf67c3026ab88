"""The on-disk format: one JSON object per line in ``telemetry.jsonl``, its encoder and reader.

Runs in: the worker process (encoding), and anywhere records are read (no torch needed).

Every line of ``telemetry.jsonl`` is one collection, so the seed's analysis example
(``m['gradient_norm']['overall']`` for each line) works unchanged. What each key holds is
README.md's "What is recorded" table; a unit test keeps that table and :class:`Record`'s
fields equal (tests/unit/test_readme_records.py).

:class:`Record` types every core key once; :func:`validate_record` checks a record against
it and the "any other key" rule, naming the bad key path; :func:`nonfinite_keys` is the
NaN scan the collector writes as ``nonfinite``. Analysis shows any metric's key without
code of its own for it.

Reading has two forms. :func:`read_records` gives plain dicts (users' scripts rely on
that). :func:`read_typed_records` / :func:`decode_typed_record` give :class:`TypedRecord`:
the core keys typed by :class:`Record` (it is a subclass: the same fields), every other key
in ``metrics``; a record that does not match the schema is skipped with a warning naming its
line and the key path. Analysis reads only typed records, so nothing there re-checks a
type this module fixes.

A metric turned off by its ``track_*`` key is absent. NaN and +-Inf are written as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so that every line is strict JSON
(``json.loads`` parses it); :func:`read_records` turns them back into floats.

Besides ``telemetry.jsonl`` a run directory holds ``run.json`` (written at start: config,
groups, parameter counts, versions) and ``summary.json`` (written by ``stop()``).
"""

from __future__ import annotations

import math
import os
import re
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "BOOKKEEPING_KEYS",
    "CORE_KEYS",
    "GROUP_FAMILIES",
    "NOT_SCALARS",
    "OVERALL",
    "ErrorEntry",
    "HoldoutLogits",
    "NonfiniteOrigin",
    "ReplicaCheck",
    "NonfiniteTensor",
    "Record",
    "RecordError",
    "TelemetryCost",
    "TrainMetrics",
    "TypedRecord",
    "error_entry",
    "typed_record",
    "nonfinite_keys",
    "validate_record",
    "SCHEMA_VERSION",
    "RECORDS_FILE",
    "RUN_FILE",
    "SUMMARY_FILE",
    "CHECKPOINT_FILE",
    "encode_record",
    "decode_record",
    "decode_typed_record",
    "read_records",
    "read_typed_records",
    "read_json",
    "records_path",
    "repair_torn_tail",
    "to_strict_json_value",
]

SCHEMA_VERSION = 1
RECORDS_FILE = "telemetry.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "last_checkpoint.pt"

OVERALL = "overall"
"""The key of the whole-model value in every per-group family."""

GroupFamily = Literal["gradient_norm", "weight_delta", "weight_norm", "update_ratio"]
GROUP_FAMILIES: tuple[GroupFamily, ...] = ("gradient_norm", "weight_delta", "weight_norm", "update_ratio")
"""Families keyed {overall, <group>...}; ``learning_rates`` is per group but has no overall."""

_NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def to_strict_json_value(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its string form (recursively)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return _NONFINITE_OUT[repr(value)]
    if isinstance(value, dict):
        return {k: to_strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json_value(v) for v in value]
    return value


def _restore_nonfinite(value: Any) -> Any:
    if isinstance(value, str):
        return _NONFINITE_IN.get(value, value)
    if isinstance(value, dict):
        return {k: _restore_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nonfinite(v) for v in value]
    return value


def encode_record(record: Mapping[str, Any] | TypedRecord) -> bytes:
    """One whole JSON line (with its newline) for ``record`` (a dict, or a :class:`TypedRecord`:
    its keys in the order built); non-finite floats as strings."""
    if isinstance(record, TypedRecord):
        record = record.to_dict()
    return _encoder.encode(to_strict_json_value(record)) + b"\n"


def decode_record(line: bytes) -> dict[str, Any]:
    """One line of a records file as a dict, non-finite values restored (raises msgspec.DecodeError)."""
    return _restore_nonfinite(_decoder.decode(line))


def records_path(path: str | os.PathLike[str]) -> Path:
    """The records file of a run directory, or ``path`` itself if it is a file."""
    path = Path(path)
    if path.is_dir():
        return path / RECORDS_FILE
    return path


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[str, bytes, bool]]:
    """("file:line", line, torn) for each non-blank line of a run's records file.

    ``torn`` marks a last line without its newline: whole if it decodes, else the partial
    line a crash mid-write leaves (skipped here, truncated when the run restarts: RecordWriter).
    """
    file = records_path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no telemetry records at {file}: is this a run directory written by train-telemetry?"
        ) from None
    lines = data.split(b"\n")
    # A file of whole lines ends with b"\n", so the last element is b"" unless torn.
    last = len(lines)
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield f"{file}:{number}", line, number == last


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a run (a run directory or a ``.jsonl`` file) as plain dicts.

    NaN and +-Inf come back as floats. A torn last line (a crash mid-write) is skipped; a
    corrupt line elsewhere is skipped with a warning naming its line number.
    """
    return _read(path, decode_record)


def read_typed_records(path: str | os.PathLike[str]) -> list[TypedRecord]:
    """All records of a run as :class:`TypedRecord` (see :func:`decode_typed_record`).

    As :func:`read_records`; a record that does not match the schema is skipped too, with a
    warning naming its line and the key path, so that one bad record never stops a report.
    """
    return _read(path, decode_typed_record)


_T = TypeVar("_T")


def _read(path: str | os.PathLike[str], decode: Callable[[bytes], _T]) -> list[_T]:
    records: list[_T] = []
    for where, line, torn in _lines(path):
        try:
            records.append(decode(line))
        except msgspec.DecodeError:
            if not torn:
                warnings.warn(f"{where}: skipped a corrupt line", stacklevel=3)
        except RecordError as exc:
            warnings.warn(f"{where}: skipped a record that does not match the schema: {exc}", stacklevel=3)
    return records


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A ``run.json`` / ``summary.json`` file as a dict, or None if it is missing or torn."""
    try:
        return _restore_nonfinite(_decoder.decode(Path(path).read_bytes()))
    except (OSError, msgspec.DecodeError):
        return None


def repair_torn_tail(path: str | os.PathLike[str]) -> int:
    """Truncate ``path`` after its last newline; return the number of bytes removed."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            # Read backwards in chunks until a newline is found.
            pos = size
            chunk = 65536
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                idx = block.rfind(b"\n")
                if idx >= 0:
                    keep = start + idx + 1
                    break
                pos = start
            else:
                keep = 0
            if keep < size:
                f.truncate(keep)
            return size - keep
    except FileNotFoundError:
        return 0


# -- the schema -----------------------------------------------------------------------
# One definition of what a record holds. Core keys are typed here; any other top-level
# key is a metric's: a dict whose leaves are numbers or null, possibly nested (see
# validate_record). Fields left UNSET are absent from the line.

class ErrorEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One metric that failed at one collection: where, the exception type and message."""

    where: str
    type: str
    message: str


class HoldoutLogits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``holdout_logits``: the eval-mode forward on the fixed holdout.

    One label per example (a classifier): ``logits``, ``labels``, ``predictions`` (one
    entry per example), ``accuracy`` and ``loss``. Sequence labels (tokens ``[B, T]``):
    never ``B x T x V`` logits; ``loss`` and ``accuracy`` per scored token, ``perplexity``
    (exp of that loss), ``tokens`` scored, ``example_loss`` / ``example_accuracy`` per
    holdout sequence (the same examples at every record), and ``scored``: which positions
    were scored ("all"; "shifted": the labels are the inputs and the model predicts the
    next one, as Hugging Face causal LMs do; "last": the model returned only its last
    position). Ignored labels (< 0, e.g. -100 and padding) are never scored.
    """

    accuracy: float | None
    loss: float | None
    logits: list[Any] | UnsetType = UNSET
    labels: list[int] | UnsetType = UNSET
    predictions: list[int] | UnsetType = UNSET
    perplexity: float | None | UnsetType = UNSET
    tokens: int | UnsetType = UNSET
    example_loss: list[float | None] | UnsetType = UNSET
    example_accuracy: list[float | None] | UnsetType = UNSET
    scored: str | UnsetType = UNSET


class TrainMetrics(msgspec.Struct, forbid_unknown_fields=True):
    """``train``: from the hook's optional ``loss`` / ``outputs``."""

    loss: float | None = None
    accuracy: float | None = None


class TelemetryCost(msgspec.Struct, forbid_unknown_fields=True):
    """``telemetry``: what collecting this record cost, and the drops before it."""

    hook_ms: float | None = None
    dropped_before: int = 0
    dropped_total: int = 0
    worker_lag_ms: float | None = None
    built_by: str | None = None  # "worker" (the worker process) or "trainer" (inline: mode sync, or auto)


class NonfiniteTensor(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of ``nonfinite_origin.first``: a tensor whose values are not all finite."""

    kind: Literal["loss", "gradient", "weight"]
    param: str | None  # the parameter's name (null for the loss)
    group: str | None  # its optimizer param group
    layer: str | None  # its module: the name less the last part
    value: Literal["nan", "+inf", "-inf"]  # its norm (the loss itself)


class NonfiniteOrigin(msgspec.Struct, forbid_unknown_fields=True):
    """``nonfinite_origin``: where the record's NaN/Inf came from (provenance.py).

    Written only on a record with ``nonfinite``. The bad step lies in ``(since_step, step]``.
    """

    since_step: int | None  # the last record of this process whose values were all finite
    first: list[NonfiniteTensor]  # the loss, then gradients, then weights, in model order
    gradients: int  # parameters whose gradient is not finite
    weights: int  # parameters whose weight is not finite
    parameters: int
    step_skipped: bool | None  # non-finite gradients on finite weights: the optimizer did not apply them


class ReplicaCheck(msgspec.Struct, forbid_unknown_fields=True):
    """``replicas``: whether the ranks that should hold the same weights do (metrics/replicas.py)."""

    compared: int  # ranks whose weights were compared with their replicas'
    not_compared: int  # ranks that could not give their value (no model, weights on several devices)
    max_rel_spread: float  # the largest (max - min) / median of a group's sums of squares of the weights
    diverged: list[int]  # ranks whose weights differ from their replicas' (both, when two differ)


class Record(msgspec.Struct, omit_defaults=True):
    """The core keys of one line of ``telemetry.jsonl`` (other keys are metrics' dicts)."""

    schema: int
    batch_idx: int
    epoch: int
    seq: int
    timestamp: str
    time: float
    # Never decreases: batch_idx, counted on where it went back (a loop that restarts it each
    # epoch) and across the segments of a resumed run. Absent from records of versions before it.
    step: int | UnsetType = UNSET
    rank: int | UnsetType = UNSET
    world_size: int | UnsetType = UNSET
    reference_batch_idx: int | None | UnsetType = UNSET
    gradient_norm: dict[str, float | None] | UnsetType = UNSET
    weight_delta: dict[str, float | None] | UnsetType = UNSET
    weight_norm: dict[str, float | None] | UnsetType = UNSET
    update_ratio: dict[str, float | None] | UnsetType = UNSET
    learning_rates: dict[str, float | None] | UnsetType = UNSET
    holdout_logits: HoldoutLogits | UnsetType = UNSET
    # Counts (batch_size, tokens, distinct_labels) beside percentages: int stays int.
    batch_stats: dict[str, int | float | None] | UnsetType = UNSET
    train: TrainMetrics | UnsetType = UNSET
    telemetry: TelemetryCost | UnsetType = UNSET
    nonfinite: list[str] | UnsetType = UNSET
    nonfinite_origin: NonfiniteOrigin | UnsetType = UNSET
    errors: list[ErrorEntry] | UnsetType = UNSET
    layers: dict[str, dict[str, float | None]] | UnsetType = UNSET
    activations: dict[str, dict[str, float | str | None]] | UnsetType = UNSET
    # training (0/1) and batchnorm_layers are ints, batchnorm_stat_change a float.
    model_mode: dict[str, int | float | None] | UnsetType = UNSET
    gradient_clipping: dict[str, float | None] | UnsetType = UNSET
    gradient_norm_pre_clip: dict[str, float | None] | UnsetType = UNSET
    replicas: ReplicaCheck | UnsetType = UNSET
    segment: int | UnsetType = UNSET
    restarts: int | UnsetType = UNSET


CORE_KEYS: frozenset[str] = frozenset(Record.__struct_fields__)
"""Every key typed by :class:`Record`; any other top-level key belongs to a metric."""

BOOKKEEPING_KEYS = frozenset(
    {"schema", "batch_idx", "step", "epoch", "seq", "timestamp", "time", "rank", "world_size",
     "reference_batch_idx", "telemetry", "nonfinite", "nonfinite_origin", "errors", "segment", "restarts"}
)
"""Keys that describe the record or the collector, not the model: never scanned for NaN."""
NOT_SCALARS = frozenset({"schema", "batch_idx", "step", "seq", "time", "rank", "world_size", "segment", "restarts"})
"""Keys with numbers that are bookkeeping, not training signals: never a scalar series
(``export --tensorboard``, and the mirrors, which leave out a few more)."""
# The order nonfinite_keys reports the seed's families in (then the rest, in record order).
_SCAN_FIRST = (*GROUP_FAMILIES, "learning_rates", "train", "holdout_logits")


class RecordError(ValueError):
    """A record that does not match the schema; the message names the key path."""


def error_entry(where: str, exc: BaseException) -> dict[str, str]:
    """The ``errors`` entry for ``exc`` raised while computing ``where``."""
    return {"where": where, "type": type(exc).__name__, "message": str(exc)}


def _float_leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) for every non-dict leaf under ``value``; lists are not entered."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _float_leaves(sub, f"{path}.{key}")
    else:
        yield path, value


def nonfinite_keys(record: Mapping[str, Any]) -> list[str]:
    """"family.key[.sub...]" for each NaN / +-Inf float in the record's metric dicts.

    Every dict-valued top-level key is scanned recursively (a user metric's NaN is found
    too); lists (``holdout_logits.logits``) and the bookkeeping keys are not.
    """
    families = [k for k in _SCAN_FIRST if k in record]
    families += [k for k in record if k not in _SCAN_FIRST and k not in BOOKKEEPING_KEYS]
    found: list[str] = []
    for family in families:
        if not isinstance(record[family], Mapping):
            continue
        found += [
            path
            for path, v in _float_leaves(record[family], family)
            if isinstance(v, float) and not math.isfinite(v)
        ]
    return found


def _check_metric_value(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            if not isinstance(key, str):
                raise RecordError(f"{path}: keys must be strings, got {key!r}")
            _check_metric_value(sub, f"{path}.{key}")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RecordError(f"{path}: expected a number, null or a dict of them, got {value!r}")


def _struct_keys(cls: type[msgspec.Struct]) -> frozenset[str]:
    """The fields of ``cls`` whose value is a Struct (``holdout_logits``, ``train``, ``telemetry``)."""
    hints = typing.get_type_hints(cls)
    return frozenset(
        name
        for name in cls.__struct_fields__
        if any(isinstance(t, type) and issubclass(t, msgspec.Struct) for t in typing.get_args(hints[name]))
    )


_STRUCT_KEYS = _struct_keys(Record)
_HINTS = typing.get_type_hints(Record)

Layout = tuple[tuple[str, tuple[str, ...]], ...]
"""A record's keys in the order written, each with its Struct value's keys in that order (else ())."""
# One tuple per distinct layout, shared by every record that has it (a run has a few).
_LAYOUTS: dict[Layout, Layout] = {}
_MAX_LAYOUTS = 1024


class TypedRecord(Record):
    """One record as analysis reads it: :class:`Record`'s typed core keys, the rest in ``metrics``.

    Made by :func:`decode_typed_record`, which checks the whole record first. ``metrics``
    holds every key that is not a core key: a metric's dict whose leaves are numbers or
    null, possibly nested (the "any other key" rule). A subclass rather than a wrapper so
    that analysis reads ``record.gradient_norm``, not ``record.record.gradient_norm``; the
    schema itself stays :class:`Record` alone.

    ``layout`` is the order the keys were written in; :meth:`to_dict` uses it to give back
    the record as :func:`read_records` does (same keys, order and values), which exports
    (one column per flattened key, in the order written) and any code that walks a record
    generically rely on. ``record[key]``, ``record.get(key)``, ``key in record`` and
    iteration read that view, so a script that indexed ``Run.records`` as dicts keeps
    working; analysis itself reads the typed attributes.
    """

    metrics: dict[str, Any] = {}
    layout: Layout = ()

    def keys(self) -> list[str]:
        """The record's top-level keys in the order written."""
        if self.layout:
            return [key for key, _ in self.layout]
        # Not decoded (built in code): the set core keys in schema order, then the metrics.
        return [k for k in Record.__struct_fields__ if getattr(self, k) is not UNSET] + list(self.metrics)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        if key in CORE_KEYS:
            return getattr(self, str(key)) is not UNSET
        return key in self.metrics

    def __getitem__(self, key: str) -> Any:
        """``key``'s value as written (a Struct's value as a plain dict: a copy)."""
        if key not in CORE_KEYS:
            return self.metrics[key]
        value = getattr(self, key)
        if value is UNSET:
            raise KeyError(key)
        if isinstance(value, msgspec.Struct):
            order = next((sub for name, sub in self.layout if name == key), None)
            if order is None:
                return msgspec.to_builtins(value)
            return {name: msgspec.to_builtins(getattr(value, name)) for name in order}
        if isinstance(value, list) and value and isinstance(value[0], msgspec.Struct):
            return msgspec.to_builtins(value)  # errors: each entry in ErrorEntry's field order
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` when the record lacks ``key``."""
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        """The record as :func:`read_records` gives it: the same keys, order and values."""
        return {key: self[key] for key in self.keys()}


def _layout(record: Mapping[str, Any]) -> Layout:
    layout = tuple(
        (key, tuple(value) if key in _STRUCT_KEYS and isinstance(value, Mapping) else ())
        for key, value in record.items()
    )
    shared = _LAYOUTS.get(layout)
    if shared is None:
        if len(_LAYOUTS) < _MAX_LAYOUTS:
            _LAYOUTS[layout] = layout
        return layout
    return shared


_DICT_PATH = re.compile(r"`\$\.(\w+)((?:\[\.\.\.\])+)`")


def _name_dict_keys(message: str, core: Mapping[str, Any]) -> str:
    """``message`` with the keys msgspec writes as ``[...]`` named: ``$.layers.gradient_norm.fc1``."""
    match = _DICT_PATH.search(message)
    if match is None or match.group(1) not in core:
        return message
    family, value = match.group(1), core[match.group(1)]
    (kind,) = (t for t in typing.get_args(_HINTS[family]) if typing.get_origin(t) is dict)
    keys: list[str] = []
    for _ in range(match.group(2).count("[...]")):
        kind = typing.get_args(kind)[1]
        bad = next((k for k, v in value.items() if not _converts(v, kind)), None)
        if bad is None:
            return message
        keys.append(str(bad))
        value = value[bad]
    return message.replace(match.group(0), f"`$.{family}.{'.'.join(keys)}`")


def _converts(value: Any, kind: Any) -> bool:
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def _checked(record: Any) -> TypedRecord:
    """``record`` (a decoded line) as a :class:`TypedRecord`; RecordError naming the key path."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a record is a JSON object, got {type(record).__name__}")
    core = {k: v for k, v in record.items() if k in CORE_KEYS}
    try:
        typed = msgspec.convert(core, TypedRecord)
    except msgspec.ValidationError as exc:
        where = _name_dict_keys(str(exc), core)
        raise RecordError(f"record (batch_idx {record.get('batch_idx')!r}): {where}") from None
    metrics = {k: v for k, v in record.items() if k not in CORE_KEYS}
    for key, value in metrics.items():
        if not isinstance(value, Mapping):
            raise RecordError(f"$.{key}: a metric's value must be a dict, got {value!r}")
        _check_metric_value(value, f"$.{key}")
    typed.metrics = metrics
    typed.layout = _layout(record)
    return typed


def decode_typed_record(data: bytes | str | Mapping[str, Any]) -> TypedRecord:
    """One record (a line of a records file, or a dict) as a :class:`TypedRecord`.

    The NaN/+-Inf markers come back as floats, as in :func:`read_records`. A record written
    by an older version (optional keys absent) decodes with those fields UNSET. Raises
    ``msgspec.DecodeError`` for a line that is not JSON and :class:`RecordError`, naming the
    key path, for a record that does not match the schema.
    """
    raw = _decoder.decode(data) if isinstance(data, (bytes, str)) else data
    return _checked(_restore_nonfinite(raw))


def typed_record(record: Mapping[str, Any]) -> TypedRecord:
    """``record`` (built in code, non-finite values as floats) as a :class:`TypedRecord`,
    keeping its key order; :class:`RecordError` naming the key path if it does not match."""
    return _checked(record)


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise :class:`RecordError` naming the key path if ``record`` does not match the schema.

    Core keys must have their :class:`Record` types; any other key must hold a dict whose
    leaves are numbers or null, possibly nested. The check :func:`decode_typed_record` makes.
    """
    _checked(record)
