"""Telemetry: the object users hold; start / on_batch_end / stop and the worker's lifecycle.

Runs in: the training process. The hook (``on_batch_end``) is the hot path: between
collections it costs one attribute test and a modulo; at a collection it takes a snapshot
(snapshot.py) and hands a small message to the worker (worker.py, NOTE [worker
lifecycle]). It never raises into training, and never waits on the worker unless the
user asked for ``on_full: block`` (and then at most ``block_timeout_s``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import signal
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.multiprocessing as tmp

from . import metrics
from .config import TelemetryConfig, TelemetryConfigError
from .messages import Done, Ready, Setup, SetupDone, Snapshot, Stop
from .records import CHECKPOINT_FILE, RECORDS_FILE, RUN_FILE, SCHEMA_VERSION, SUMMARY_FILE
from .snapshot import (
    Layout,
    SlotPool,
    build_layout,
    copy_weights,
    cpu_model_copy,
    grad_norm_tensor,
    unwrap_model,
)
from .worker import RecordWriter, SnapshotProcessor, worker_loop

__all__ = ["Telemetry", "TrainingTelemetry", "TelemetrySummary", "TelemetryStartError"]

TERM_GRACE_S = 2.0  # after the stop deadline: SIGTERM, this long, then SIGKILL


class TelemetryStartError(RuntimeError):
    """``start()`` could not get the collector running; the message says why and the fix."""


class TelemetrySummary(msgspec.Struct, kw_only=True):
    """What ``stop()`` returns (and writes to ``summary.json``)."""

    output_dir: str | None
    records_written: int
    snapshots_taken: int
    snapshots_dropped: int
    hook_errors: int
    errors: dict[str, int]
    last_errors: list[str]
    io_errors: int
    worker_pid: int | None
    worker_exitcode: int | None
    worker_exit_signal: str | None
    worker_terminated: bool  # stop() had to SIGTERM/SIGKILL the worker
    clean: bool  # every snapshot taken was written and the worker exited normally
    stop_seconds: float
    mode: str

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


# States of a Telemetry object.
_NEW, _RUNNING, _STOPPED, _DISABLED = "new", "running", "stopped", "disabled"

_live: weakref.WeakSet[Telemetry] = weakref.WeakSet()


def _disable_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) inherits our objects but must never touch
    # the parent's queues or slots: its hook becomes a no-op and its stop() does nothing.
    for t in list(_live):
        t._forked_child = True
        t._collecting = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_after_fork)


class Telemetry:
    """Collects gradient norms, weight deltas, LRs, holdout predictions and batch balance.

    >>> telemetry = Telemetry(TelemetryConfig(output_dir="runs/x/telemetry"))
    >>> telemetry.set_holdout_data(val_batches)
    >>> telemetry.start(model, optimizer)
    >>> ... telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch)
    >>> summary = telemetry.stop()
    """

    def __init__(
        self,
        config: TelemetryConfig | Mapping[str, Any] | None = None,
        forward_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    ) -> None:
        if config is None:
            config = TelemetryConfig()
        elif isinstance(config, Mapping):
            config = TelemetryConfig.from_dict(dict(config))
        elif not isinstance(config, TelemetryConfig):
            raise TypeError(f"config must be a TelemetryConfig or a dict, not {type(config).__name__}")
        self.config = config
        self.forward_fn = forward_fn
        self._every = config.collect_every_n
        self._collecting = False  # the hot path's only test besides the modulo
        self._state = _NEW
        self._forked_child = False
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._holdout: dict[str, Any] | None = None
        self._summary: TelemetrySummary | None = None
        self.output_dir: Path | None = Path(config.output_dir) if config.output_dir else None
        self.records_file: Path | None = None
        # set in start()
        self._rank = 0
        self._world_size = 1
        self._dist_group: Any = None
        self._global_batch = False  # batch stats summed over ranks (one all_reduce per collection)
        self._count_device = torch.device("cpu")  # where that all_reduce's vector lives
        self._layout: Layout | None = None
        self._pool: SlotPool | None = None
        self._slot_state: Any = None
        self._proc: Any = None
        self._to_worker: Any = None
        self._from_worker: Any = None
        self._processor: SnapshotProcessor | None = None
        self._writer: RecordWriter | None = None
        self._worker_dead = False
        self._handoff: _HandOff | None = None
        self._group_key: tuple[int, ...] | None = None
        self._group_of: list[int] = []
        self._group_names: list[str] = []
        self._groups_changed = False  # the worker has not yet seen the current param -> group map
        self._seq = 0
        self._taken = 0
        self._dropped = 0
        self._dropped_since = 0
        self._hook_errors = 0
        self._unsent_slot: int | None = None  # taken by the hook, not yet handed to the worker
        self._direct_send: bool | None = None  # see _send_snapshot; False: put() from now on
        self._direct_max = 0  # bytes of the largest snapshot written to the pipe directly
        self._pipe_size = -1  # bytes the snapshot pipe buffers (0: unknown); -1: not read yet
        self._needs_weights = config.track_weight_delta or config.track_holdout_logits
        self._setup_sent = False

    # ------------------------------------------------------------------ public API
    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None in sync mode or before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def snapshots_dropped(self) -> int:
        return self._dropped

    def set_holdout_data(self, holdout_data: Any) -> None:
        """The fixed examples to track: a list of batches (dicts of tensors) or one batch.

        Keeps the first ``holdout_size`` examples (rows), not batches.
        """
        batches = [holdout_data] if isinstance(holdout_data, Mapping) else list(holdout_data)
        if not batches:
            raise TelemetryConfigError("set_holdout_data: got no batches")
        for i, b in enumerate(batches):
            if not isinstance(b, Mapping):
                raise TelemetryConfigError(
                    f"set_holdout_data: batch {i} is a {type(b).__name__}, expected a dict of "
                    "tensors (as a DataLoader over a dict dataset yields)"
                )
        keys = list(batches[0].keys())
        merged: dict[str, Any] = {}
        for key in keys:
            values = [b[key] for b in batches if key in b]
            if all(isinstance(v, torch.Tensor) for v in values):
                merged[key] = torch.cat([v.detach().cpu() for v in values])[: self.config.holdout_size].clone()
            elif all(isinstance(v, (list, tuple)) for v in values):
                merged[key] = [x for v in values for x in v][: self.config.holdout_size]
        self._holdout = merged
        if self._state == _RUNNING and self._setup_sent:
            self._warn_once("holdout_late", "set_holdout_data after start() with a model is ignored: call it before start()")

    def start(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> Telemetry:
        """Start collecting. With ``model`` (and ``optimizer``), everything is ready before training.

        Raises :class:`TelemetryConfigError` / :class:`TelemetryStartError` for anything that
        would make collection fail later: after ``start()`` returns, nothing raises.
        """
        with self._lock:
            if self._state == _RUNNING:
                raise RuntimeError("Telemetry.start() called twice: it is already running; call stop() first")
            if self._state == _STOPPED:
                raise RuntimeError("Telemetry.start() after stop(): create a new Telemetry object for a new run")
            if not self.config.enabled:
                self._state = _DISABLED
                return self
            try:
                self._start(model, optimizer)
            except BaseException:
                self._teardown_after_failed_start()
                raise
            self._state = _RUNNING
            self._collecting = True
            _live.add(self)
            atexit.register(self._atexit_stop)
        return self

    def on_batch_end(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_idx: int,
        epoch: int = 0,
        device: Any = None,
        batch: Mapping[str, Any] | None = None,
        *,
        loss: torch.Tensor | float | None = None,
        outputs: torch.Tensor | None = None,
    ) -> None:
        """Call after ``optimizer.step()``. A no-op except every ``collect_every_n`` steps."""
        if not self._collecting:
            self._idle_hook()
            return
        if batch_idx % self._every:
            return
        try:
            self._collect(model, optimizer, batch_idx, epoch, batch, loss, outputs)
        except Exception as exc:  # never let telemetry crash training
            self._hook_errors += 1
            if self._unsent_slot is not None and self._pool is not None:
                self._pool.release(self._unsent_slot)  # else a repeated failure leaks every slot
                self._unsent_slot = None
            self._warn_once(f"hook:{type(exc).__name__}", f"telemetry collection failed and was skipped: {type(exc).__name__}: {exc}")

    def stop(self, timeout: float | None = None) -> TelemetrySummary:
        """Write everything collected so far, end the worker, return the summary.

        Returns within ``timeout`` (default ``stop_timeout_s``) plus a short grace for
        terminating a worker that does not finish. Calling it again returns the same summary.
        """
        if self._forked_child or os.getpid() != self._owner_pid:
            # Before the lock: a fork may have copied it while another thread held it.
            return self._empty_summary()
        with self._lock:
            if self._summary is not None:
                return self._summary
            if self._state in (_NEW, _DISABLED):
                self._state = _STOPPED
                self._summary = self._empty_summary()
                return self._summary
            self._collecting = False
            self._state = _STOPPED
            deadline = time.monotonic() + (self.config.stop_timeout_s if timeout is None else timeout)
            self._summary = self._shutdown(deadline)
            with contextlib.suppress(Exception):
                atexit.unregister(self._atexit_stop)
            self._write_summary(self._summary)
            return self._summary

    def __enter__(self) -> Telemetry:
        if self._state == _NEW:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()  # returns None: the user's exception, if any, propagates

    # ------------------------------------------------------------------ start
    def _start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        cfg = self.config
        self._detect_distributed()
        self._check_output_dir()
        if self._holdout is not None and cfg.track_holdout_logits:
            missing = [k for k in [*cfg.input_keys, cfg.label_key] if k not in self._holdout]
            if (missing and self.forward_fn is None) or cfg.label_key in missing:
                raise TelemetryConfigError(
                    f"the holdout batches lack key(s) {missing} (they have {sorted(self._holdout)}): "
                    "set input_keys/label_key in the config to your batch's keys, or pass forward_fn"
                )
        if not self._writes:
            return  # a non-writing rank: the hook only joins the label-count collective
        assert self.output_dir is not None
        with contextlib.suppress(FileNotFoundError):
            (self.output_dir / self._file_name(CHECKPOINT_FILE)).unlink()  # a stale reference would fake a delta
        if cfg.mode == "async":
            self._start_worker()
        else:
            self._writer = RecordWriter(self._records_path(), cfg.fsync)
        if model is not None:
            self._setup_model(model, optimizer, init_reference=True)
        self._write_run_info(model)

    def _check_output_dir(self) -> None:
        if self.output_dir is None:
            raise TelemetryConfigError(
                "output_dir is not set: set telemetry.output_dir in the config (or TelemetryConfig(output_dir=...))"
            )
        if not self._writes:
            return  # a rank that writes nothing needs no directory (on another node it may not exist)
        out = self.output_dir
        if not out.parent.exists():
            raise TelemetryConfigError(
                f"output_dir {str(out)!r}: its parent directory {str(out.parent)!r} does not exist; create it first"
            )
        try:
            out.mkdir(exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise TelemetryConfigError(
                f"output_dir {str(out)!r} is not writable ({exc.strerror}): choose a directory you can write to"
            ) from None

    def _detect_distributed(self) -> None:
        """Rank and world size from torch.distributed; see docs/distributed.md.

        Without ``per_rank`` only rank 0 writes, and the batch statistics of each
        collection are summed over the ranks (``_global_batch``). That all_reduce is the
        only collective telemetry ever runs; every rank joins it at every collection step.
        """
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self._rank = dist.get_rank()
            self._world_size = dist.get_world_size()
            self._global_batch = (
                self._world_size > 1 and not self.config.per_rank and self.config.track_batch_stats
            )
            if self._global_batch and dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
                self._count_device = torch.device("cuda", torch.cuda.current_device())
        elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            # Launched by torchrun, but start() came before init_process_group: without the
            # rank every process would write the same files. No collective is possible.
            self._rank = int(os.environ.get("RANK", "0") or 0)
            self._world_size = int(os.environ["WORLD_SIZE"])
            self._warn_once(
                "dist_late",
                f"WORLD_SIZE={self._world_size} but torch.distributed is not initialised at start(): "
                f"taking rank {self._rank} from $RANK; batch statistics cover this rank's batch only. "
                "Call start() after init_process_group for global batch statistics",
            )

    @property
    def _writes(self) -> bool:
        """Whether this process writes records (rank 0, or every rank with per_rank)."""
        return self._rank == 0 or self.config.per_rank

    def _file_name(self, name: str) -> str:
        """``name``, or with per_rank under DDP ``<stem>.rank<r>.<ext>`` (telemetry.rank1.jsonl)."""
        if self.config.per_rank and self._world_size > 1:
            stem, _, ext = name.partition(".")
            return f"{stem}.rank{self._rank}.{ext}"
        return name

    def _records_path(self) -> Path:
        assert self.output_dir is not None
        path = self.output_dir / self._file_name(RECORDS_FILE)
        self.records_file = path
        return path

    def _start_worker(self) -> None:
        cfg = self.config
        if cfg.start_method == "fork" and torch.cuda.is_initialized():
            raise TelemetryConfigError(
                "start_method: fork after CUDA was initialised would crash the worker; use spawn (the default)"
            )
        ctx: Any = tmp.get_context(cfg.start_method)
        self._to_worker = ctx.Queue()
        # If the worker dies, our exit must not hang flushing this queue (DataLoader does the same).
        self._to_worker.cancel_join_thread()
        self._from_worker = ctx.Queue()
        self._slot_state = ctx.RawArray("b", cfg.num_slots)
        assert self.output_dir is not None
        self._proc = ctx.Process(
            target=worker_loop,
            args=(cfg, str(self.output_dir), str(self._records_path()), self._to_worker,
                  self._from_worker, self._slot_state, os.getpid(),
                  # PDEATHSIG follows the starting thread: from any other, rely on polling.
                  threading.current_thread() is threading.main_thread()),
            name="train-telemetry-worker",
            daemon=True,
        )
        try:
            self._proc.start()
        except Exception as exc:
            raise TelemetryStartError(f"could not start the telemetry worker: {type(exc).__name__}: {exc}") from exc
        msg = self._await_reply(Ready, cfg.start_timeout_s, "start")
        assert isinstance(msg, Ready)

    def _await_reply(self, kind: type, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._from_worker.get(timeout=0.2)
            except queue.Empty:
                msg = None
            if isinstance(msg, kind):
                return msg
            if msg is None and not self._proc.is_alive():
                raise TelemetryStartError(
                    f"the telemetry worker (pid {self._proc.pid}) exited during {what} "
                    f"with {_describe_exit(self._proc.exitcode)}; see its output above"
                )
            if time.monotonic() > deadline:
                raise TelemetryStartError(
                    f"the telemetry worker did not answer within start_timeout_s={timeout:g}s during {what}: "
                    "raise start_timeout_s on a slow or loaded machine"
                )

    def _setup_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, init_reference: bool) -> None:
        """Build the slot pool and hand the worker its model copy and slots (once)."""
        cfg = self.config
        inner = unwrap_model(model)
        layout = build_layout(inner)
        self._layout = layout
        if optimizer is not None:
            self._update_groups(optimizer)
        shared = cfg.mode == "async"
        state = self._slot_state if shared else bytearray(1)
        # Without weights to copy the slots are empty, but still bound how many snapshots
        # can wait for the worker: a slow or hung worker then costs drops, never memory.
        slot_layout = layout if self._needs_weights else Layout(specs=[], params=[], buffers=[])
        self._pool = SlotPool(slot_layout, state, shared=shared)
        eval_model = None
        if cfg.track_holdout_logits and self._holdout is not None:
            eval_model = cpu_model_copy(inner)
        init_slot = None
        if init_reference and self._pool is not None and cfg.track_weight_delta:
            init_slot = self._pool.acquire()
            assert init_slot is not None
            copy_weights(layout, self._pool.slots[init_slot])
            if layout.on_cuda:
                torch.cuda.current_stream().synchronize()  # once, at start: not the hot path
        setup = Setup(
            specs=layout.specs,
            num_params=layout.num_params,
            slots=self._pool.slots if self._pool is not None else [],
            model=eval_model,
            forward_fn=self.forward_fn,
            holdout=self._holdout if cfg.track_holdout_logits else None,
            init_slot=init_slot,
            checkpoint_name=self._file_name(CHECKPOINT_FILE),
        )
        if cfg.mode == "sync":
            assert self._writer is not None and self.output_dir is not None
            self._processor = SnapshotProcessor(cfg, self.output_dir, setup, self._writer)
            if init_slot is not None and self._pool is not None:
                self._pool.release(init_slot)
            self._setup_sent = True
            return
        try:
            payload = bytes(ForkingPickler.dumps(setup))
        except Exception as exc:
            raise TelemetryStartError(
                f"the model or forward_fn cannot be sent to the telemetry worker ({type(exc).__name__}: {exc}). "
                "Under spawn they are pickled: define the model class and forward_fn at module level "
                "(not inside a function, no lambdas), or set track_holdout_logits: false, or mode: sync"
            ) from exc
        self._to_worker.put(payload)
        self._setup_sent = True
        done = self._await_reply(SetupDone, self.config.start_timeout_s, "setup")
        if done.error:
            raise TelemetryStartError(done.error)
        if layout.on_cuda:
            self._handoff = _HandOff(self._to_worker)

    def _update_groups(self, optimizer: torch.optim.Optimizer) -> None:
        groups = optimizer.param_groups
        key = tuple(len(g["params"]) for g in groups)
        if key == self._group_key:
            return
        assert self._layout is not None
        index = {id(p): i for i, p in enumerate(self._layout.params)}
        group_of = [-1] * len(self._layout.params)
        names: list[str] = []
        for gi, group in enumerate(groups):
            name = str(group.get("name", f"group_{gi}"))
            if name in names or name == metrics.OVERALL:
                name = f"{name}_{gi}"
            names.append(name)
            for p in group["params"]:
                i = index.get(id(p))
                if i is not None:
                    group_of[i] = gi
        if any(g < 0 for g in group_of):
            names.append("unassigned")  # params the optimizer does not train
            group_of = [g if g >= 0 else len(names) - 1 for g in group_of]
        self._group_key = key
        self._group_of = group_of
        self._group_names = names
        self._groups_changed = True

    def _write_run_info(self, model: torch.nn.Module | None) -> None:
        assert self.output_dir is not None
        groups: dict[str, Any] = {}
        if self._layout is not None and self._group_names:
            for gi, name in enumerate(self._group_names):
                members = [p for p, g in zip(self._layout.params, self._group_of, strict=True) if g == gi]
                groups[name] = {"num_tensors": len(members), "num_params": sum(p.numel() for p in members)}
        info = {
            "schema": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "groups": groups,
            "num_params": sum(p.numel() for p in self._layout.params) if self._layout else None,
            "slot_bytes": self._layout.nbytes if self._layout else None,
            "started": datetime.now(timezone.utc).astimezone().isoformat(),
            "pid": os.getpid(),
            "worker_pid": self.worker_pid,
            "rank": self._rank,
            "world_size": self._world_size,
            "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
            "host": socket.gethostname(),
            "global_batch_stats": self._global_batch,
            "torch_version": str(torch.__version__),
        }
        _write_json_atomic(self.output_dir / self._file_name(RUN_FILE), info)

    # ------------------------------------------------------------------ the hook
    def _idle_hook(self) -> None:
        if self._forked_child or self._state == _DISABLED:
            return
        if self._state == _NEW:
            self._warn_once("before_start", "on_batch_end() before start(): nothing is collected until start() is called")
        elif self._state == _STOPPED:
            self._warn_once("after_stop", "on_batch_end() after stop(): nothing is collected any more")

    def _collect(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_idx: int,
        epoch: int,
        batch: Mapping[str, Any] | None,
        loss: torch.Tensor | float | None,
        outputs: torch.Tensor | None,
    ) -> None:
        t0 = time.perf_counter()
        cfg = self.config
        label_counts: Any = None
        errors: list[dict[str, str]] = []  # metrics that failed here: recorded, never raised
        if self._global_batch:
            # DDP: every rank joins this all_reduce at every collection step, before anything
            # that depends on this rank's own state (worker dead, no free slot, an error) may
            # return: a rank that skipped it would leave the others waiting in it for good.
            # _count_vector never raises. On CPU (gloo) this blocks until all ranks arrive.
            label_counts = _count_vector(batch, cfg, self._count_device)
            torch.distributed.all_reduce(label_counts)  # SUM; unpacked in _finalize (no sync here)
        elif cfg.track_batch_stats:
            try:
                label_counts = self._label_counts(batch, batch_idx)
            except Exception as exc:
                errors.append(_hook_error("batch_stats", exc))
        if not self._writes:
            return
        if self._worker_dead or (self._proc is not None and not self._proc.is_alive()):
            self._on_worker_dead()
            self._drop()
            return
        if not self._setup_sent:
            self._setup_model(model, optimizer, init_reference=False)  # start() had no model
        layout = self._layout
        assert layout is not None
        if optimizer is not None:
            self._update_groups(optimizer)
        slot = None
        if self._pool is not None:
            slot = self._acquire_slot()
            if slot is None:
                self._drop()
                return
            self._unsent_slot = slot  # on_batch_end releases it if we fail before sending it
            if self._needs_weights:
                copy_weights(layout, self._pool.slots[slot])
        grad_norms: Any = None
        if cfg.track_gradients:
            norms, index = grad_norm_tensor(layout.params)
            grad_norms = (norms, index, len(layout.params))
        lrs = None
        if cfg.track_learning_rates and optimizer is not None:
            try:
                lrs = [float(g["lr"]) for g in optimizer.param_groups]
            except Exception as exc:
                errors.append(_hook_error("learning_rates", exc))
        train_loss: Any = loss.detach() if isinstance(loss, torch.Tensor) else loss
        train_acc: Any = None
        if outputs is not None and batch is not None and cfg.label_key in batch:
            try:
                train_acc = metrics.batch_accuracy(outputs, batch[cfg.label_key])
            except Exception as exc:
                errors.append({"where": "train_accuracy", "type": type(exc).__name__, "message": str(exc)})
        # Under DDP the global batch size comes out of the reduced vector, in _finalize.
        batch_size = None
        if batch is not None and not self._global_batch:
            try:
                batch_size = _batch_size(batch, cfg)
            except Exception as exc:
                errors.append(_hook_error("batch_size", exc))
        first = self._groups_changed
        self._groups_changed = False
        snap = Snapshot(
            seq=self._seq,
            slot=slot,
            batch_idx=batch_idx,
            epoch=epoch,
            time=time.time(),
            grad_norms=grad_norms,
            learning_rates=lrs,
            group_of=list(self._group_of) if first else None,
            group_names=list(self._group_names) if first else None,
            label_counts=label_counts,
            batch_size=batch_size,
            train_loss=train_loss,
            train_accuracy=train_acc,
            hook_ms=0.0,
            dropped_before=self._dropped_since,
            dropped_total=self._dropped,
            rank=self._rank,
            world_size=self._world_size,
            errors=errors,
        )
        self._seq += 1
        self._taken += 1
        self._dropped_since = 0
        if self._handoff is not None:
            # CUDA: the copies above are still in flight; the hand-off thread waits on this
            # event (off the training thread) before the worker may read the slot.
            event = torch.cuda.Event()
            event.record()
            snap.hook_ms = (time.perf_counter() - t0) * 1000.0
            self._handoff.submit(event, snap)
            self._unsent_slot = None
            return
        _finalize(snap)
        snap.hook_ms = (time.perf_counter() - t0) * 1000.0
        if self._processor is not None:  # mode: sync
            pool = self._pool
            self._unsent_slot = None  # process() releases it, even when it fails
            self._processor.write(self._processor.process(snap, pool.release if pool else _no_release))
        else:
            self._send_snapshot(snap)
            self._unsent_slot = None

    def _send_snapshot(self, snap: Snapshot) -> None:
        """Hand a CPU snapshot (plain numbers and a slot index) to the worker without waking a thread.

        ``Queue.put`` appends to a buffer and wakes the queue's feeder thread to pickle and write
        it; that thread then competes with training for the GIL and a core: ~4 ms stalls at
        collection steps on 2 busy cores (docs/benchmarks.md). Here the training thread pickles
        (~10 us) and writes the pipe itself, under the lock put()'s feeder writes under.

        It must never block. Every snapshot written here holds a slot until the worker has read
        it, so at most ``num_slots`` sit in the pipe; we write directly only while that many of
        the largest one seen fit in the pipe's buffer. Otherwise (thousands of tensors, a small
        pipe, no F_GETPIPE_SZ or a mp.Queue without these attributes) this and every later
        snapshot go through put(), so the worker still reads them in order.
        """
        q = self._to_worker
        if self._direct_send is not False and snap.slot is not None:
            if self._pipe_size < 0:
                self._pipe_size = _pipe_capacity(q)
            # Plain pickle: after _finalize a snapshot holds plain numbers only, and it is half the
            # cost of ForkingPickler (no per-call dispatch-table copy). get() unpickles either.
            payload = pickle.dumps(snap, pickle.HIGHEST_PROTOCOL)
            self._direct_max = max(self._direct_max, len(payload) + 4)  # + send_bytes' length header
            if self._pipe_size >= self.config.num_slots * self._direct_max:
                q._sem.acquire(False)  # get() releases it once per message, as after put()
                with q._wlock:
                    q._writer.send_bytes(payload)
                self._direct_send = True
                return
        self._direct_send = False
        q.put(snap)

    def _label_counts(self, batch: Mapping[str, Any] | None, batch_idx: int) -> dict[int, int] | None:
        if batch is None or self.config.label_key not in batch:
            return None
        labels = batch[self.config.label_key]
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        return metrics.label_counts(labels.detach().cpu())

    def _acquire_slot(self) -> int | None:
        assert self._pool is not None
        slot = self._pool.acquire()
        if slot is not None or self.config.on_full == "drop":
            return slot
        deadline = time.monotonic() + self.config.block_timeout_s
        while slot is None and time.monotonic() < deadline:
            if self._proc is not None and not self._proc.is_alive():
                return None
            time.sleep(0.0005)
            slot = self._pool.acquire()
        return slot

    def _drop(self) -> None:
        self._dropped += 1
        self._dropped_since += 1

    def _on_worker_dead(self) -> None:
        if self._worker_dead:
            return
        self._worker_dead = True
        code = self._proc.exitcode
        self._warn_once(
            "worker_dead",
            f"the telemetry worker (pid {self._proc.pid}) exited unexpectedly with {_describe_exit(code)}; "
            "training continues without telemetry, later collections are counted as dropped",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"train-telemetry: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ stop
    def _shutdown(self, deadline: float) -> TelemetrySummary:
        t0 = time.monotonic()
        cfg = self.config
        if not self._writes:  # a DDP rank other than 0: no worker, no files, nothing to lose
            summary = self._empty_summary()
            summary.hook_errors = self._hook_errors
            return summary
        if self._handoff is not None:
            self._handoff.close(deadline)
        done: Done | None = None
        terminated = False
        if self._processor is not None or self._writer is not None:  # mode: sync
            assert self._writer is not None
            with contextlib.suppress(OSError):  # counted in io_errors; stop() never raises
                self._writer.close()
            proc_errors = self._processor.errors if self._processor else {}
            done = Done(self._writer.records_written, dict(proc_errors),
                        list(self._processor.last_errors) if self._processor else [], self._writer.io_errors)
            done.last_errors += self._writer.problems.values()
        elif self._proc is not None:
            with contextlib.suppress(Exception):
                if self._proc.is_alive():
                    self._to_worker.put(Stop())
            seen_dead = False
            while time.monotonic() < deadline and done is None:
                try:
                    msg = self._from_worker.get(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
                except queue.Empty:
                    if not self._proc.is_alive():
                        # Done may have reached the pipe between our timeout and its exit:
                        # read once more before concluding it ended without reporting.
                        if seen_dead:
                            break
                        seen_dead = True
                    continue
                except Exception:
                    break
                if isinstance(msg, Done):
                    done = msg
            self._proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._proc.is_alive():
                terminated = True
                self._proc.terminate()
                self._proc.join(TERM_GRACE_S)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(TERM_GRACE_S)
        exitcode = self._proc.exitcode if self._proc is not None else None
        written = done.records_written if done else _count_lines(self.records_file)
        errors = dict(done.errors) if done else {}
        last = list(done.last_errors) if done else []
        if self._proc is not None and done is None:
            last.append(f"the worker ended without reporting ({_describe_exit(exitcode)})")
        clean = (done is not None and done.clean and written == self._taken and not terminated
                 and (exitcode in (0, None)))
        return TelemetrySummary(
            output_dir=str(self.output_dir) if self.output_dir else None,
            records_written=written,
            snapshots_taken=self._taken,
            snapshots_dropped=self._dropped,
            hook_errors=self._hook_errors,
            errors=errors,
            last_errors=last,
            io_errors=done.io_errors if done else 0,
            worker_pid=self.worker_pid,
            worker_exitcode=exitcode,
            worker_exit_signal=_signal_name(exitcode),
            worker_terminated=terminated,
            clean=clean,
            stop_seconds=time.monotonic() - t0,
            mode=cfg.mode,
        )

    def _write_summary(self, summary: TelemetrySummary) -> None:
        if self.output_dir is None or not self._writes:
            return
        with contextlib.suppress(OSError):
            _write_json_atomic(self.output_dir / self._file_name(SUMMARY_FILE), summary.to_dict())

    def _atexit_stop(self) -> None:
        # The interpreter is exiting without stop(): flush what is queued, bounded in time.
        if self._forked_child or os.getpid() != self._owner_pid:
            return
        with contextlib.suppress(Exception):
            self.stop(timeout=min(self.config.stop_timeout_s, 10.0))

    def _teardown_after_failed_start(self) -> None:
        self._collecting = False
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(TERM_GRACE_S)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(TERM_GRACE_S)
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()

    def _empty_summary(self) -> TelemetrySummary:
        return TelemetrySummary(
            output_dir=str(self.output_dir) if self.output_dir else None, records_written=0,
            snapshots_taken=0, snapshots_dropped=0, hook_errors=0, errors={}, last_errors=[],
            io_errors=0, worker_pid=None, worker_exitcode=None, worker_exit_signal=None,
            worker_terminated=False, clean=True, stop_seconds=0.0, mode=self.config.mode,
        )


TrainingTelemetry = Telemetry  # the seed's name for the same class


# ---------------------------------------------------------------------- helpers
def _finalize(snap: Snapshot) -> None:
    """Turn the snapshot's device tensors into plain numbers (a sync on CUDA: call off the hot path there)."""
    if isinstance(snap.grad_norms, tuple):
        norms, index, n = snap.grad_norms
        values: list[float | None] = [None] * n
        if norms is not None:
            for i, v in zip(index, norms.tolist(), strict=True):
                values[i] = v
        snap.grad_norms = values
    if isinstance(snap.label_counts, torch.Tensor):  # DDP: the all_reduced _count_vector
        snap.label_counts, snap.batch_size = _unpack_count_vector(snap.label_counts.tolist())
    if isinstance(snap.train_loss, torch.Tensor):
        snap.train_loss = float(snap.train_loss)
    if isinstance(snap.train_accuracy, torch.Tensor):
        snap.train_accuracy = float(snap.train_accuracy)


