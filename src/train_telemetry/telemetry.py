"""Telemetry: the object users hold; start / on_batch_end / stop and the worker's lifecycle.

Runs in: the training process. The hook (``on_batch_end``) is the hot path: between
collections it costs one attribute test and a modulo; at a collection it copies a snapshot
into a shared slot (snapshot.py) and publishes it to the worker (worker.py, NOTE [worker
lifecycle]). It never raises into training, and never waits on the worker unless the
user asked for ``on_full: block`` (and then at most ``block_timeout_s``).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.connection
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
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.multiprocessing as tmp

from . import metrics
from .config import TelemetryConfig, TelemetryConfigError
from .messages import (
    ALL_MISSING,
    IN_AUX,
    IN_EXTRA,
    IN_HEADER,
    IN_SLOT,
    NONE,
    Done,
    Groups,
    Ready,
    Setup,
    SetupDone,
    Stop,
    read_header,
    write_header,
)
from .records import CHECKPOINT_FILE, RECORDS_FILE, RUN_FILE, SCHEMA_VERSION, SUMMARY_FILE
from .snapshot import (
    AUX_BYTES,
    Channel,
    Layout,
    SlotPool,
    aux_view,
    build_layout,
    grad_norms,
    model_on_slot,
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
        self._channel: Channel | None = None
        self._headers: memoryview | None = None  # the channel's header bytes
        self._proc: Any = None
        self._to_worker: Any = None
        self._from_worker: Any = None
        self._processor: SnapshotProcessor | None = None
        self._writer: RecordWriter | None = None
        self._worker_dead = False
        self._worker_exited = False  # set by the watcher thread when the worker process ends
        self._handoff: _HandOff | None = None
        self._group_key: tuple[int, ...] | None = None
        self._group_of: list[int] = []
        self._group_names: list[str] = []
        self._groups_version = 0  # bumped when the param -> group map changes; snapshots carry it
        self._seq = 0
        self._taken = 0
        self._dropped = 0
        self._dropped_since = 0
        self._hook_errors = 0
        self._unsent_slot: int | None = None  # taken by the hook, not yet handed to the worker
        self._copy_srcs: list[torch.Tensor] = []  # what every collection copies: weights and buffers
        self._copy_dsts: list[list[torch.Tensor]] = []  # ... into each slot
        self._on_cuda = False
        self._aux_plans: dict[tuple[Any, ...], _AuxPlan] = {}
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
            # Grad mode off: outputs, loss (and create_graph grads) require grad; copying them
            # must build no graph. The C call, not `with torch.no_grad()`: 11 vs 27 us from the
            # hook's entry to its first line at a collection step (conv, in the loop).
            grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                self._collect(model, optimizer, batch_idx, epoch, batch, loss, outputs)
            finally:
                torch._C._set_grad_enabled(grad_mode)
        except Exception as exc:  # never let telemetry crash training
            self._hook_errors += 1
            if self._unsent_slot is not None and self._channel is not None:
                self._channel.release(self._unsent_slot)  # else a repeated failure leaks every slot
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
        self._channel = Channel(ctx, cfg.num_slots)
        self._headers = memoryview(self._channel.headers).cast("B")
        assert self.output_dir is not None
        self._proc = ctx.Process(
            target=worker_loop,
            args=(cfg, str(self.output_dir), str(self._records_path()), self._to_worker,
                  self._from_worker, self._channel, os.getpid(),
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
        _watch_exit(self, self._proc.sentinel)

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
        """Build the slot pool and hand the worker its slots and the eval model on them (once)."""
        cfg = self.config
        inner = unwrap_model(model)
        layout = build_layout(inner)
        self._layout = layout
        if optimizer is not None:
            self._update_groups(optimizer)
        shared = cfg.mode == "async"
        if self._channel is None:  # mode: sync: one process-local slot
            self._channel = Channel(None, 1)
            self._headers = memoryview(self._channel.headers)
        # Without weights to copy the slots hold no weights, but still bound how many
        # snapshots can wait for the worker: a slow or hung worker then costs drops, never memory.
        slot_layout = layout if self._needs_weights else Layout(specs=[], params=layout.params, buffers=[], on_cuda=layout.on_cuda)
        self._pool = SlotPool(slot_layout, self._channel, shared=shared)
        self._copy_srcs = list(layout.sources) if self._needs_weights else []
        self._copy_dsts = [list(t) if self._needs_weights else [] for t in self._pool.slots]
        self._on_cuda = layout.on_cuda
        eval_model = None
        if cfg.track_holdout_logits and self._holdout is not None:
            eval_model = model_on_slot(inner, self._pool.slots[0])
        init_slot = None
        if init_reference and cfg.track_weight_delta:
            init_slot = self._channel.acquire()
            assert init_slot is not None
            torch._foreach_copy_(self._copy_dsts[init_slot], self._copy_srcs)
            if layout.on_cuda:
                torch.cuda.current_stream().synchronize()  # once, at start: not the hot path
        setup = Setup(
            specs=layout.specs,
            num_params=layout.num_params,
            slots=self._pool.slots if self._needs_weights else [],
            meta=self._pool.meta,
            meta_offsets=self._pool.meta_offsets,
            model=eval_model,
            forward_fn=self.forward_fn,
            holdout=self._holdout if cfg.track_holdout_logits else None,
            init_slot=init_slot,
            groups=Groups(self._groups_version, list(self._group_of) or [-1] * layout.num_params, list(self._group_names)),
            rank=self._rank,
            world_size=self._world_size,
            checkpoint_name=self._file_name(CHECKPOINT_FILE),
        )
        if cfg.mode == "sync":
            assert self._writer is not None and self.output_dir is not None
            self._processor = SnapshotProcessor(cfg, self.output_dir, setup, self._writer)
            if init_slot is not None:
                self._channel.release(init_slot)
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
            self._handoff = _HandOff(self._channel)

    def _update_groups(self, optimizer: torch.optim.Optimizer) -> None:
        groups = optimizer.param_groups
        key = tuple([len(g["params"]) for g in groups])
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
        self._groups_version += 1
        if self._setup_sent:  # else Setup carries them
            message = Groups(self._groups_version, list(group_of), list(names))
            if self._processor is not None:
                self._processor.add_groups(message)
            elif self._to_worker is not None:
                self._to_worker.put(message)  # before the snapshot that names this version is published

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
            "slot_bytes": self._layout.nbytes if self._layout else None,  # weights and buffers, per slot
            # ... plus this per slot: grad norms, loss, the batch's labels and outputs
            "slot_meta_bytes": self._pool.meta[0].numel() if self._pool else None,
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
        # Every line here runs on the training thread at each collection, with caches cold
        # from the step before it: a cheap torch op costs 10-30 us here, not the 1-2 us of a
        # microbenchmark. So the hook runs two fused torch calls (norms, then one copy of
        # everything into the slot), packs plain numbers into the slot's header and
        # publishes it; label counts and accuracy are the worker's work (snapshot.py).
        t0 = time.perf_counter()
        cfg = self.config
        counts: torch.Tensor | None = None
        if self._global_batch:
            # DDP: every rank joins this all_reduce at every collection step, before anything
            # that depends on this rank's own state (worker dead, no free slot, an error) may
            # return: a rank that skipped it would leave the others waiting in it for good.
            # count_vector never raises. On CPU (gloo) this blocks until all ranks arrive.
            counts = metrics.count_vector(batch, cfg.label_key, cfg.input_keys, self._count_device)
            torch.distributed.all_reduce(counts)  # SUM; unpacked by the worker (no sync here)
        if not self._writes:
            return
        if self._worker_exited:  # set by the _watch_exit thread: no system call here
            self._on_worker_dead()
            self._drop()
            return
        if not self._setup_sent:
            self._setup_model(model, optimizer, init_reference=False)  # start() had no model
        if optimizer is not None:
            self._update_groups(optimizer)
        pool = self._pool
        assert pool is not None and self._layout is not None
        slot = self._acquire_slot()
        if slot is None:
            self._drop()
            return
        self._unsent_slot = slot  # on_batch_end releases it if we fail before publishing it
        src = list(self._copy_srcs)
        dst = list(self._copy_dsts[slot])
        errors: list[dict[str, str]] | None = None
        grads = NONE
        if cfg.track_gradients:
            norms = grad_norms(self._layout.params, stack=self._on_cuda)
            if norms is None:
                grads = ALL_MISSING
            elif isinstance(norms, list):
                src += norms
                dst += pool.norm_views[slot]
                grads = IN_SLOT
            else:
                src.append(norms)
                dst.append(pool.norms[slot][: norms.shape[0]])
                grads = IN_SLOT
        loss_kind, loss_value = NONE, 0.0
        if isinstance(loss, torch.Tensor):
            if loss.numel() == 1:
                src.append(loss)
                dst.append(pool.scalar(slot, 0, loss.shape))
                loss_kind = IN_SLOT
            else:
                errors = [{"where": "train_loss", "type": "ValueError",
                           "message": f"loss has shape {tuple(loss.shape)}: pass the scalar loss the optimizer steps on"}]
        elif loss is not None:
            try:
                loss_value, loss_kind = float(loss), IN_HEADER
            except (TypeError, ValueError) as exc:
                errors = [_hook_error("train_loss", exc)]
        labels = None
        if batch is not None and cfg.label_key in batch:
            labels = batch[cfg.label_key]
        plan = None
        extra_values: dict[str, Any] | None = None
        acc_kind = counts_kind = NONE
        batch_size = -1
        if isinstance(labels, torch.Tensor):
            out = outputs if isinstance(outputs, torch.Tensor) else None
            # is_cuda, not .device (which builds a new object each time): a plan is per device type
            key = (labels.shape, labels.dtype, labels.is_cuda, None if out is None else out.shape,
                   None if out is None else out.dtype, out is not None and out.is_cuda)
            plan = self._aux_plans.get(key)
            if plan is None:
                plan = self._plan_aux(key, labels, out)
            batch_size = plan.batch_size
            aux_src: list[torch.Tensor] = []
            if plan.labels_fit:
                aux_src = [labels, out] if plan.outputs and out is not None else [labels]
            if plan.same_device:
                src += aux_src
                dst += plan.views[slot]
            acc_kind = plan.accuracy_kind
            if acc_kind == IN_SLOT:
                try:
                    src.append(metrics.batch_accuracy(out, labels))  # type: ignore[arg-type]
                    dst.append(pool.scalars[slot][1])
                except Exception as exc:
                    acc_kind = NONE
                    errors = (errors or []) + [_hook_error("train_accuracy", exc)]
            if cfg.track_batch_stats and counts is None:
                counts_kind = IN_AUX
                if not plan.labels_fit:
                    counts_kind = IN_EXTRA
                    try:
                        extra_values = {"label_counts": metrics.label_counts(labels.detach().cpu())}
                    except Exception as exc:
                        errors = (errors or []) + [_hook_error("batch_stats", exc)]
                        counts_kind = NONE
        elif cfg.track_batch_stats and counts is None and labels is not None:
            try:  # a list of class ids, say: counted here (rare, and not a tensor op we can defer)
                extra_values = {"label_counts": metrics.label_counts(torch.as_tensor(labels))}
                counts_kind = IN_EXTRA
            except Exception as exc:
                errors = (errors or []) + [_hook_error("batch_stats", exc)]
        if batch_size < 0 and batch is not None and counts is None:
            try:
                size = metrics.batch_size_of(batch, cfg.label_key, cfg.input_keys)
                batch_size = -1 if size is None else size
            except Exception as exc:
                errors = (errors or []) + [_hook_error("batch_size", exc)]
        if counts is not None:
            src.append(counts)
            dst.append(pool.counts[slot])
            counts_kind = IN_SLOT
        lrs = None
        if cfg.track_learning_rates and optimizer is not None:
            try:
                lrs = [float(g["lr"]) for g in optimizer.param_groups]
            except Exception as exc:
                errors = (errors or []) + [_hook_error("learning_rates", exc)]
        torch._foreach_copy_(dst, src, non_blocking=self._on_cuda)
        if plan is not None and aux_src and not plan.same_device:
            torch._foreach_copy_(plan.views[slot], aux_src, non_blocking=True)
        if errors or extra_values:
            extra_dict = dict(plan.extra) if plan is not None else {}
            extra_dict.update(extra_values or {})
            if errors:
                extra_dict["errors"] = errors
            extra = pickle.dumps(extra_dict, pickle.HIGHEST_PROTOCOL)
        else:
            extra = plan.extra_bytes if plan is not None else b""
        seq = self._seq
        self._seq += 1
        self._taken += 1
        dropped_before = self._dropped_since
        self._dropped_since = 0
        write_header(self._headers, slot, seq, batch_idx, epoch, time.time(), (time.perf_counter() - t0) * 1000.0,
                     dropped_before, self._dropped, batch_size, self._groups_version, grads, loss_kind, acc_kind,
                     counts_kind, loss_value, lrs, extra)
        if self._handoff is not None:
            # CUDA: the copies above are still in flight; the hand-off thread waits on this
            # event (off the training thread) before it publishes the slot.
            event = torch.cuda.Event()
            event.record()
            self._handoff.submit(event, slot)
            self._unsent_slot = None
        elif self._processor is not None:  # mode: sync
            if self._on_cuda:  # the copies into the slot are asynchronous: wait for them (sync mode)
                torch.cuda.current_stream().synchronize()
            self._unsent_slot = None  # process() releases it, even when it fails
            self._processor.write(self._processor.process(read_header(self._headers, slot), pool.channel.release))
        else:
            pool.channel.publish(slot)
            self._unsent_slot = None

    def _plan_aux(self, key: tuple[Any, ...], labels: torch.Tensor, outputs: torch.Tensor | None) -> _AuxPlan:
        """Where this shape of labels/outputs goes in each slot's aux bytes (once per shape)."""
        assert self._pool is not None
        if len(self._aux_plans) > 64:  # shapes that never repeat (e.g. variable sequence lengths)
            self._aux_plans.clear()
        batch_size = int(labels.shape[0]) if labels.dim() > 0 else -1
        lab_bytes = labels.numel() * labels.element_size()
        out_bytes = outputs.numel() * outputs.element_size() if outputs is not None else 0
        out_at = (lab_bytes + 63) // 64 * 64
        labels_fit = lab_bytes <= AUX_BYTES
        outputs_fit = outputs is not None and labels_fit and out_at + out_bytes <= AUX_BYTES
        extra: dict[str, Any] = {}
        views: list[list[torch.Tensor]] = [[] for _ in self._pool.aux]
        if labels_fit:
            specs: list[tuple[str, int, torch.Tensor]] = [("labels", 0, labels)]
            if outputs_fit and outputs is not None:
                specs.append(("outputs", out_at, outputs))
            for name, offset, t in specs:
                extra[name] = (offset, str(t.dtype).removeprefix("torch."), tuple(t.shape))
            views = [[aux_view(self._pool.aux[i], offset, t.dtype, t.shape) for _, offset, t in specs]
                     for i in range(len(self._pool.aux))]
        if outputs_fit:
            accuracy_kind = IN_AUX
        elif outputs is not None:
            accuracy_kind = IN_SLOT  # too big to copy: accuracy as a 0-d tensor, copied into scalars[1]
        else:
            accuracy_kind = NONE
        device = self._layout.sources[0].device if self._layout and self._layout.sources else torch.device("cpu")
        same_device = labels.device == device and (not outputs_fit or outputs.device == device)  # type: ignore[union-attr]
        plan = _AuxPlan(batch_size=batch_size, labels_fit=labels_fit, outputs=outputs_fit, accuracy_kind=accuracy_kind,
                        views=views, same_device=same_device,
                        extra=extra, extra_bytes=pickle.dumps(extra, pickle.HIGHEST_PROTOCOL) if extra else b"")
        self._aux_plans[key] = plan
        return plan

    def _acquire_slot(self) -> int | None:
        channel = self._channel
        assert channel is not None
        slot = channel.acquire()
        if slot is not None or self.config.on_full == "drop":
            return slot
        deadline = time.monotonic() + self.config.block_timeout_s
        while slot is None and time.monotonic() < deadline:
            if self._proc is not None and not self._proc.is_alive():
                return None
            time.sleep(0.0005)
            slot = channel.acquire()
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
def _hook_error(where: str, exc: BaseException) -> dict[str, str]:
    """A record's ``errors`` entry for a metric that failed in the hook (same shape as the worker's)."""
    return {"where": where, "type": type(exc).__name__, "message": str(exc)}


