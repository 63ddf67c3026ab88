"""The run directory: its checks at start, its file names per rank, run.json and summary.json.

Runs in: the training process (at ``start()`` and ``stop()``, never in the hook).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import torch

from .config import TelemetryConfigError
from .records import (
    CHECKPOINT_FILE,
    RECORDS_FILE,
    RUN_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    read_json,
    to_strict_json_value,
)
from .writer import last_record

# The config keys that decide what a record holds: a resumed run must agree on them, or its
# records would not read as one run. (Speed and fault settings may change between segments.)
RECORDED_KEYS = ("track_gradients", "track_weight_delta", "track_learning_rates", "track_holdout_logits",
                 "track_batch_stats", "holdout_size", "input_keys", "label_key", "track_layers",
                 "track_activations", "track_model_mode", "layer_depth")


@dataclass
class Resume:
    """What an output_dir already holds: the next segment, the first seq, the segments so far."""

    segment: int = 0
    first_seq: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)
    previous: dict[str, Any] | None = None  # the earlier run.json
    clock: StepClock = field(default_factory=lambda: StepClock())  # the step goes on from the last record


class StepClock:
    """The records' ``step``: ``batch_idx`` plus an offset that grows where ``batch_idx`` goes back.

    Within one ``start()`` a ``batch_idx`` lower than the previous call's is a new epoch: the
    offset grows by the previous call's ``batch_idx`` + 1, so a loop that restarts it each
    epoch gets consecutive steps and one that passes a global counter gets ``step ==
    batch_idx``. A resumed run (``start()`` into a directory with records) starts from the
    last record's offset; there the first drop is read with the epoch: a later epoch is a new
    epoch (counted on from the last *recorded* ``batch_idx``: fewer than ``collect_every_n``
    steps may go uncounted), the same or an earlier one is the script repeating steps from
    its checkpoint, which get their step numbers again. The hook pays one comparison a call.
    """

    __slots__ = ("offset", "last_batch", "resumed_epoch")

    def __init__(self, offset: int = 0, last_batch: int = -1, resumed_epoch: int | None = None) -> None:
        self.offset, self.last_batch, self.resumed_epoch = offset, last_batch, resumed_epoch

    def went_back(self, epoch: int) -> None:
        """``batch_idx`` went below ``last_batch`` at ``epoch`` (the hook then sets ``last_batch``)."""
        resumed, self.resumed_epoch = self.resumed_epoch, None
        if resumed is None or epoch > resumed:
            self.offset += self.last_batch + 1


class RunDir:
    """``output_dir`` of one process: with ``per_rank`` each rank's files carry its rank."""

    def __init__(self, path: Path, rank: int, world_size: int, per_rank: bool) -> None:
        self.path = path
        self.rank = rank
        self.suffix = per_rank and world_size > 1

    def file(self, name: str) -> Path:
        """``name``, or with per_rank under DDP ``<stem>.rank<r>.<ext>`` (telemetry.rank1.jsonl)."""
        if self.suffix:
            stem, _, ext = name.partition(".")
            name = f"{stem}.rank{self.rank}.{ext}"
        return self.path / name

    @property
    def records(self) -> Path:
        return self.file(RECORDS_FILE)

    @property
    def checkpoint(self) -> Path:
        return self.file(CHECKPOINT_FILE)

    def begin(self, overwrite: bool, config: Mapping[str, Any], model: Sequence[Any] | None) -> Resume:
        """At start(): the directory, made and proven writable; what it holds already (the
        segment this start() begins), checked to be this run; no stale delta reference."""
        self.check_writable()
        resume = self.resume(overwrite)
        self.check_same_run(resume, config, model)
        for stale in (self.checkpoint, self.checkpoint.with_name(self.checkpoint.name + ".ok")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # a stale reference would fake a delta
        return resume

    def check_writable(self) -> None:
        """Create the directory and its parents (as the seed, TensorBoard's writer and wandb do)
        and prove it writable, or raise with the fix."""
        out = self.path
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TelemetryConfigError(
                f"output_dir {str(out)!r} is not writable ({exc.strerror}): choose a directory you can write to"
            ) from None

    def resume(self, overwrite: bool) -> Resume:
        """The segment this start() begins: 0 in a fresh directory, else one more than the last.

        ``overwrite``: remove what an earlier run left (records, run.json, summary.json) first.
        """
        records = self.records
        if overwrite:
            for name in (RECORDS_FILE, RUN_FILE, SUMMARY_FILE):
                with contextlib.suppress(FileNotFoundError):
                    self.file(name).unlink()
            return Resume()
        last = last_record(records)
        if last is None:
            return Resume()
        seq, batch_idx, step = last["seq"], int(last.get("batch_idx", 0)), last.get("step")
        clock = StepClock(step - batch_idx if isinstance(step, int) else 0, batch_idx, int(last.get("epoch", 0)))
        previous = read_json(self.file(RUN_FILE)) or {}
        segment = int(previous.get("segment", 0)) + 1
        segments = list(previous.get("segments") or [{"segment": 0, "started": previous.get("started"), "first_seq": 0}])
        return Resume(segment=segment, first_seq=seq + 1, segments=segments, previous=previous, clock=clock)

    def check_same_run(self, resume: Resume, config: Mapping[str, Any], model: Sequence[Any] | None) -> None:
        """Refuse to append records of another model or another kind of record to this run."""
        previous = resume.previous
        if not previous:
            return
        fix = (f"output_dir {str(self.path)!r} holds records of another run: start this one in a fresh "
               "directory (a new output_dir), or set overwrite: true to replace them")
        before_model = previous.get("model")
        if model is not None and before_model is not None and [list(m) for m in before_model] != [list(m) for m in model]:
            changed = next((f"{a[0]} {a[2]}{a[1]} -> {b[0]} {b[2]}{b[1]}"
                            for a, b in zip(before_model, model, strict=False) if list(a) != list(b)),
                           f"{len(before_model)} -> {len(model)} tensors")
            raise TelemetryConfigError(f"{fix} (the model differs: {changed})")
        before = previous.get("config") or {}
        for key in RECORDED_KEYS:
            if key in before and before[key] != config.get(key):
                raise TelemetryConfigError(f"{fix} ({key} was {before[key]!r}, now {config.get(key)!r})")

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        base = {
            "schema": SCHEMA_VERSION,
            "started": datetime.now(timezone.utc).astimezone().isoformat(),
            "pid": os.getpid(),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
            "host": socket.gethostname(),
        }
        write_json_atomic(self.file(RUN_FILE), {**base, **info})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.file(SUMMARY_FILE), summary)