def _no_release(i: int) -> None:
    pass


def _pipe_capacity(q: Any) -> int:
    """Bytes a mp.Queue's pipe buffers before a write blocks (Linux); 0 if unknown or not a pipe we can use."""
    try:
        import fcntl

        if q._wlock is None or not hasattr(q, "_sem"):  # Windows has no write lock
            return 0
        return int(fcntl.fcntl(q._writer.fileno(), fcntl.F_GETPIPE_SZ))
    except (ImportError, AttributeError, OSError):
        return 0


def _hook_error(where: str, exc: BaseException) -> dict[str, str]:
    """A record's ``errors`` entry for a metric that failed in the hook (same shape as the worker's)."""
    return {"where": where, "type": type(exc).__name__, "message": str(exc)}


def _batch_size(batch: Mapping[str, Any], cfg: TelemetryConfig) -> int | None:
    for key in (cfg.label_key, *cfg.input_keys):
        v = batch.get(key)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


# The vector of the DDP batch-stats all_reduce (int64, summed over ranks): the count of
# each class 0.._MAX_CLASSES-1, then the rows, then two "this rank could not say" counts.
_MAX_CLASSES = 1024
_ROWS = _MAX_CLASSES  # batch rows: the sum is the global batch size
_NO_SIZE = _MAX_CLASSES + 1  # ranks whose batch size is unknown (> 0: batch_size None)
_UNCOUNTED = _MAX_CLASSES + 2  # ranks without labels or with labels that are not class ids


