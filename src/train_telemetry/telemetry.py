"""Telemetry: the object users hold, and its state machine (new -> running -> stopped).

Runs in: the training process. The hook (``on_batch_end``) is the hot path: between
collections it costs one attribute test and a modulo; at a collection it fills a shared
slot (collect.py) and hands it to the sink (sinks.py: the worker process, or inline in
sync mode). It never raises into training, and never waits on the worker unless the
user asked for ``on_full: block`` (and then at most ``block_timeout_s``). Everything that
can fail is done in ``start()``; see NOTE [worker lifecycle] in worker.py for the data flow.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .batches import BatchFormat, BatchFormatCache, merge_batches, slice_batch
from .budget import OverheadBudget
from .clipping import PreClip, clip_grad_norm
from .collect import Collector, global_counts
from .config import TelemetryConfig, TelemetryConfigError
from .distributed import DistInfo, agree_on_start, detect_distributed
from .groups import ParamGroups
from .messages import Setup
from .metrics import Metric, all_needs, resolve_metrics
from .metrics.holdout import HoldoutForward
from .rundir import Resume, RunDir
from .sending import locate_unpicklable
from .shards import (
    ShardPlan,
    ShardSync,
    has_dtensor_params,
    plain_skeleton,
    plain_type_name,
    plan_shards,
    unsupported_sharding,
)
from .signals import install_sigterm_drain
from .sinks import Sink, open_sink, resolve_mode
from .snapshot import Layout, SlotPool, build_layout, model_on_slot, unwrap_model
from .summary import TelemetrySummary, empty_summary, summarize
from .worker_handle import TelemetryStartError, describe_exit

__all__ = ["Telemetry", "TrainingTelemetry", "TelemetrySummary", "TelemetryStartError"]

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


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


def as_list(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    """One optimizer, a list of them, or None, as a list."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


