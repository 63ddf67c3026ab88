"""Telemetry: the object users hold, and its state machine (new -> running -> stopped).

Runs in: the training process. The hook (``on_batch_end``) is the hot path: between
collections it costs one attribute test and a modulo; at a collection it lets the
distribution strategy run the ranks' collective (distributed.py), fills a shared slot
(collect.py) and hands it to the sink (sinks.py: the worker process, or inline in sync
mode). It asks neither which one it has. It never raises into training, and never waits
on the worker unless the user asked for ``on_full: block`` (and then at most
``block_timeout_s``). Everything that can fail is done in ``start()`` (model_setup.py,
rundir.py); see NOTE [worker lifecycle] in worker.py for the data flow.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .background import Background, set_up_from_hook, start_from_hook
from .batches import BatchFormat, merge_batches
from .budget import OverheadBudget
from .clipping import PreClip, clip_grad_norm
from .collect import Collector
from .config import TelemetryConfig, TelemetryConfigError
from .distributed import Local, Strategy, agree_on_start, open_strategy
from .groups import ParamGroups
from .metrics import Metric, all_needs, resolve_metrics
from .model_setup import Optimizers, as_list, holdout_format, set_up_model
from .records import CHECKPOINT_FILE
from .rundir import Resume, RunDir, StepClock, run_info
from .signals import track
from .sinks import Sink, open_sink, resolve_mode, take_slot
from .snapshot import build_layout, unwrap_model
from .summary import Counts, TelemetrySummary, empty_summary, summarize
from .worker_handle import TelemetryStartError, describe_exit

__all__ = ["Telemetry", "TrainingTelemetry", "TelemetrySummary", "TelemetryStartError"]

# States of a Telemetry object.
_NEW, _RUNNING, _STOPPED, _DISABLED = "new", "running", "stopped", "disabled"


class Telemetry:
    """Collects gradient norms, weight deltas, LRs, holdout predictions, batch balance and
    any :class:`~train_telemetry.Metric` you add.

    >>> telemetry = Telemetry(TelemetryConfig(output_dir="runs/x/telemetry"))
    >>> telemetry.set_holdout_data(val_batches)
    >>> telemetry.start(model, optimizer)          # or [opt_a, opt_b]
    >>> ... telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch)
    >>> summary = telemetry.stop()
    """

    def __init__(self, config: TelemetryConfig | Mapping[str, Any] | None = None,
                 forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None, metrics: Sequence[Metric] = ()) -> None:
        if config is None:
            config = TelemetryConfig()
        elif isinstance(config, Mapping):
            config = TelemetryConfig.from_dict(dict(config))
        elif not isinstance(config, TelemetryConfig):
            raise TypeError(f"config must be a TelemetryConfig or a dict, not {type(config).__name__}")
        self.config = config
        self.forward_fn = forward_fn
        self.metrics = resolve_metrics(config, metrics)  # raises for a bad user metric, now
        self.needs = all_needs(self.metrics)
        self._every = config.collect_every_n
        self._collecting = False  # the hot path's only test besides the modulo
        self._state = _NEW
        self._forked_child = False
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._holdout: Any = None
        self._holdout_format: BatchFormat | None = None
        self._summary: TelemetrySummary | None = None
        self.output_dir: Path | None = Path(config.output_dir) if config.output_dir else None
        # Where records are built: "async" (the worker) or "sync" (inline), config.mode with
        # "auto" resolved at start() (sinks.resolve_mode), and why.
        self.mode: str = config.mode
        self.mode_reason = ""
        self.records_file: Path | None = None
        self._dist: Strategy = Local()  # how the ranks share a collection (distributed.py): set by start()
        self._rundir: RunDir | None = None
        self._resume = Resume()
        self._sink: Sink | None = None  # None on a rank that records nothing
        self._collector: Collector | None = None  # set once the model is set up
        self._late_setup: Background | None = None  # the model the first on_batch_end brought, set up
        self._auto_start: Background | None = None  # start() run by the first on_batch_end
        self._auto_start_tried = False
        self._pre_clip: PreClip | None = None  # kept by clip_grad_norm_ for the next collection
        self._worker_dead = False
        self._groups = ParamGroups()
        self._seq = 0
        self._clock = StepClock()
        self._counts = Counts()
        self._budget: OverheadBudget | None = None
        self._unsent_slot: int | None = None  # taken by the hook, not yet handed to the sink
        self._ordinal = 0  # due collection steps so far (drops included): the same on every rank

    # ------------------------------------------------------------------ public API
    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None in sync mode or before start)."""
        return self._sink.worker_pid if self._sink is not None else None

    @property
    def snapshots_dropped(self) -> int:
        return self._counts.dropped

    def set_holdout_data(self, holdout_data: Any) -> None:
        """The fixed examples to track: one batch or a list of batches (dicts, tuples, HF dicts).

        Keeps the first ``holdout_size`` examples (rows), not batches.
        """
        self._holdout = merge_batches(holdout_data, self.config.holdout_size)
        if self._state == _RUNNING and self._collector is not None:
            self._warn_once("holdout_late", "set_holdout_data after start() with a model is ignored: call it before start()")

    def start(self, model: torch.nn.Module | None = None, optimizer: Optimizers = None) -> Telemetry:
        """Start collecting. With ``model`` (and ``optimizer``: one or a list), everything is ready before training.

        Raises :class:`TelemetryConfigError` / :class:`TelemetryStartError` for anything that
        would make collection fail later: after ``start()`` returns, nothing raises.
        """
        auto = self._auto_start
        if auto is not None and auto.elsewhere:
            auto.join()  # the first hook is starting it (bounded by start()'s own timeouts)
            if self._state == _RUNNING:
                return self  # started already, with the model and optimizer the hook was given
        with self._lock:
            if self._state == _RUNNING:
                raise RuntimeError("Telemetry.start() called twice: it is already running; call stop() first")
            if self._state == _STOPPED:
                raise RuntimeError("Telemetry.start() after stop(): create a new Telemetry object for a new run")
            if not self.config.enabled:
                self._state = _DISABLED
                return self
            error: Exception | None = None
            try:
                self._start(model, as_list(optimizer))
            except Exception as exc:
                error = exc
            except BaseException:
                self._abort_start()
                raise
            error = agree_on_start(error)
            if error is not None:
                self._abort_start()
                raise error
            self._state = _RUNNING
            budget = self.config.effective_overhead_budget
            if budget is not None and self._sink is not None:
                self._budget = OverheadBudget(budget, lambda: self.worker_pid)
            self._collecting = True
            track(self, self._atexit_stop)  # forked children, the interpreter's exit, SIGTERM (signals.py)
        return self

    def _abort_start(self) -> None:
        self._collecting = False
        if self._sink is not None:
            self._sink.abort()
        self._dist.close()

    def on_batch_end(self, model: torch.nn.Module, optimizer: Optimizers, batch_idx: int, epoch: int = 0,
                     device: Any = None, batch: Any = None, *, loss: torch.Tensor | float | None = None,
                     outputs: Any = None, extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Call after ``optimizer.step()``. A no-op except every ``collect_every_n`` steps.

        ``extra``: more top-level record keys, each a dict of numbers, written as given.
        """
        if not self._collecting:
            self._idle_hook(model, optimizer, batch_idx)
            return
        if batch_idx < (clock := self._clock).last_batch:  # the record's step: rundir.StepClock
            clock.went_back(epoch)
        clock.last_batch = batch_idx
        if (budget := self._budget) is not None:
            budget.tick()  # every call: the budget measures step times (NOTE [measured overhead])
        if batch_idx % self._every:
            return
        taken, t0 = self._counts.taken, time.perf_counter()
        try:
            # Grad mode off: outputs, loss (and create_graph grads) require grad; copying them
            # must build no graph. The C call, not `with torch.no_grad()`: 11 vs 27 us from the
            # hook's entry to its first line at a collection step (conv, in the loop).
            grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                self._collect(model, optimizer, batch_idx, epoch, batch, loss, outputs, extra)
            finally:
                torch._C._set_grad_enabled(grad_mode)
                if budget is not None:
                    budget.collected(time.perf_counter() - t0, self._counts.taken != taken)
        except Exception as exc:  # never let telemetry crash training
            self._counts.hook_errors += 1
            if self._unsent_slot is not None and self._sink is not None:
                self._sink.release(self._unsent_slot)  # else a repeated failure leaks every slot
                self._unsent_slot = None
            self._warn_once(f"hook:{type(exc).__name__}", f"telemetry collection failed and was skipped: {type(exc).__name__}: {exc}")

    def clip_grad_norm_(self, parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                        norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_``, same arguments and return value (bit for bit), that
        also keeps each parameter's pre-clip norm for the next collection.

        The record then holds ``gradient_norm_pre_clip`` ({overall, <group>...}, before clipping)
        and ``gradient_clipping`` ({max_norm, pre_clip_norm}) beside ``gradient_norm`` (what the
        optimizer applied): a loop that clips at 1.0 still shows its gradient spikes. It costs
        what torch's own call costs: the norms it keeps are the ones the clip computes.
        """
        total, pre = clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
        if self._collecting:
            self._pre_clip = pre  # read (and cleared) by the next collection
        return total

    def stop(self, timeout: float | None = None) -> TelemetrySummary:
        """Write everything collected so far, end the worker, return the summary.

        Returns within ``timeout`` (default ``stop_timeout_s``) plus a short grace for
        terminating a worker that does not finish. Calling it again returns the same summary.
        """
        if self._forked_child or os.getpid() != self._owner_pid:
            # Before the lock: a fork may have copied it while another thread held it.
            return self._empty_summary()
        if self._auto_start is not None:  # started by the first hook: let it finish, so what it collects is written
            self._auto_start.join(self.config.stop_timeout_s if timeout is None else timeout)
        with self._lock:
            if self._summary is not None:
                return self._summary
            if self._state in (_NEW, _DISABLED):
                self._state = _STOPPED
                self._summary = self._empty_summary()
                return self._summary
            self._collecting = False
            self._state = _STOPPED
            if self._budget is not None:
                self._counts.overhead = self._budget.close()
            deadline = time.monotonic() + (self.config.stop_timeout_s if timeout is None else timeout)
            if self._late_setup is not None:
                self._late_setup.join(max(0.0, deadline - time.monotonic()))
            self._summary = self._shutdown(deadline)
            with contextlib.suppress(Exception):
                atexit.unregister(self._atexit_stop)
            if self._rundir is not None and self._dist.info.writes:
                with contextlib.suppress(OSError):
                    self._rundir.write_summary(self._summary.to_dict())
            return self._summary

    def __enter__(self) -> Telemetry:
        if self._state == _NEW:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()  # returns None: the user's exception, if any, propagates

    # ------------------------------------------------------------------ start
    def _start(self, model: torch.nn.Module | None, optimizers: list[torch.optim.Optimizer]) -> None:
        cfg = self.config
        self._dist = open_strategy(cfg, model, self.needs, self._warn_once)
        self._dist.at_start(model)  # first: its collectives must run on every rank
        if self.output_dir is None:
            raise TelemetryConfigError(
                "output_dir is not set: set telemetry.output_dir in the config (or TelemetryConfig(output_dir=...))"
            )
        self._holdout_format = holdout_format(cfg, self._holdout, self.forward_fn)
        info = self._dist.info
        if not info.writes:
            return  # a non-writing rank: the hook only joins the collective (and copies its shards)
        self._rundir = RunDir(self.output_dir, info.rank, info.world_size, cfg.per_rank)
        self.records_file = self._rundir.records
        inner = unwrap_model(model) if model is not None else None
        signature = build_layout(inner).signature() if inner is not None else None
        self._resume = self._rundir.begin(cfg.overwrite, cfg.to_dict(), signature)
        # seq and step count on across the segments of a resumed run
        self._seq, self._clock = self._resume.first_seq, self._resume.clock
        self.mode, self.mode_reason = resolve_mode(cfg, inner)
        self._sink = open_sink(self.mode, cfg, self.output_dir, self._rundir.records)
        if model is not None:
            self._setup_model(model, optimizers, init_reference=True)
        self._write_run_info()

    def _setup_model(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], init_reference: bool) -> None:
        assert self._sink is not None
        self._collector = set_up_model(
            self.config, self.metrics, self.needs, model, optimizers, sink=self._sink, strategy=self._dist,
            groups=self._groups, holdout=self._holdout, fmt=self._holdout_format, forward_fn=self.forward_fn,
            segment=self._resume.segment, init_reference=init_reference,
            checkpoint_name=self._rundir.checkpoint.name if self._rundir else CHECKPOINT_FILE)

    def _write_run_info(self) -> None:
        assert self._rundir is not None
        collector, info = self._collector, self._dist.info
        layout = collector.layout if collector is not None else None
        self._rundir.write_run_info(run_info(
            config=self.config.to_dict(), resume=self._resume, metrics=[m.key for m in self.metrics],
            model=layout.signature() if layout else None, slot_bytes=layout.nbytes if layout else None,
            groups=self._groups.sizes(layout.params) if layout is not None and self._groups.names else {},
            num_params=sum(p.numel() for p in layout.params) if layout else None,
            slot_meta_bytes=collector.pool.meta[0].numel() if collector else None, worker_pid=self.worker_pid,
            mode=self.mode, mode_reason=self.mode_reason, rank=info.rank, world_size=info.world_size,
            global_batch_stats=info.global_batch))

    # ------------------------------------------------------------------ the hook
    def _idle_hook(self, model: Any, optimizer: Optimizers, batch_idx: int) -> None:
        if self._forked_child or self._state == _DISABLED:
            return
        if self._state == _NEW:
            if not self._auto_start_tried:  # the seed's integration example never calls start()
                self._auto_start_tried = True
                self._auto_start = start_from_hook(model, as_list(optimizer), self.start,
                                                   lambda: self._state == _STOPPED, self._warn_once)
                if self._auto_start is not None:
                    atexit.register(self._atexit_stop)  # a script that never calls stop() still gets its records
            if self._auto_start is not None and not batch_idx % self._every:
                self._counts.drop()  # due while telemetry starts: counted, as every collection not taken is
        elif self._state == _STOPPED:
            self._warn_once("after_stop", "on_batch_end() after stop(): nothing is collected any more")

    def _collect(self, model: torch.nn.Module, optimizer: Optimizers, batch_idx: int, epoch: int, batch: Any,
                 loss: Any, outputs: Any, extra: Mapping[str, Mapping[str, Any]] | None) -> None:
        t0 = time.perf_counter()
        ordinal = self._ordinal
        self._ordinal += 1
        # Every rank, every due collection, before anything below may return; never raises
        # before the ranks' collective (distributed.py).
        shared = self._dist.at_collection(ordinal, batch, loss, outputs)
        if shared is None:  # a rank that records nothing: it joined the collective (and copied its shards)
            return
        counts, budget = self._counts, self._budget
        if budget is not None and budget.skips(batch_idx // self._every):  # after the collective: the
            counts.skip()  # other ranks met us there (only rank 0 has a budget)
            return
        sink, collector = self._sink, self._collector
        assert sink is not None  # a rank that records has a sink
        if sink.exited:  # set by the worker handle's watcher thread: no system call here
            self._on_worker_dead()
            counts.drop()
            return
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else as_list(optimizer)
        if collector is None:  # start() had no model: set up off the hook, drop until ready
            collector = self._setup_later(model, optimizers)
            if collector is None:
                counts.drop()
                return
        if optimizers and self._groups.update(optimizers, collector.layout.params):
            sink.send_groups(self._groups.message())  # before the snapshot that names the new version
        slot = take_slot(sink, self.config)
        if slot is None:
            counts.drop()
            return
        self._unsent_slot = slot  # on_batch_end releases it if we fail before it is submitted
        pre_clip, self._pre_clip = self._pre_clip, None
        fill = collector.fill(slot, model, optimizers, batch, loss, outputs, shared, pre_clip)
        seq, self._clock.resumed_epoch = self._seq, None  # a resumed run's first drop is read by now
        self._seq += 1
        counts.taken += 1
        dropped_before, counts.dropped_since = counts.dropped_since, 0
        collector.publish_header(slot, fill, seq=seq, ordinal=ordinal, batch_idx=batch_idx, epoch=epoch, t0=t0,
                                 step=self._clock.offset + batch_idx,
                                 dropped_before=dropped_before, dropped_total=counts.dropped,
                                 groups_version=self._groups.version, optimizers=optimizers, model=model,
                                 values=dict(extra) if extra else None)
        self._unsent_slot = None  # the sink releases it from here on, even when it fails
        sink.submit(slot, seq)
        if fill.errors:
            for e in fill.errors:
                self._warn_once(f"fill:{e['where']}", f"{e['where']} could not be collected ({e['type']}: "
                                f"{e['message']}); recorded in the record's errors")

    def _setup_later(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> Collector | None:
        """Set up the model on a thread (background.py); the collector once ready. Only ``on_full:
        block`` (every collection, at the cost of waiting) waits for it, at most ``block_timeout_s``."""
        if self._late_setup is None:
            self._late_setup = set_up_from_hook(model, lambda: self._set_up_late(model, optimizers), self._warn_once)
        if self.config.on_full == "block":
            self._late_setup.join(self.config.block_timeout_s)
        return self._collector

    def _set_up_late(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        self._setup_model(model, optimizers, init_reference=False)
        self._write_run_info()

    def _on_worker_dead(self) -> None:
        if self._worker_dead or self._sink is None:
            return
        self._worker_dead = True
        self._warn_once("worker_dead", f"the telemetry worker (pid {self.worker_pid}) exited unexpectedly with "
                        f"{describe_exit(self._sink.worker_exitcode)}; training continues without telemetry, "
                        "later collections are counted as dropped")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"train-telemetry: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ stop
    def _shutdown(self, deadline: float) -> TelemetrySummary:
        t0 = time.monotonic()
        self._dist.close()
        if self._sink is None:  # a rank that records nothing: no worker, no files, nothing to lose
            summary = self._empty_summary()
            summary.hook_errors = self._counts.hook_errors
            return summary
        finished = self._sink.close(deadline)
        return summarize(finished, self.mode, self.output_dir, self.records_file, self._counts,
                         segment=self._resume.segment, seconds=time.monotonic() - t0)

    @property
    def sigterm_drain_s(self) -> float:
        return self.config.sigterm_drain_s if self._state == _RUNNING else 0.0

    def drain_for_signal(self, deadline: float) -> None:
        """stop() from the SIGTERM handler: never waits for the lock the interrupted code may hold."""
        if self._forked_child or os.getpid() != self._owner_pid or self.sigterm_drain_s <= 0:
            return
        if not self._lock.acquire(timeout=0.05):
            return  # interrupted inside start()/stop(): stop() is already running
        self._lock.release()
        self.stop(timeout=max(0.0, deadline - time.monotonic()))

    def after_fork(self) -> None:
        """In a forked child (e.g. a DataLoader worker), which must never touch the parent's
        queues or slots: the hook becomes a no-op and stop() does nothing."""
        self._forked_child = True
        self._collecting = False

    def _atexit_stop(self) -> None:
        # The interpreter is exiting without stop(): flush what is queued, bounded in time.
        if self._forked_child or os.getpid() != self._owner_pid:
            return
        with contextlib.suppress(Exception):
            self.stop(timeout=min(self.config.stop_timeout_s, 10.0))

    def _empty_summary(self) -> TelemetrySummary:
        return empty_summary(self.mode, self.output_dir)


TrainingTelemetry = Telemetry  # the seed's name for the same class