def _count_vector(batch: Mapping[str, Any] | None, cfg: TelemetryConfig, device: torch.device) -> torch.Tensor:
    """This rank's share of the global batch statistics; never raises, no sync on CUDA."""
    vec = torch.zeros(_MAX_CLASSES + 3, dtype=torch.int64, device=device)
    vec[_NO_SIZE] = 1  # "unknown" until shown otherwise
    vec[_UNCOUNTED] = 1
    with contextlib.suppress(Exception):
        size = _batch_size(batch, cfg) if batch is not None else None
        if size is not None:
            vec[_ROWS] = size
            vec[_NO_SIZE] = 0
    try:
        labels = batch.get(cfg.label_key) if batch is not None else None
        if labels is None:
            return vec
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        flat = labels.detach().reshape(-1).to(device)  # a copy (and a sync) only if devices differ
        valid = (flat >= 0) & (flat < _MAX_CLASSES)
        if flat.is_floating_point():
            valid &= flat == flat.round()  # regression targets are not classes
        classes = torch.where(valid, flat, torch.zeros_like(flat)).to(torch.int64)
        vec[:_MAX_CLASSES].index_add_(0, classes, valid.to(torch.int64))
        vec[_UNCOUNTED] = (~valid).any()  # a tensor assignment: stays on the device
    except Exception:  # odd labels: this rank still joins the collective, as "uncounted"
        vec[:_MAX_CLASSES].zero_()
        vec[_UNCOUNTED] = 1
    return vec