class Telemetry:
    """Collects gradient norms, weight deltas, LRs, holdout predictions, batch balance and
    any :class:`~train_telemetry.Metric` you add.

    >>> telemetry = Telemetry(TelemetryConfig(output_dir="runs/x/telemetry"))
    >>> telemetry.set_holdout_data(val_batches)
    >>> telemetry.start(model, optimizer)          # or [opt_a, opt_b]
    >>> ... telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch)
    >>> summary = telemetry.stop()
    """

    def __init__(
        self,
        config: TelemetryConfig | Mapping[str, Any] | None = None,
        forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        metrics: Sequence[Metric] = (),
    ) -> None:
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
        self._dist = DistInfo()
        self._rundir: RunDir | None = None
        self._resume = Resume()
        self._sink: Sink | None = None
        self._collector: Collector | None = None  # set once the model is set up
        self._setup_thread: threading.Thread | None = None
        self._auto_start: threading.Thread | None = None  # start() run by the first on_batch_end
        self._auto_start_tried = False
        self._pre_clip: PreClip | None = None  # kept by clip_grad_norm_ for the next collection
        self._layout: Layout | None = None
        self._worker_dead = False
        self._groups = ParamGroups()
        self._seq = 0
        self._taken = 0
        self._dropped = 0
        self._dropped_since = 0
        self._hook_errors = 0
        self._skipped = 0
        self._budget: OverheadBudget | None = None
        self._unsent_slot: int | None = None  # taken by the hook, not yet handed to the sink
        self._ordinal = 0  # due collection steps so far (drops included): the same on every rank
        self._plan: ShardPlan | None = None  # FSDP2: how the ranks' shards make the full tensors
        self._shard_sync: ShardSync | None = None  # FSDP2: the collection step's collective

    # ------------------------------------------------------------------ public API
    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid (None in sync mode or before start)."""
        worker = getattr(self._sink, "worker", None)
        return worker.pid if worker is not None else None

    @property
    def snapshots_dropped(self) -> int:
        return self._dropped

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
        if auto is not None and auto is not threading.current_thread():
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
            _live.add(self)
            atexit.register(self._atexit_stop)
            if self.config.sigterm_drain_s > 0:
                install_sigterm_drain(lambda: [t for t in list(_live) if t._state == _RUNNING])
        return self

    def _abort_start(self) -> None:
        self._collecting = False
        if self._sink is not None:
            self._sink.abort()
        if self._shard_sync is not None:
            self._shard_sync.close()

    def on_batch_end(
        self,
        model: torch.nn.Module,
        optimizer: Optimizers,
        batch_idx: int,
        epoch: int = 0,
        device: Any = None,
        batch: Any = None,
        *,
        loss: torch.Tensor | float | None = None,
        outputs: Any = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Call after ``optimizer.step()``. A no-op except every ``collect_every_n`` steps.

        ``extra``: more top-level record keys, each a dict of numbers (e.g. what an
        integration knows about clipping), written as given.
        """
        if not self._collecting:
            self._idle_hook(model, optimizer, batch_idx)
            return
        if batch_idx % self._every:
            return
        budget = self._budget
        if budget is not None:
            budget.due += 1
            if self._skip_for_budget(batch_idx):
                self._ordinal += 1
                return
        t0 = time.perf_counter()
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
                    budget.hook_seconds += time.perf_counter() - t0
        except Exception as exc:  # never let telemetry crash training
            self._hook_errors += 1
            if self._unsent_slot is not None and self._sink is not None:
                self._sink.channel.release(self._unsent_slot)  # else a repeated failure leaks every slot
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
        if self._auto_start is not None and self._auto_start is not threading.current_thread():
            # started by the first hook: let it finish, so what it collects is written
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
                self._budget.close()
            deadline = time.monotonic() + (self.config.stop_timeout_s if timeout is None else timeout)
            if self._setup_thread is not None:
                self._setup_thread.join(max(0.0, deadline - time.monotonic()))
            self._summary = self._shutdown(deadline)
            with contextlib.suppress(Exception):
                atexit.unregister(self._atexit_stop)
            if self._rundir is not None and self._dist.writes:
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
        self._dist, note = detect_distributed(cfg)
        if note:
            self._warn_once("dist_late", note)
        if model is not None and (problem := unsupported_sharding(unwrap_model(model))) is not None:
            raise TelemetryConfigError(problem)
        if model is not None and has_dtensor_params(model):
            self._plan_sharded(model)  # first: its collective must run on every rank
        if self.output_dir is None:
            raise TelemetryConfigError(
                "output_dir is not set: set telemetry.output_dir in the config (or TelemetryConfig(output_dir=...))"
            )
        self._holdout_format = self._resolve_holdout()
        if not self._dist.writes:
            return  # a non-writing rank: the hook only joins the collective (and copies its shards)
        self._rundir = RunDir(self.output_dir, self._dist.rank, self._dist.world_size, cfg.per_rank)
        self._rundir.check_writable()
        self.records_file = self._rundir.records
        self._resume = self._rundir.resume(cfg.overwrite)
        signature = [[spec.name, list(spec.shape), spec.dtype]
                     for spec in build_layout(unwrap_model(model), self._plan is not None).specs] \
            if model is not None else None
        self._rundir.check_same_run(self._resume, cfg.to_dict(), signature)
        self._seq = self._resume.first_seq  # seq counts on across the segments of a resumed run
        for stale in (self._rundir.checkpoint, self._rundir.checkpoint.with_name(self._rundir.checkpoint.name + ".ok")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # a stale reference would fake a delta
        self.mode, self.mode_reason = resolve_mode(cfg, unwrap_model(model) if model is not None else None)
        self._sink = open_sink(self.mode, cfg, self.output_dir, self._rundir.records)
        if model is not None:
            self._setup_model(model, optimizers, init_reference=True)
        self._write_run_info()

    def _plan_sharded(self, model: torch.nn.Module) -> None:
        """FSDP2: agree with the other ranks on how the shards make the full tensors (docs/distributed.md)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise TelemetryConfigError(
                "the model has DTensor parameters but torch.distributed is not initialised: "
                "call start() on every rank after init_process_group and fully_shard")
        inner = unwrap_model(model)
        plan = plan_shards(list(inner.named_parameters()) + list(inner.named_buffers()), self.config.num_slots)
        if isinstance(plan, Exception):
            raise plan
        if self.config.per_rank:
            raise TelemetryConfigError(
                "per_rank: true with a sharded (FSDP2) model would record each rank's shard, not the model: "
                "remove per_rank; rank 0 records the exact global values")
        if not plan.same_host and "weights" in self.needs:
            self._warn_once("shards_hosts", f"the ranks run on {plan.hosts} hosts: weight metrics (norms, deltas, "
                            "holdout) of a sharded model are recorded on one host only; records say why they are absent")
        self._plan = plan
        self._dist.formats = self._dist.formats or BatchFormatCache(
            self.config.input_keys, self.config.label_key, self.config.keys_are_default, need_inputs=False)
        # Ranks > 0 make their shard files now, so rank 0's worker finds them at its setup;
        # a failure (a full /dev/shm on one node) fails start() on every rank.
        error = None
        if self._dist.rank > 0:
            try:
                self._setup_shard_rank(model)
            except Exception as exc:
                error = exc
        error = agree_on_start(error)
        if error is not None:
            raise error

    def _setup_shard_rank(self, model: torch.nn.Module) -> None:
        """FSDP2, a rank > 0: the collective, and a shard file rank 0's worker reads (same host)."""
        plan = self._plan
        assert plan is not None
        layout = build_layout(unwrap_model(model), sharded=True)
        self._layout = layout
        sync = ShardSync(layout.params, plan, self._dist.rank, self._dist.count_device, self._dist.formats,
                         want_counts=self._dist.global_batch)
        if "weights" in self.needs and plan.same_host:
            sync.open_file(self._dist.rank)
            if "weight_deltas" in self.needs:  # rank 0's first reference: every rank's shards at start
                sync.copy_shards(-1, layout.live_sources())
        self._shard_sync = sync

    def _resolve_holdout(self) -> BatchFormat | None:
        """The holdout's format (raises with its structure and the fix), or None without one."""
        if self._holdout is None or not self.config.track_holdout_logits:
            return None
        cfg = self.config
        batch = self._holdout
        if cfg.keys_are_default and isinstance(batch, Mapping):
            # Some of the seed's keys but not all: a seed-style batch with a key missing.
            wanted = [*cfg.input_keys, cfg.label_key]
            missing = [k for k in wanted if k not in batch]
            if missing and len(missing) < len(wanted) and (self.forward_fn is None or cfg.label_key in missing):
                raise TelemetryConfigError(
                    f"the holdout batches lack key(s) {missing} (they have {sorted(map(str, batch))}): "
                    "set input_keys/label_key in the config to your batch's keys, or pass forward_fn")
        try:
            return BatchFormat.resolve(self._holdout, cfg.input_keys, cfg.label_key, cfg.keys_are_default,
                                       need_inputs=self.forward_fn is None)
        except TelemetryConfigError as exc:
            raise TelemetryConfigError(f"the holdout batches: {exc}") from None

    def _setup_model(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], init_reference: bool) -> None:
        """Build the slot pool and hand the sink its slots and the eval model on them (once)."""
        cfg = self.config
        sink = self._sink
        assert sink is not None
        inner = unwrap_model(model)
        layout = build_layout(inner, sharded=self._plan is not None)
        self._layout = layout
        self._update_groups(optimizers, layout)
        # Without weights to copy the slots hold no weights, but still bound how many
        # snapshots can wait for the worker: a slow or hung worker then costs drops, never memory.
        copy_weights = "weights" in self.needs
        slot_layout = layout if copy_weights else Layout(specs=[], params=layout.params, buffers=[], on_cuda=layout.on_cuda)
        pool = SlotPool(slot_layout, sink.channel, shared=self.mode == "async")
        collector = Collector(cfg, self.needs, layout, pool)
        fmt = self._holdout_format
        eval_model = None
        if "holdout" in self.needs and self._holdout is not None and copy_weights:
            try:  # sharded: a plain copy on the meta device; the worker points it at the assembled weights
                eval_model = plain_skeleton(inner) if self._plan is not None else model_on_slot(inner, pool.slots[0])
            except Exception as exc:  # deepcopy pickles what it cannot copy: name the culprit
                raise TelemetryStartError(
                    f"the model cannot be copied for the worker's holdout eval: {locate_unpicklable(inner, 'model', exc)}. "
                    "Remove what cannot be pickled from the model (open files, locks, sockets), "
                    "or set track_holdout_logits: false"
                ) from exc
        init_slot = None
        if init_reference and "weight_deltas" in self.needs:
            init_slot = sink.channel.acquire()
            assert init_slot is not None
            torch._foreach_copy_(collector.dsts[init_slot], layout.live_sources())
            if layout.on_cuda:
                torch.cuda.current_stream().synchronize()  # once, at start: not the hot path
        setup = Setup(
            specs=layout.specs if copy_weights else [],
            num_params=layout.num_params,
            slots=pool.slots if copy_weights else [],
            meta=pool.meta,
            model=eval_model,
            forward=HoldoutForward.for_model(inner, self._holdout, fmt, self.forward_fn) if eval_model is not None else None,
            holdout=self._holdout if eval_model is not None else None,
            holdout_labels=fmt.labels(self._holdout) if eval_model is not None and fmt is not None else None,
            slice_batch=slice_batch,
            init_slot=init_slot,
            groups=self._groups.message(layout.num_params),
            metrics=self.metrics,
            needs=self.needs,
            segment=self._resume.segment,
            module_types={name: plain_type_name(m) for name, m in inner.named_modules()},
            label_name=self._label_name(),
            rank=self._dist.rank,
            world_size=self._dist.world_size,
            checkpoint_name=self._rundir.checkpoint.name if self._rundir else "last_checkpoint.pt",
            shards=self._plan if copy_weights else None,
        )
        if not copy_weights:  # specs name the parameters for metrics even without weights
            setup.specs = layout.specs[: layout.num_params]
        if self._plan is not None:
            self._shard_sync = ShardSync(layout.params, self._plan, self._dist.rank, self._dist.count_device,
                                         self._dist.formats, want_counts=self._dist.global_batch)
        sink.setup(setup, layout.on_cuda)
        self._collector = collector

    def _label_name(self) -> str:
        fmt = self._holdout_format
        if fmt is not None and fmt.label_name:
            return fmt.label_name
        return str(self.config.label_key)

    def _update_groups(self, optimizers: list[torch.optim.Optimizer], layout: Layout) -> None:
        if self._groups.update(optimizers, layout.params) and self._sink is not None and self._collector is not None:
            self._sink.send_groups(self._groups.message())  # else Setup carries them

    def _write_run_info(self) -> None:
        assert self._rundir is not None
        layout = self._layout
        groups = self._groups.sizes(layout.params) if layout is not None and self._groups.names else {}
        collector = self._collector
        resume = self._resume
        segments = [*resume.segments, {"segment": resume.segment, "started": datetime.now(timezone.utc).astimezone().isoformat(),
                                       "first_seq": resume.first_seq}]
        self._rundir.write_run_info({
            "config": self.config.to_dict(),
            "segment": resume.segment,
            "segments": segments,
            "model": [[spec.name, list(spec.shape), spec.dtype] for spec in layout.specs] if layout else None,
            "metrics": [m.key for m in self.metrics],
            "groups": groups,
            "num_params": sum(p.numel() for p in layout.params) if layout else None,
            "slot_bytes": layout.nbytes if layout else None,  # weights and buffers, per slot
            # ... plus this per slot: grad norms, loss, the batch's labels and outputs
            "slot_meta_bytes": collector.pool.meta[0].numel() if collector else None,
            "worker_pid": self.worker_pid,
            "mode": self.mode,  # where records are built (mode: auto resolved) ...
            "mode_reason": self.mode_reason,  # ... and why
            "rank": self._dist.rank,
            "world_size": self._dist.world_size,
            "global_batch_stats": self._dist.global_batch,
            "torch_version": str(torch.__version__),
        })

    # ------------------------------------------------------------------ the hook
    def _idle_hook(self, model: Any, optimizer: Optimizers, batch_idx: int) -> None:
        if self._forked_child or self._state == _DISABLED:
            return
        if self._state == _NEW:
            if not self._auto_start_tried:
                self._start_in_background(model, optimizer)
            if self._auto_start is not None and not batch_idx % self._every:
                self._drop()  # due while telemetry starts: counted, as every collection not taken is
        elif self._state == _STOPPED:
            self._warn_once("after_stop", "on_batch_end() after stop(): nothing is collected any more")

    def _start_in_background(self, model: Any, optimizer: Optimizers) -> None:
        """The seed's integration example never calls start(): the first hook starts telemetry
        with the model and optimizer it is given, on a thread (training never waits for the
        worker to spawn); the collections due meanwhile are counted as dropped."""
        self._auto_start_tried = True
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # start() agrees with the other ranks through a collective: from a thread it could
            # interleave with training's own collectives.
            self._warn_once("before_start", "on_batch_end() before start() under torch.distributed: nothing "
                            "is collected; call telemetry.start(model, optimizer) on every rank before training")
            return
        if not isinstance(model, torch.nn.Module):
            self._warn_once("before_start", "on_batch_end() before start() without a model: nothing is "
                            "collected; call telemetry.start(model, optimizer) before training")
            return
        self._warn_once("before_start", "on_batch_end() before start(): telemetry starts now with the model and "
                        "optimizer given here, set up on a background thread (training does not wait; collections "
                        "due until it is ready are counted as dropped). Call telemetry.start(model, optimizer) "
                        "before training to collect from the first step and to see set-up errors there")
        optimizers = as_list(optimizer)

        def run() -> None:
            try:
                self.start(model, optimizers)
            except Exception as exc:
                if self._state != _STOPPED:
                    self._warn_once("auto_start", f"telemetry could not start ({type(exc).__name__}: {exc}); "
                                    "nothing is collected")

        self._auto_start = threading.Thread(target=run, name="train-telemetry-start", daemon=True)
        atexit.register(self._atexit_stop)  # a script that never calls stop() still gets its records
        self._auto_start.start()

    def _collect(self, model: torch.nn.Module, optimizer: Optimizers, batch_idx: int, epoch: int, batch: Any,
                 loss: Any, outputs: Any, extra: Mapping[str, Mapping[str, Any]] | None) -> None:
        t0 = time.perf_counter()
        counts = None
        ordinal = self._ordinal
        self._ordinal += 1
        reduced = None
        sync = self._shard_sync
        if sync is not None:
            # FSDP2: the one collective (every rank, every collection step; never raises
            # before it): global gradient norms, loss, accuracy and label counts.
            vec = sync.reduce(batch, loss, outputs)
            if self._sink is None:  # a rank > 0: copy its shards for rank 0's worker, done
                if sync.file is not None and self._layout is not None:
                    wait = self.config.block_timeout_s if self.config.on_full == "block" else 0.0
                    sync.copy_shards(ordinal, self._layout.live_sources(), wait)
                return
            reduced = sync.unpack(vec, want_loss=loss is not None, want_accuracy=outputs is not None)
            counts = reduced["counts"]
            if self._skip_for_budget(batch_idx, after_collective=True):
                return
        elif self._dist.global_batch:
            # DDP: every rank joins this all_reduce at every collection step, before anything
            # that depends on this rank's own state (worker dead, no free slot, an error) may
            # return: a rank that skipped it would leave the others waiting in it for good.
            # global_counts never raises. On CPU (gloo) this blocks until all ranks arrive.
            counts = global_counts(self._dist.formats, batch, self._dist.count_device)
            torch.distributed.all_reduce(counts)  # SUM; unpacked by the worker (no sync here)
            if self._skip_for_budget(batch_idx, after_collective=True):
                return
        sink, collector = self._sink, self._collector
        if sink is None:  # a DDP rank that does not write
            return
        assert sink is not None
        if sink.exited:  # set by the worker handle's watcher thread: no system call here
            self._on_worker_dead()
            self._drop()
            return
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else as_list(optimizer)
        if collector is None:  # start() had no model: set up off the hook, drop until ready
            collector = self._setup_later(model, optimizers)
            if collector is None:
                self._drop()
                return
        if optimizers and self._groups.update(optimizers, collector.layout.params):
            sink.send_groups(self._groups.message())  # before the snapshot that names the new version
        slot = self._acquire_slot()
        if slot is None:
            self._drop()
            return
        self._unsent_slot = slot  # on_batch_end releases it if we fail before it is submitted
        pre_clip, self._pre_clip = self._pre_clip, None
        fill = collector.fill(slot, model, optimizers, batch, loss, outputs, counts, reduced, pre_clip)
        seq = self._seq
        self._seq += 1
        self._taken += 1
        dropped_before, self._dropped_since = self._dropped_since, 0
        collector.publish_header(slot, fill, seq=seq, ordinal=ordinal, batch_idx=batch_idx, epoch=epoch, t0=t0,
                                 dropped_before=dropped_before, dropped_total=self._dropped,
                                 groups_version=self._groups.version, optimizers=optimizers, model=model,
                                 values=dict(extra) if extra else None)
        self._unsent_slot = None  # the sink releases it from here on, even when it fails
        sink.submit(slot, seq)
        if fill.errors:
            for e in fill.errors:
                self._warn_once(f"fill:{e['where']}", f"{e['where']} could not be collected ({e['type']}: "
                                f"{e['message']}); recorded in the record's errors")

    def _setup_later(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> Collector | None:
        """Set up the model on a thread, so the hook never waits for pickling or the worker.

        Returns the collector once ready. Only ``on_full: block`` (the user asked for every
        collection, at the cost of waiting) waits for it, at most ``block_timeout_s``.
        """
        if self._setup_thread is None:
            self._start_setup_thread(model, optimizers)
        assert self._setup_thread is not None
        if self.config.on_full == "block":
            self._setup_thread.join(self.config.block_timeout_s)
        return self._collector

    def _start_setup_thread(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:

        def run() -> None:
            try:
                if has_dtensor_params(model):
                    raise TelemetryConfigError("a sharded (FSDP2) model must be passed to start() on every rank")
                self._setup_model(model, optimizers, init_reference=False)
                if self._rundir is not None:
                    self._write_run_info()
            except Exception as exc:
                # Not self._collecting = False: under torch.distributed this rank must still
                # join the collection steps' collective; its collections count as dropped.
                self._warn_once("late_setup", f"telemetry could not set up the model given to the first "
                                f"on_batch_end ({type(exc).__name__}: {exc}); nothing more is collected. "
                                "Pass the model to start() to get this error there")

        self._setup_thread = threading.Thread(target=run, name="train-telemetry-setup", daemon=True)
        self._setup_thread.start()

    def _acquire_slot(self) -> int | None:
        sink = self._sink
        assert sink is not None
        slot = sink.acquire()
        if slot is not None or self.config.on_full == "drop":
            return slot
        # on_full: block: the sink waits (the worker uses every core meanwhile), bounded.
        return sink.wait_for_slot(time.monotonic() + self.config.block_timeout_s)

    def _drop(self) -> None:
        self._dropped += 1
        self._dropped_since += 1

    def _skip_for_budget(self, batch_idx: int, after_collective: bool = False) -> bool:
        """Over the overhead budget: skip an even share of due collections (counted as drops).

        Under torch.distributed the ranks' collective comes first (``after_collective``):
        only rank 0 has a budget, and the other ranks must still meet it there.
        """
        budget = self._budget
        if budget is None or budget.stride <= 1 or not (batch_idx // self._every) % budget.stride:
            return False
        if self._has_collective and not after_collective:
            return False
        self._skipped += 1
        self._drop()
        return True

    @property
    def _has_collective(self) -> bool:
        return self._dist.global_batch or self._shard_sync is not None

    def _on_worker_dead(self) -> None:
        if self._worker_dead:
            return
        self._worker_dead = True
        worker = getattr(self._sink, "worker", None)
        code = worker.exitcode if worker is not None else None
        self._warn_once(
            "worker_dead",
            f"the telemetry worker (pid {self.worker_pid}) exited unexpectedly with {describe_exit(code)}; "
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
        if self._sink is None:  # a DDP rank other than 0: no worker, no files, nothing to lose
            if self._shard_sync is not None:
                self._shard_sync.close()  # rank 0's worker keeps its mapping of our shard file
            summary = self._empty_summary()
            summary.hook_errors = self._hook_errors
            return summary
        finished = self._sink.close(deadline)
        return summarize(finished, self.mode, self.output_dir, self.records_file, taken=self._taken,
                         dropped=self._dropped, skipped=self._skipped, hook_errors=self._hook_errors,
                         segment=self._resume.segment, seconds=time.monotonic() - t0)

    @property
    def sigterm_drain_s(self) -> float:
        return self.config.sigterm_drain_s

    def drain_for_signal(self, deadline: float) -> None:
        """stop() from the SIGTERM handler: never waits for the lock the interrupted code may hold."""
        if self._forked_child or os.getpid() != self._owner_pid or self.config.sigterm_drain_s <= 0:
            return
        if not self._lock.acquire(timeout=0.05):
            return  # interrupted inside start()/stop(): stop() is already running
        self._lock.release()
        self.stop(timeout=max(0.0, deadline - time.monotonic()))

    def _atexit_stop(self) -> None:
        # The interpreter is exiting without stop(): flush what is queued, bounded in time.
        if self._forked_child or os.getpid() != self._owner_pid:
            return
        with contextlib.suppress(Exception):
            self.stop(timeout=min(self.config.stop_timeout_s, 10.0))

    def _empty_summary(self) -> TelemetrySummary:
        return empty_summary(self.mode, self.output_dir)


TrainingTelemetry = Telemetry  # the seed's name for the same class

