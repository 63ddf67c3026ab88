"""The telemetry worker: turns snapshots into records, off the training critical path.

Runs in: the worker process (``worker_loop``), and, for ``mode: sync``, the training
process (``SnapshotProcessor`` alone, called inline).

NOTE [worker lifecycle]
=======================

Data flow (one collection)::

    trainer: on_batch_end                      worker: worker_loop (polls every PUBLISH_POLL_S)
    ---------------------                      -------------------
    slot = channel.acquire()  (none: drop/block)
    norms = _foreach_norm(grads)
    one _foreach_copy_ into the slot: weights,
      buffers, norms, loss, labels, outputs
    write_header(slot): step, LRs, counters
    channel.publish(slot)  ------------------> channel.take_published() -> read_header
      (ring + semaphore: no pipe write,          label counts, batch accuracy (from the slot)
       so no wake-up cost in the hook)           deltas vs last_checkpoint.pt (pread, chunked)
                                                 write slot as the new checkpoint (rename)
                                                 point the eval model at the slot, eval holdout
                                 slot FREE <---- channel.release(slot)
                                                 encode the record, append one whole line

Protocol per role:

* start (trainer): spawn the worker (daemon, so multiprocessing terminates it if our
  atexit hook is skipped); wait for ``Ready`` within ``start_timeout_s``; send ``Setup``
  (pre-pickled, so a pickling error is raised in ``start()``, not lost in a queue
  feeder thread); wait for ``SetupDone``, whose error (e.g. the holdout forward failed)
  ``start()`` raises.
* worker start: ignore SIGINT (Ctrl-C is the trainer's to handle; the trainer's stop()
  decides when we end); SIGTERM sets a flag that ends the loop after the current record;
  ask the kernel to SIGTERM us if the trainer dies (PR_SET_PDEATHSIG; only when started
  from the trainer's main thread, since it fires when the starting *thread* exits), lower
  our CPU priority and thread count so training keeps its cores; repair a torn last line.
* loop: process every published slot in publish order, then ``get(timeout=PUBLISH_POLL_S)``
  on the control queue (``Setup``, ``Groups``, ``Stop``); every POLL_S check that the
  trainer still lives (``os.getppid()`` changed means it died: flush, exit). Each
  snapshot is processed in a try/except per metric, so one failing metric costs that
  field, not the record; an error that escapes anyway costs that record and is counted.
* groups: a snapshot names the version of the param -> group map it was taken under; a
  new map is put on the queue before the first snapshot naming it is published, and the
  worker reads the queue until it has it.
* stop (trainer): send ``Stop`` after the last publish; the worker drains every published
  slot before it answers ``Done``; the trainer waits for ``Done`` and the exit until the
  deadline; then SIGTERM, then SIGKILL; never waits without a timeout.
* trainer death (SIGKILL, OOM): the worker notices within POLL_S (or at once through
  PDEATHSIG), writes nothing more from slots (the trainer may have died mid-copy) and
  exits; the records already written are whole lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import sys
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .config import TelemetryConfig
from .messages import (
    ALL_MISSING,
    IN_AUX,
    IN_EXTRA,
    IN_SLOT,
    Done,
    Groups,
    Ready,
    Setup,
    SetupDone,
    Snapshot,
    Stop,
    read_header,
)
from .records import SCHEMA_VERSION, encode_record, repair_torn_tail
from .snapshot import Channel, aux_view, bind_model, meta_views

POLL_S = 0.5  # how often an idle worker checks that the trainer is alive
# How often the worker looks for published slots. Publishing never wakes us (that would
# cost the trainer a wake-up in its hook), so this bounds a snapshot's wait before its
# record is started; 100 checks a second cost ~0.3% of a core.
PUBLISH_POLL_S = 0.01
GROUPS_WAIT_S = 10.0  # a snapshot names a group map not received yet: wait this long for it
_MAX_LOGGED_ERRORS = 20


class RecordWriter:
    """Appends whole lines to the records file; an I/O error costs records, never a crash.

    After a failed write the file is truncated back to its last whole line, so a reader
    never sees half a record, and the next record tries again (ENOSPC may clear).
    """

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path = path
        self.fsync_enabled = fsync
        self.records_written = 0
        self.io_errors = 0
        self.records_lost = 0
        self.problems: dict[str, str] = {}  # "write"/"fsync" -> the latest such I/O error, for the summary
        self.repaired_bytes = repair_torn_tail(path)
        if self.repaired_bytes:
            _log_once("repair", f"removed a torn last line ({self.repaired_bytes} bytes) from {path}, "
                      "left by a crash mid-write; appending after the last whole record")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.good_offset = os.fstat(self.fd).st_size

    def write(self, line: bytes) -> bool:
        try:
            view = memoryview(line)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.io_errors += 1
            self.records_lost += 1
            self.problems["write"] = f"{self.records_lost} record(s) could not be written to {self.path}: {exc}"
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.good_offset)
            _log_once(f"io:{exc.errno}", f"could not write a record to {self.path}: {exc}; "
                      "records are counted as lost until writes succeed again")
            return False
        self.good_offset += len(line)
        self.records_written += 1
        return True

    def close(self) -> None:
        if self.fsync_enabled:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self.io_errors += 1
                self.problems["fsync"] = f"fsync of {self.path} failed: {exc}"
                _log_once("fsync", self.problems["fsync"])
        os.close(self.fd)


_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    """Print a worker warning to stderr once per key, so a repeated failure cannot flood."""
    if key in _logged:
        return
    _logged.add(key)
    print(f"train-telemetry worker (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


class SnapshotProcessor:
    """Builds and writes the record of each snapshot: the work of the worker.

    Used by the worker process, and inline by ``mode: sync`` (same code, same records).
    """

    def __init__(self, config: TelemetryConfig, run_dir: Path, setup: Setup, writer: RecordWriter) -> None:
        self.config = config
        self.run_dir = run_dir
        self.setup = setup
        self.writer = writer
        self.checkpoint = run_dir / setup.checkpoint_name
        self.groups: dict[int, Groups] = {setup.groups.version: setup.groups}
        self.norms, self.scalars, self.counts, self.aux = meta_views(
            setup.meta, setup.meta_offsets, max(setup.num_params, 1))
        self._aux_views: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._ref_norms: list[float] | None = None  # per-parameter norms of last_checkpoint.pt
        self.num_classes = 0
        self.errors: dict[str, int] = {}
        self.last_errors: list[str] = []
        self.model = setup.model
        self.model_targets: list[torch.Tensor] = []
        if self.model is not None:
            # The model's own tensors (not detached copies): bind_model re-points them per snapshot.
            self.model_targets = [*self.model.parameters(), *self.model.buffers()]
            if len(self.model_targets) != len(setup.specs):
                raise RuntimeError("the worker's model copy does not match the snapshot layout")
        if setup.holdout is not None:
            labels = setup.holdout.get(config.label_key)
            if isinstance(labels, torch.Tensor):
                counts = metrics.label_counts(labels)
                if counts:
                    self.num_classes = max(counts) + 1
        if setup.init_slot is not None:
            init = setup.slots[setup.init_slot]
            self._save_checkpoint(init, None, None, metrics.tensor_norms(init[: setup.num_params]))

    def add_groups(self, groups: Groups) -> None:
        self.groups[groups.version] = groups
        for old in sorted(self.groups)[:-8]:  # snapshots in flight name recent versions only
            del self.groups[old]

    # -- one snapshot -> one record ------------------------------------------------
    def process(self, snap: Snapshot, release: Callable[[int], None]) -> dict[str, Any]:
        """The record of ``snap``; reads everything it needs from the slot, then releases it."""
        cfg = self.config
        setup = self.setup
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "batch_idx": snap.batch_idx,
            "epoch": snap.epoch,
            "seq": snap.seq,
            "timestamp": datetime.fromtimestamp(snap.time, timezone.utc).astimezone().isoformat(),
            "time": snap.time,
            "rank": setup.rank,
            "world_size": setup.world_size,
        }
        errors: list[dict[str, str]] = list(snap.extra.get("errors", ()))
        groups = self.groups.get(snap.groups_version) or self.groups[max(self.groups)]
        group_of, names = groups.group_of, groups.names
        i = snap.slot
        label_counts: dict[int, int] | None = None
        batch_size = snap.batch_size
        train_loss: float | None = snap.loss
        train_acc: float | None = None
        try:
            if snap.grads in (IN_SLOT, ALL_MISSING) and cfg.track_gradients:
                with self._guard("gradient_norm", errors):
                    n = setup.num_params
                    values = [None] * n if snap.grads == ALL_MISSING else self.norms[i][:n].tolist()
                    record["gradient_norm"] = metrics.combine_norms(
                        [None if v is None or v < 0 else v for v in values], group_of, names)  # NaN stays NaN
            if snap.loss_kind == IN_SLOT:
                train_loss = float(self.scalars[i][0])
            views = self._views(i, snap.extra) if "labels" in snap.extra else {}
            if snap.accuracy_kind == IN_AUX:
                with self._guard("train_accuracy", errors):
                    train_acc = float(metrics.batch_accuracy(views["outputs"], views["labels"]))
            elif snap.accuracy_kind == IN_SLOT:
                train_acc = float(self.scalars[i][1])
            if snap.counts_kind == IN_SLOT:  # DDP: the all_reduced count vector
                label_counts, batch_size = metrics.unpack_count_vector(self.counts[i].tolist())
            elif snap.counts_kind == IN_AUX:
                with self._guard("batch_stats", errors):
                    label_counts = metrics.label_counts(views["labels"])
            elif snap.counts_kind == IN_EXTRA:
                label_counts = snap.extra.get("label_counts")
            slot = setup.slots[i] if setup.slots else None
            if cfg.track_weight_delta and slot is not None:
                with self._guard("weight_delta", errors):
                    record.update(self._weights(slot, snap, group_of, names))
            if cfg.track_holdout_logits and slot is not None and self.model is not None:
                with self._guard("holdout_logits", errors):
                    bind_model(self.model_targets, slot)  # the model now reads this snapshot's weights
                    record["holdout_logits"] = metrics.evaluate_holdout(
                        self.model,
                        setup.holdout or {},
                        cfg.input_keys,
                        cfg.label_key,
                        setup.forward_fn,
                        cfg.eval_batch_size,
                    )
                    self.num_classes = max(self.num_classes, max(record["holdout_logits"]["labels"], default=-1) + 1)
        finally:
            release(i)  # the slot's data is no longer needed: give it back early
        if cfg.track_learning_rates and snap.learning_rates is not None:
            record["learning_rates"] = metrics.learning_rate_dict(snap.learning_rates, names)
        if cfg.track_batch_stats and (label_counts is not None or batch_size is not None):
            if label_counts:
                self.num_classes = max(self.num_classes, max(label_counts) + 1)
            record["batch_stats"] = metrics.batch_label_stats(label_counts, batch_size, cfg.label_key, self.num_classes)
        if train_loss is not None or train_acc is not None:
            record["train"] = {"loss": train_loss, "accuracy": train_acc}
        record["telemetry"] = {
            "hook_ms": snap.hook_ms,
            "dropped_before": snap.dropped_before,
            "dropped_total": snap.dropped_total,
            "worker_lag_ms": (time.time() - snap.time) * 1000.0,
        }
        nonfinite = metrics.nonfinite_keys(record)
        if nonfinite:
            record["nonfinite"] = nonfinite
        if errors:
            record["errors"] = errors
        return record

    def _views(self, slot: int, extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The labels/outputs the hook copied into ``slot``'s aux bytes, as tensors."""
        key = (slot, extra.get("labels"), extra.get("outputs"))  # (offset, dtype, shape) tuples
        views = self._aux_views.get(key)
        if views is None:
            if len(self._aux_views) > 64:
                self._aux_views.clear()
            views = {}
            for name in ("labels", "outputs"):
                if name in extra:
                    offset, dtype, shape = extra[name]
                    views[name] = aux_view(self.aux[slot], offset, getattr(torch, dtype), shape)
            self._aux_views[key] = views
        return views

    def write(self, record: dict[str, Any]) -> None:
        try:
            line = encode_record(record)
        except Exception as exc:  # never let one odd value cost the run: write what we can
            self._count("encode", exc)
            line = encode_record(
                {k: record[k] for k in ("schema", "batch_idx", "epoch", "seq", "timestamp", "time")}
                | {"errors": [_error_entry("encode", exc)]}
            )
        self.writer.write(line)

    # -- weights ------------------------------------------------------------------
    def _weights(self, slot: list[torch.Tensor], snap: Snapshot, group_of: list[int], names: list[str]) -> dict[str, Any]:
        n = self.setup.num_params
        current = slot[:n]
        out: dict[str, Any] = {}
        norms = metrics.tensor_norms(current)
        out["weight_norm"] = metrics.combine_norms(norms, group_of, names)
        if not self.checkpoint.exists():
            out["weight_delta"] = {key: None for key in out["weight_norm"]}
            out["update_ratio"] = {key: None for key in out["weight_norm"]}
            out["reference_batch_idx"] = None
        else:
            param_names = [spec.name for spec in self.setup.specs[:n]]
            deltas, ref_norms, ref_batch_idx = reference_norms(self.checkpoint, param_names, current, self._ref_norms)
            out["weight_delta"] = metrics.combine_norms(deltas, group_of, names)
            ref_norm = metrics.combine_norms(ref_norms, group_of, names)
            out["update_ratio"] = metrics.update_ratios(out["weight_delta"], ref_norm)
            out["reference_batch_idx"] = ref_batch_idx
        self._save_checkpoint(slot, snap.batch_idx, snap.epoch, norms)
        return out

    def _save_checkpoint(
        self, slot: list[torch.Tensor], batch_idx: int | None, epoch: int | None, norms: list[float] | None = None
    ) -> None:
        """Make ``slot`` the delta reference: ``last_checkpoint.pt``, rewritten in place.

        In place (no temp file and rename): replacing a 96 MiB file frees its page-cache
        pages, ~55 ms of the worker's CPU per collection on the wide stress preset; the
        layout is the same each time, so the rewrite only overwrites pages. The one reader
        is this worker, before the write. A write that fails removes the file, so the next
        delta is null instead of measured against half a checkpoint.
        """
        state = {spec.name: t for spec, t in zip(self.setup.specs, slot, strict=True)}
        self._ref_norms = None
        crc = torch.serialization.get_crc32_options()
        try:
            # No CRC32 of each record: 45 of the 83 ms of this write on the wide preset.
            # torch.load (ours, and a user's) does not need it; `unzip -t` would complain.
            torch.serialization.set_crc32_options(False)
            with open(self.checkpoint, "r+b" if self.checkpoint.exists() else "wb") as f:
                torch.save({"batch_idx": batch_idx, "epoch": epoch, "state_dict": state}, f)
                f.truncate()
        except BaseException:
            with contextlib.suppress(OSError):
                self.checkpoint.unlink()
            raise
        finally:
            torch.serialization.set_crc32_options(crc)  # sync mode runs in the user's process
        self._ref_norms = norms  # the reference's norms, for the next update ratio (no re-read)

    # -- errors -------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, where: str, errors: list[dict[str, str]]) -> Any:
        try:
            yield
        except Exception as exc:
            errors.append(_error_entry(where, exc))
            self._count(where, exc)

    def _count(self, where: str, exc: BaseException) -> None:
        key = f"{where}: {type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.last_errors) < _MAX_LOGGED_ERRORS and self.errors[key] == 1:
            self.last_errors.append(f"{key}: {exc}")
        _log_once(key, f"{where} failed ({type(exc).__name__}: {exc}); recorded in the "
                  "record's errors, further identical failures are counted silently")