def _unpack_count_vector(values: list[int]) -> tuple[dict[int, int] | None, int | None]:
    """(label counts, batch size) of the global batch from the all_reduced vector."""
    counts = None if values[_UNCOUNTED] else {c: n for c, n in enumerate(values[:_MAX_CLASSES]) if n}
    size = None if values[_NO_SIZE] else values[_ROWS]
    return counts, size


class _HandOff:
    """CUDA only: a thread that waits for each snapshot's copies, then sends it to the worker.

    Waiting on the event here (it releases the GIL) keeps the training thread free of
    device syncs; the hook itself only records the event.
    """

    def __init__(self, to_worker: Any) -> None:
        self._to_worker = to_worker
        self._pending: queue.SimpleQueue[tuple[Any, Snapshot] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-handoff", daemon=True)
        self._thread.start()

    def submit(self, event: Any, snap: Snapshot) -> None:
        self._pending.put((event, snap))

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            event, snap = item
            try:
                event.synchronize()
                _finalize(snap)
                self._to_worker.put(snap)
            except Exception as exc:  # keep the thread alive: one failed snapshot is one record lost
                warnings.warn(f"train-telemetry: hand-off failed: {exc}", RuntimeWarning, stacklevel=1)

    def close(self, deadline: float) -> None:
        self._pending.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        return f"signal {_signal_name(code)}"
    return f"exit code {code}"


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _count_lines(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    from .records import to_strict_json_value

    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_bytes(msgspec.json.format(msgspec.json.encode(to_strict_json_value(dict(data)))) + b"\n")
    os.replace(tmp_path, path)