@dataclass
class _AuxPlan:
    """How one shape of (labels, outputs) is copied into the slots' aux bytes (Telemetry._plan_aux)."""

    batch_size: int
    labels_fit: bool  # labels are copied; else counted in the hook
    outputs: bool  # outputs are copied too (the worker computes accuracy from both)
    accuracy_kind: int
    views: list[list[torch.Tensor]]  # per slot: the aux views labels (and outputs) are copied into
    same_device: bool  # copied in the hook's one fused copy; else in a second one
    extra: dict[str, Any]  # the aux layout, for the header
    extra_bytes: bytes  # ... pickled once


class _HandOff:
    """CUDA only: a thread that waits for each snapshot's copies, then publishes its slot.

    Waiting on the event here (it releases the GIL) keeps the training thread free of
    device syncs; the hook itself only records the event.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._pending: queue.SimpleQueue[tuple[Any, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-handoff", daemon=True)
        self._thread.start()

    def submit(self, event: Any, slot: int) -> None:
        self._pending.put((event, slot))

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            event, slot = item
            try:
                event.synchronize()
                self._channel.publish(slot)
            except Exception as exc:  # keep the thread alive: one failed snapshot is one record lost
                warnings.warn(f"train-telemetry: hand-off failed: {exc}", RuntimeWarning, stacklevel=1)

    def close(self, deadline: float) -> None:
        self._pending.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))


def _watch_exit(telemetry: Telemetry, sentinel: int) -> None:
    """Set ``telemetry._worker_exited`` when the worker ends, from a thread that sleeps until then.

    The hook then tests a flag instead of asking the OS (``Process.is_alive`` is a waitpid
    system call: ~25 us of a collection step). The thread holds only a weak reference.
    """
    ref = weakref.ref(telemetry)

    def watch() -> None:
        with contextlib.suppress(Exception):
            multiprocessing.connection.wait([sentinel])
        t = ref()
        if t is not None:
            t._worker_exited = True

    threading.Thread(target=watch, name="train-telemetry-watch", daemon=True).start()


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