_READ_CHUNK = 4 << 20  # bytes of the reference checkpoint read at a time


def reference_norms(
    path: Path, names: Sequence[str], current: Sequence[torch.Tensor], known_norms: Sequence[float] | None = None
) -> tuple[list[float], list[float], int | None]:
    """(||current_i - reference_i||, ||reference_i||) per parameter, and the reference's batch_idx.

    ``known_norms``: the reference's norms when the caller knows them (the worker computed
    them when it wrote the reference); they are then not recomputed.

    The reference is the checkpoint at ``path`` (torch.save of ``{"batch_idx", "epoch",
    "state_dict"}``). ``torch.load(mmap=True)`` gives names, shapes and where each tensor's
    bytes lie without reading them; the bytes are then read with ``pread`` through one
    reusable 4 MiB buffer. Reading through the mmap instead would count every page of the
    reference in our RSS until the mapping goes: a third copy of the weights at peak, on
    top of the two slots. Falls back to the mmap when the file's layout is not the one
    torch.save writes today (an uncompressed zip mapped whole).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = ckpt["state_dict"]
    missing = [name for name in names if name not in state]
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} parameters, e.g. {missing[0]!r}")
    refs = [state[name] for name in names]
    for name, ref, cur in zip(names, refs, current, strict=True):
        if ref.shape != cur.shape or ref.dtype != cur.dtype:
            raise ValueError(f"{path}: {name} is {ref.dtype}{list(ref.shape)}, the model's {cur.dtype}{list(cur.shape)}")
    batch_idx = ckpt.get("batch_idx")
    offsets = _file_offsets(path, refs)
    if offsets is None:
        return metrics.weight_delta_norms(current, refs), list(known_norms or metrics.tensor_norms(refs)), batch_idx
    del ckpt, state, refs  # only the offsets are needed now: the mapping can go
    buf = bytearray(_READ_CHUNK)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    view = memoryview(buf)
    deltas: list[float] = []
    ref_norms: list[float] = []
    diffs: dict[torch.dtype, torch.Tensor] = {}  # reused: a fresh 4 MiB temporary per chunk costs page faults
    with open(path, "rb") as f:
        fd = f.fileno()
        for cur, offset in zip(current, offsets, strict=True):
            flat = cur.reshape(-1)
            item = flat.element_size()
            per = _READ_CHUNK // item
            diff = diffs.get(flat.dtype)
            if diff is None:
                diff = diffs[flat.dtype] = torch.empty(per, dtype=flat.dtype)
            d2 = r2 = 0.0
            for start in range(0, flat.numel(), per):
                count = min(per, flat.numel() - start)
                nbytes = count * item
                if os.preadv(fd, [view[:nbytes]], offset + start * item) != nbytes:
                    raise OSError(f"{path}: short read (was it truncated?)")
                ref_part = raw[:nbytes].view(flat.dtype)
                part = torch.sub(flat[start : start + count], ref_part, out=diff[:count])
                d2 += float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
                if known_norms is None:
                    r2 += float(torch.linalg.vector_norm(ref_part, dtype=torch.float64)) ** 2
            deltas.append(math.sqrt(d2))
            ref_norms.append(math.sqrt(r2))
    return deltas, list(known_norms) if known_norms is not None else ref_norms, batch_idx


def _file_offsets(path: Path, tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """The byte offset in ``path`` of each mmap-loaded tensor's data, or None if it cannot be told.

    torch.load(mmap=True) maps the file once and each storage at its zip entry's data
    offset, so (storage address - entry offset) is one constant: checked, not assumed.
    """
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            entries = []
            for info in zf.infolist():
                if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                    continue
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra lengths come last
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                entries.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    storages = list({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.items())
    known = set(entries)
    first_ptr, first_size = storages[0]
    for offset, size in entries:
        base = first_ptr - offset
        if size == first_size and all((ptr - base, nbytes) in known for ptr, nbytes in storages):
            return [t.data_ptr() - base for t in tensors]
    return None


def _error_entry(where: str, exc: BaseException) -> dict[str, str]:
    return {"where": where, "type": type(exc).__name__, "message": str(exc)}


# ------------------------------------------------------------------------------------
# The worker process
# ------------------------------------------------------------------------------------

_terminating = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminating
    _terminating = True


def _prepare_process(config: TelemetryConfig, parent_death_signal: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # PDEATHSIG fires when the *thread* that started us exits, not the process: only safe
    # when the trainer started us from its main thread. Otherwise getppid polling covers it.
    if parent_death_signal and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.nice(config.worker_nice)
    if config.worker_sched_idle and hasattr(os, "SCHED_IDLE"):
        # nice alone (even +19) still gives us time slices on a trainer's busy cores, each
        # stalling one of its threads (docs/benchmarks.md). Under SCHED_IDLE we get only
        # time nobody else wants, so on a saturated machine most snapshots are dropped:
        # opt-in, for runs where training speed matters more than records. Set before
        # torch starts its thread pool, so its threads inherit it.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    torch.set_num_threads(config.worker_threads)


def worker_loop(
    config: TelemetryConfig,
    run_dir: str,
    records_file: str,
    to_worker: Any,
    from_worker: Any,
    channel: Channel,
    parent_pid: int,
    parent_death_signal: bool = True,
) -> None:
    """Entry point of the worker process; see NOTE [worker lifecycle]."""
    _prepare_process(config, parent_death_signal)
    # No cancel_join_thread() here: the final join_thread() must flush Done to the trainer
    # before we exit. Our few messages are tiny, so the pipe can never fill and block us.
    writer = RecordWriter(Path(records_file), config.fsync)
    from_worker.put(Ready(os.getpid()))
    processor: SnapshotProcessor | None = None
    clean = True
    fatal: list[str] = []
    headers = memoryview(channel.headers).cast("B")
    stopping = False
    next_parent_check = time.monotonic() + POLL_S

    def handle(msg: Any) -> None:
        nonlocal processor, stopping
        if isinstance(msg, Stop):
            stopping = True
        elif isinstance(msg, Groups):
            if processor is not None:
                processor.add_groups(msg)
        elif isinstance(msg, Setup):
            try:
                processor = SnapshotProcessor(config, Path(run_dir), msg, writer)
                if msg.init_slot is not None:
                    channel.release(msg.init_slot)
                error = _check_holdout(processor)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            from_worker.put(SetupDone(error))

    def process_published() -> None:
        for slot in channel.take_published():
            if processor is None:  # cannot happen unless the trainer misbehaves
                channel.release(slot)
                continue
            try:
                snap = read_header(headers, slot)
                # The trainer puts a new group map on the queue before it publishes the
                # first snapshot that names it: read the queue until it is here.
                deadline = time.monotonic() + GROUPS_WAIT_S
                while snap.groups_version not in processor.groups and time.monotonic() < deadline:
                    with contextlib.suppress(queue.Empty):
                        handle(_unpickle(to_worker.get(timeout=0.1)))
                processor.write(processor.process(snap, channel.release))
            except Exception as exc:
                channel.release(slot)
                processor._count("record", exc)

    try:
        while not _terminating:
            process_published()
            if stopping:  # everything published before Stop is written now
                break
            try:
                msg = _unpickle(to_worker.get(timeout=PUBLISH_POLL_S))
            except queue.Empty:
                now = time.monotonic()
                if now > next_parent_check:
                    next_parent_check = now + POLL_S
                    if os.getppid() != parent_pid:  # the trainer died: stop reading its slots
                        clean = False
                        break
                continue
            handle(msg)
    except BaseException as exc:  # a bug of ours: say why we die instead of vanishing
        clean = False
        fatal.append("".join(traceback.format_exception(exc)))
    finally:
        with contextlib.suppress(OSError):  # e.g. EIO from close(): still send Done
            writer.close()
        errors = dict(processor.errors) if processor else {}
        last = (list(processor.last_errors) if processor else []) + fatal
        last += writer.problems.values()
        with contextlib.suppress(Exception):
            from_worker.put(Done(writer.records_written, errors, last, writer.io_errors, clean and not _terminating))
            from_worker.close()
            from_worker.join_thread()
    if multiprocessing.parent_process() is not None:  # we are the worker process, not a test calling us
        # Every record is on disk and Done is in the pipe: skip the interpreter's teardown,
        # which with torch loaded takes a second or more on a busy machine, and which stop()
        # (or the trainer's exit) would otherwise wait out, or cut short with SIGTERM.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1 if fatal else 0)


def _unpickle(raw: Any) -> Any:
    return pickle.loads(raw) if isinstance(raw, bytes) else raw


def _check_holdout(processor: SnapshotProcessor) -> str | None:
    """Run the holdout forward once at setup so a bad forward fails start(), not the run."""
    setup = processor.setup
    if processor.model is None or not setup.holdout or not processor.config.track_holdout_logits:
        return None
    try:
        metrics.evaluate_holdout(
            processor.model,
            setup.holdout,
            processor.config.input_keys,
            processor.config.label_key,
            setup.forward_fn,
            processor.config.eval_batch_size,
        )
    except Exception as exc:
        return (
            f"the holdout forward failed in the telemetry worker: {type(exc).__name__}: {exc}. "
            "Check input_keys/label_key, or pass forward_fn=(model, batch) -> logits.\n"
            + traceback.format_exc()
        )
    return None
