"""The telemetry worker: turns snapshots into records, off the training critical path.

Runs in: the worker process (``worker_loop``), and, for ``mode: sync``, the training
process (``SnapshotProcessor`` alone, called inline).

NOTE [worker lifecycle]
=======================

Data flow (one collection)::

    trainer: on_batch_end                      worker: worker_loop
    ---------------------                      -------------------
    slot = pool.acquire()   (none: drop/block)
    copy weights -> slot, norms, LRs, labels
    to_worker.put(Snapshot(slot, ...))  -----> SnapshotProcessor.process(snapshot)
                                                 deltas vs last_checkpoint.pt (mmap)
                                                 write slot as the new checkpoint (rename)
                                                 copy slot into the model copy, eval holdout
                                 slot FREE <---- pool.release(slot)
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
* loop: ``get(timeout=POLL_S)``; on timeout check that the trainer still lives
  (``os.getppid()`` changed means it died: flush, exit). Each snapshot is processed in a
  try/except per metric, so one failing metric costs that field, not the record; an
  error that escapes anyway costs that record and is counted.
* stop (trainer): send ``Stop``; the queue is FIFO, so every snapshot sent before it is
  written first; wait for ``Done`` and the exit until the deadline; then SIGTERM, then
  SIGKILL; never wait without a timeout.
* trainer death (SIGKILL, OOM): the worker notices within POLL_S (or at once through
  PDEATHSIG), writes nothing more from slots (the trainer may have died mid-copy) and
  exits; the records already written are whole lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .config import TelemetryConfig
from .messages import Done, Ready, Setup, SetupDone, Snapshot, Stop
from .records import SCHEMA_VERSION, encode_record, repair_torn_tail

POLL_S = 0.5  # how often an idle worker checks that the trainer is alive
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
        self.group_of: list[int] = [-1] * setup.num_params
        self.group_names: list[str] = []
        self.num_classes = 0
        self.errors: dict[str, int] = {}
        self.last_errors: list[str] = []
        self.model = setup.model
        self.model_targets: list[torch.Tensor] = []
        if self.model is not None:
            self.model_targets = [t.detach() for _, t in self.model.named_parameters()] + [
                t.detach() for _, t in self.model.named_buffers()
            ]
            if len(self.model_targets) != len(setup.specs):
                raise RuntimeError("the worker's model copy does not match the snapshot layout")
        if setup.holdout is not None:
            labels = setup.holdout.get(config.label_key)
            if isinstance(labels, torch.Tensor):
                counts = metrics.label_counts(labels)
                if counts:
                    self.num_classes = max(counts) + 1
        if setup.init_slot is not None:
            self._save_checkpoint(setup.slots[setup.init_slot], batch_idx=None, epoch=None)

    # -- one snapshot -> one record ------------------------------------------------
    def process(self, snap: Snapshot, release: Callable[[int], None]) -> dict[str, Any]:
        cfg = self.config
        record: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "batch_idx": snap.batch_idx,
            "epoch": snap.epoch,
            "seq": snap.seq,
            "timestamp": datetime.fromtimestamp(snap.time, timezone.utc).astimezone().isoformat(),
            "time": snap.time,
            "rank": snap.rank,
            "world_size": snap.world_size,
        }
        errors: list[dict[str, str]] = list(snap.errors)
        if snap.group_of is not None:
            self.group_of = snap.group_of
            self.group_names = snap.group_names or []
        slot = self.setup.slots[snap.slot] if snap.slot is not None else None
        try:
            if cfg.track_gradients and snap.grad_norms is not None:
                with self._guard("gradient_norm", errors):
                    record["gradient_norm"] = metrics.combine_norms(
                        snap.grad_norms, self.group_of, self.group_names
                    )
            if cfg.track_weight_delta and slot is not None:
                with self._guard("weight_delta", errors):
                    record.update(self._weights(slot, snap))
            if cfg.track_holdout_logits and slot is not None and self.model is not None:
                with self._guard("holdout_logits", errors):
                    torch._foreach_copy_(self.model_targets, list(slot))
                    record["holdout_logits"] = metrics.evaluate_holdout(
                        self.model,
                        self.setup.holdout or {},
                        cfg.input_keys,
                        cfg.label_key,
                        self.setup.forward_fn,
                        cfg.eval_batch_size,
                    )
                    self.num_classes = max(self.num_classes, max(record["holdout_logits"]["labels"], default=-1) + 1)
        finally:
            if snap.slot is not None:
                release(snap.slot)  # the slot's data is no longer needed: give it back early
        if cfg.track_learning_rates and snap.learning_rates is not None:
            record["learning_rates"] = metrics.learning_rate_dict(snap.learning_rates, self.group_names)
        if cfg.track_batch_stats and (snap.label_counts is not None or snap.batch_size is not None):
            if snap.label_counts:
                self.num_classes = max(self.num_classes, max(snap.label_counts) + 1)
            record["batch_stats"] = metrics.batch_label_stats(
                snap.label_counts, snap.batch_size, cfg.label_key, self.num_classes
            )
        if snap.train_loss is not None or snap.train_accuracy is not None:
            record["train"] = {"loss": snap.train_loss, "accuracy": snap.train_accuracy}
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
    def _weights(self, slot: list[torch.Tensor], snap: Snapshot) -> dict[str, Any]:
        n = self.setup.num_params
        current = slot[:n]
        names = self.group_names
        out: dict[str, Any] = {}
        out["weight_norm"] = metrics.combine_norms(metrics.tensor_norms(current), self.group_of, names)
        reference = self._load_reference()
        if reference is None:
            out["weight_delta"] = {key: None for key in out["weight_norm"]}
            out["update_ratio"] = {key: None for key in out["weight_norm"]}
            out["reference_batch_idx"] = None
        else:
            ref_tensors, ref_batch_idx = reference
            out["weight_delta"] = metrics.combine_norms(
                metrics.weight_delta_norms(current, ref_tensors), self.group_of, names
            )
            ref_norm = metrics.combine_norms(metrics.tensor_norms(ref_tensors), self.group_of, names)
            out["update_ratio"] = metrics.update_ratios(out["weight_delta"], ref_norm)
            out["reference_batch_idx"] = ref_batch_idx
        self._save_checkpoint(slot, snap.batch_idx, snap.epoch)
        return out

    def _load_reference(self) -> tuple[list[torch.Tensor], int | None] | None:
        if not self.checkpoint.exists():
            return None
        # mmap: the reference is read from the page cache, not held as a second copy.
        ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True, mmap=True)
        state = ckpt["state_dict"]
        names = [s.name for s in self.setup.specs[: self.setup.num_params]]
        missing = [name for name in names if name not in state]
        if missing:
            raise KeyError(f"{self.checkpoint} lacks {len(missing)} parameters, e.g. {missing[0]!r}")
        return [state[name] for name in names], ckpt.get("batch_idx")

    def _save_checkpoint(self, slot: list[torch.Tensor], batch_idx: int | None, epoch: int | None) -> None:
        state = {spec.name: t for spec, t in zip(self.setup.specs, slot, strict=True)}
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save({"batch_idx": batch_idx, "epoch": epoch, "state_dict": state}, tmp)
        os.replace(tmp, self.checkpoint)  # atomic: a reader sees the old or the new file

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
        # nice alone still lets us take ~10% of a core from a trainer that uses them all,
        # enough to stall its threads (docs/benchmarks.md). Under SCHED_IDLE we get only
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
    slot_state: Any,
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

    def release(i: int) -> None:
        slot_state[i] = 0

    try:
        while not _terminating:
            try:
                raw = to_worker.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the trainer died: stop reading its slots
                    clean = False
                    break
                continue
            msg = pickle.loads(raw) if isinstance(raw, bytes) else raw
            if isinstance(msg, Stop):
                break
            if isinstance(msg, Setup):
                try:
                    processor = SnapshotProcessor(config, Path(run_dir), msg, writer)
                    if msg.init_slot is not None:
                        release(msg.init_slot)
                    error = _check_holdout(processor)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                from_worker.put(SetupDone(error))
                continue
            if isinstance(msg, Snapshot):
                if processor is None:  # cannot happen unless the trainer misbehaves
                    if msg.slot is not None:
                        release(msg.slot)
                    continue
                try:
                    processor.write(processor.process(msg, release))
                except Exception as exc:
                    processor._count("record", exc)
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
