"""The on-disk format: one JSON object per line in ``telemetry.jsonl``, its encoder and reader.

Runs in: the worker process (encoding), and anywhere records are read (no torch needed).

Every line of ``telemetry.jsonl`` is one collection, so the seed's analysis example
(``m['gradient_norm']['overall']`` for each line) works unchanged. Keys of a record
(``<group>`` is a param group's ``name`` entry, else ``group_<i>``):

==================  ==========================================================================
``schema``          format version (:data:`SCHEMA_VERSION`)
``batch_idx``       the step counter the hook was called with; ``epoch`` likewise
``seq``             0, 1, 2, ... per collection taken (gaps = dropped snapshots)
``timestamp``       ISO-8601 wall time at the hook (``time`` is the same as Unix seconds)
``rank``            ``rank`` and ``world_size`` of torch.distributed (0 and 1 otherwise)
``gradient_norm``   {overall, <group>...}: L2 norm of the gradients; null for a group with no grads
``weight_delta``    {overall, <group>...}: L2 distance of the weights from the previous
                    collection (the disk checkpoint); the first record measures from the
                    weights at start(), or is all null when start() was given no model
``weight_norm``     {overall, <group>...}: L2 norm of the weights at the hook
``update_ratio``    {overall, <group>...}: weight_delta / weight norm at the previous collection
``learning_rates``  {group_0.., <name>...}: the LR of each param group at the hook
``holdout_logits``  {logits, labels, predictions, accuracy, loss}: eval-mode forward of the
                    model at the hook (the snapshot's weights) on the fixed holdout
``batch_stats``     {<label_key>_<class>_pct..., batch_size}
``train``           {loss, accuracy}: from the hook's optional ``loss`` / ``outputs``
``telemetry``       {hook_ms, dropped_before, dropped_total, worker_lag_ms}: what collecting cost
``nonfinite``       list of "family.key" whose value is NaN or +-Inf (absent when none)
``errors``          list of {where, type, message} for metrics that failed (absent when none)
==================  ==========================================================================

A metric turned off by its ``track_*`` key is absent. NaN and +-Inf are written as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so that every line is strict JSON
(``json.loads`` parses it); :func:`read_records` turns them back into floats.

Besides ``telemetry.jsonl`` a run directory holds ``run.json`` (written at start: config,
groups, parameter counts, versions) and ``summary.json`` (written by ``stop()``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "SCHEMA_VERSION",
    "RECORDS_FILE",
    "RUN_FILE",
    "SUMMARY_FILE",
    "CHECKPOINT_FILE",
    "encode_record",
    "decode_record",
    "read_records",
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


def encode_record(record: dict[str, Any]) -> bytes:
    """One whole JSON line (with its newline) for ``record``; non-finite floats as strings."""
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


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a run (a run directory or a ``.jsonl`` file) as plain dicts.

    NaN and +-Inf come back as floats. A torn last line (a crash mid-write) is skipped; a
    corrupt line elsewhere is skipped with a warning naming its line number.
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
    torn = lines.pop()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_restore_nonfinite(_decoder.decode(line)))
        except msgspec.DecodeError:
            warnings.warn(f"{file}:{number}: skipped a corrupt line", stacklevel=2)
    if torn.strip():
        # A last line that lacks only its newline is whole; one torn by a crash mid-write
        # is skipped here and truncated when the run restarts (RecordWriter).
        with contextlib.suppress(msgspec.DecodeError):
            records.append(_restore_nonfinite(_decoder.decode(torn)))
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