def run_info(*, config: Mapping[str, Any], resume: Resume, model: list[list[Any]] | None, metrics: list[str],
             groups: Mapping[str, Any], num_params: int | None, slot_bytes: int | None, slot_meta_bytes: int | None,
             worker_pid: int | None, mode: str, mode_reason: str, rank: int, world_size: int,
             global_batch_stats: bool) -> dict[str, Any]:
    """run.json's contents (``RunDir.write_run_info`` adds the schema, the time, pid and host)."""
    segments = [*resume.segments, {"segment": resume.segment, "started": datetime.now(timezone.utc).astimezone().isoformat(),
                                   "first_seq": resume.first_seq}]
    return {
        "config": dict(config),
        "segment": resume.segment,
        "segments": segments,
        "model": model,  # [name, shape, dtype] per tensor (snapshot.Layout.signature)
        "metrics": metrics,
        "groups": dict(groups),
        "num_params": num_params,
        "slot_bytes": slot_bytes,  # weights and buffers, per slot
        "slot_meta_bytes": slot_meta_bytes,  # ... plus this per slot: grad norms, loss, the batch's labels and outputs
        "worker_pid": worker_pid,
        "mode": mode,  # where records are built (mode: auto resolved) ...
        "mode_reason": mode_reason,  # ... and why
        "rank": rank,
        "world_size": world_size,
        "global_batch_stats": global_batch_stats,
        "torch_version": str(torch.__version__),
    }


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_bytes(msgspec.json.format(msgspec.json.encode(to_strict_json_value(dict(data)))) + b"\n")
    os.replace(tmp_path, path)
