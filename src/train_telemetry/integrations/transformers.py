"""``TelemetryCallback`` for the Hugging Face ``transformers.Trainer``.

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      callbacks=[TelemetryCallback(config={"collect_every_n": 50})])

Runs in: the training process, inside the Trainer's loop (on every rank: the core decides
which rank writes). It drives one :class:`~train_telemetry.Telemetry` per ``train()`` call
through its public API only.

NOTE [one Trainer step, as the callback sees it] (transformers 5.x, ``Trainer._run_epoch``)::

    for each micro-batch of the step (gradient_accumulation_steps of them):
        model(**inputs)            <- forward pre/post hooks: keep references to the inputs,
                                      the loss and (classification) the logits; cheap, and only
                                      in a step that will be collected
        backward                   <- at a collected step with clipping on, post-accumulate-grad
                                      hooks queue one total-norm computation at the end of each
                                      backward: the gradients clip_grad_norm_ is about to see
    grad_norm = clip_grad_norm_(max_grad_norm)   (pre-clip norm; or the norm with max inf)
    on_pre_optimizer_step          <- grads already clipped: disarm the grad hooks, turn the
                                      last measured norm into the pre-clip float
    optimizer.step()
    on_optimizer_step              <- COLLECT HERE: grads (post-clip, what the optimizer applied)
                                      and the updated weights are present; the LR is the one the
                                      step used; global_step is still the previous step's
    learning_rate = lr_scheduler.get_last_lr()[0]; lr_scheduler.step()
    model.zero_grad(); state.global_step += 1; on_step_end; log {loss, grad_norm, learning_rate}
                                      under step = global_step

Hence ``batch_idx = state.global_step + 1`` at ``on_optimizer_step``: a record's
``gradient_norm.overall`` (clipping off) and ``learning_rates.group_0`` equal the Trainer's
logged ``grad_norm`` and ``learning_rate`` at that step. ``on_optimizer_step`` fires once per
real optimizer step, so gradient accumulation is respected; a collection happens when
``batch_idx % collect_every_n == 0``.

What the callback chooses (each can be overridden through the constructor):

- ``train.loss``: the loss whose gradient the step applied, as the Trainer logs it: the mean of
  the micro-batches' losses (their sum when the Trainer passed ``num_items_in_batch``, as it
  then does not divide by the accumulation steps). ``batch_stats`` and ``train.accuracy``
  describe the step's last micro-batch (accuracy only for ``[batch, classes]`` logits: token
  level logits are not kept, they can be large).
- holdout: ``holdout=`` if given; else the first ``holdout_size`` examples of the Trainer's
  ``eval_dataset`` through its ``data_collator`` (columns the model's ``forward`` does not
  take removed first, as the Trainer does), fed as ``model(**inputs).logits`` without the
  labels. The Trainer is found on the call stack of ``on_train_begin`` (callbacks are not
  handed the Trainer); without one or without an eval set there is no holdout.
- clipping (``max_grad_norm > 0``): ``gradient_norm`` is what the optimizer applied (post
  clip) and the record gets ``gradient_clipping: {max_norm, pre_clip_norm}``, the pre-clip
  norm being the Trainer's logged ``grad_norm``. It is measured at the end of the last
  backward (after DDP's gradient all-reduce, divided by the AMP loss scale if a GradScaler is
  in use), only at collected steps. Not measured under DeepSpeed (no gradients on the params).
- stop: at ``on_train_end``. The Trainer has no exception callback, and wrapping ``train()``
  would mean patching it: when ``train()`` raises, the Telemetry's at-exit hook stops it
  (everything queued is written), the next ``train()`` stops it before starting anew, and
  :meth:`TelemetryCallback.stop` stops it at once (e.g. in a notebook).
- records go to ``<args.output_dir>/telemetry`` unless the config sets ``output_dir``.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from . import load_config, missing_framework

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:  # the module is imported only by users of the integration
    raise missing_framework("transformers", "transformers", "transformers") from exc

from .. import Telemetry, TelemetryConfig, TelemetrySummary

__all__ = ["TelemetryCallback", "forward_transformers"]

# Keys the Trainer feeds the model that are not part of the batch.
_NOT_BATCH = frozenset({"num_items_in_batch", "return_dict", "use_cache"})
_LABEL_KEYS = ("labels", "label", "label_ids")


def forward_transformers(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The holdout forward: ``model(**inputs).logits``, the labels left out (no loss computed)."""
    inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    out = model(**inputs)
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


class _StepCapture:
    """What the model's forward hooks and the grad hooks keep during one collected step.

    Only references (the inputs dict, 0-d losses, classification logits) and one norm: no
    copy, no sync. Pickles and deep-copies as a fresh, inactive capture, so a model that is
    copied or pickled with these hooks attached (the core's worker model, a user's deepcopy)
    carries nothing of this run.
    """

    def __init__(self) -> None:
        self.active = False
        self.every = 1
        self.state: Any = None  # the Trainer's TrainerState: global_step says which step runs
        self.measure_clip = False
        self.params: list[torch.nn.Parameter] = []
        self.step: int | None = None  # the step whose micro-batches are being captured
        self.inputs: dict[str, Any] | None = None
        self.losses: list[torch.Tensor] = []
        self.scaled = False  # the Trainer passed num_items_in_batch: it sums micro-batch losses
        self.logits: torch.Tensor | None = None
        self.pre_clip: torch.Tensor | None = None
        self._grad_handles: list[Any] = []
        self._queued = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_StepCapture, ())

    # -- which step
    def _collected_step(self, module: torch.nn.Module) -> int | None:
        if not self.active or not module.training or self.state is None:
            return None  # evaluation (model.eval()) and our own holdout forwards are not training
        step = int(self.state.global_step) + 1
        return None if step % self.every else step

    def clear(self) -> None:
        self.step = None
        self.inputs = None
        self.losses = []
        self.scaled = False
        self.logits = None
        self.pre_clip = None
        self.disarm_grads()

    # -- forward hooks
    def before_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        step = self._collected_step(module)
        if step is None:
            return
        if step != self.step:  # the step's first micro-batch
            self.clear()
            self.step = step
            if self.measure_clip:
                self.arm_grads()
        self.inputs = {k: v for k, v in kwargs.items() if k not in _NOT_BATCH} or None
        self.scaled = kwargs.get("num_items_in_batch") is not None

    def after_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self.step is None or self._collected_step(module) != self.step:
            return
        loss = _field(output, "loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach())
        logits = _field(output, "logits")
        # [batch, classes] only: a language model's [batch, tokens, vocab] logits can be
        # gigabytes, and keeping them alive through the optimizer step would raise peak memory.
        self.logits = logits.detach() if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None

    # -- the pre-clip gradient norm
    def arm_grads(self) -> None:
        self._grad_handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]

    def disarm_grads(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []
        self._queued = False

    def _grad_ready(self, param: torch.Tensor) -> None:
        if not self._queued:  # once per backward
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        # Re-queued once so that it runs after every callback queued during the backward,
        # DDP's (which writes the all-reduced gradients back) included.
        torch.autograd.Variable._execution_engine.queue_callback(self._measure)

    def _measure(self) -> None:
        self._queued = False
        grads = [p.grad for p in self.params if p.grad is not None]
        # The last backward of the step wins: its gradients are the ones clip_grad_norm_ sees.
        self.pre_clip = _total_norm(grads) if grads else None


class TelemetryCallback(TrainerCallback):
    """Collects train-telemetry records from a ``transformers.Trainer`` run.

    Args:
        config: a :class:`~train_telemetry.TelemetryConfig`, a dict of its keys, the path of a
            YAML file, or None (defaults). Without ``output_dir`` the records go to
            ``<TrainingArguments.output_dir>/telemetry``.
        holdout: the fixed examples to evaluate (a batch dict or a list of them); default: the
            first ``holdout_size`` examples of the Trainer's ``eval_dataset``.
        forward_fn: ``f(model, batch) -> logits`` for the holdout (module level, so it pickles);
            default :func:`forward_transformers`.
        metrics: your own metrics (``Telemetry(config, metrics=...)``).
        mirror: the config's ``mirror`` (trackers the records are also sent to); ``"framework"``:
            the trackers of the Trainer's ``report_to``, into the runs they opened.
    """

    def __init__(
        self,
        config: TelemetryConfig | Mapping[str, Any] | str | Path | None = None,
        holdout: Any = None,
        forward_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
        metrics: Sequence[Any] | None = None,
        mirror: Any = None,
    ) -> None:
        self.config = load_config(config)
        if mirror is not None:
            self.config = self.config.replace(mirror=mirror)
        self.holdout = holdout
        self.forward_fn = forward_fn
        self.metrics = list(metrics) if metrics else None
        self.telemetry: Telemetry | None = None
        self.summary: TelemetrySummary | None = None
        self._capture = _StepCapture()
        self._hook_handles: list[Any] = []
        self._model: torch.nn.Module | None = None
        self._optimizer: Any = None
        self._epoch = 0
        self._max_norm = 0.0
        self._pre_clip: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.telemetry is not None:
            self.stop()  # an earlier train() that raised: its records are complete now
        model = kwargs["model"]
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        config = self.config
        if config.output_dir is None:
            os.makedirs(args.output_dir, exist_ok=True)
            config = config.replace(output_dir=os.path.join(args.output_dir, "telemetry"))
        forward_fn = self.forward_fn
        if forward_fn is None:
            forward_fn = forward_transformers
            if config.keys_are_default:  # the seed's img1/img2/winner: a Trainer's batches say labels
                config = config.replace(label_key="labels")
        trainer = _find_trainer()
        if trainer is not None and any(name == "framework" for name, _ in config.mirrors):
            # report_to's callbacks come before ours (Trainer: default + report_to + user callbacks),
            # so their runs are open now: mirror into them.
            from ..mirrors.framework import resolve_framework, transformers_mirrors

            config = resolve_framework(config, *transformers_mirrors(trainer.callback_handler.callbacks),
                                       "Trainer's report_to")
        holdout = self.holdout
        if holdout is None and config.track_holdout_logits:
            holdout = _holdout_from_trainer(trainer, model, args, config.holdout_size)
        extra_args: dict[str, Any] = {"metrics": self.metrics} if self.metrics else {}
        telemetry = Telemetry(config, forward_fn=forward_fn, **extra_args)
        if holdout is not None:
            telemetry.set_holdout_data(holdout)
        telemetry.start(model, optimizer)
        self.telemetry = telemetry
        self.summary = None
        self._model = model
        self._optimizer = optimizer
        self._epoch = int(float(state.epoch or 0.0) + 1e-9)
        self._max_norm = float(args.max_grad_norm or 0.0)
        # DeepSpeed keeps the gradients off the parameters: nothing to measure there.
        measure_clip = self._max_norm > 0 and not getattr(args, "deepspeed", None)
        capture = self._capture
        capture.clear()
        capture.every = config.collect_every_n
        capture.state = state
        capture.measure_clip = measure_clip
        capture.params = [p for p in model.parameters() if p.requires_grad] if measure_clip else []
        capture.active = True
        self._hook_handles = [
            model.register_forward_pre_hook(capture.before_forward, with_kwargs=True),
            model.register_forward_hook(capture.after_forward, with_kwargs=True),
        ]

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch = int(float(state.epoch or 0.0) + 1e-9)  # resumed mid-epoch: e + fraction

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()

    def stop(self) -> TelemetrySummary | None:
        """Stop collecting and write everything queued (done at ``on_train_end``); returns the summary."""
        self._capture.active = False
        self._capture.clear()
        self._capture.state = None
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        telemetry, self.telemetry = self.telemetry, None
        if telemetry is not None:
            self.summary = telemetry.stop()
        self._model = self._optimizer = None
        return self.summary

    # ------------------------------------------------------------------ the step
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        capture = self._capture
        self._pre_clip = None
        if capture.step != state.global_step + 1 or not capture.measure_clip:
            return
        capture.disarm_grads()  # the gradients are final (and clipped) now
        if capture.pre_clip is None:
            return
        norm = float(capture.pre_clip)  # a sync, at collected steps only
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)  # accelerate's AMP GradScaler
        if scaler is not None and scaler.is_enabled():
            norm /= float(scaler.get_scale())  # measured before accelerate unscaled the gradients
        self._pre_clip = norm

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        telemetry, model = self.telemetry, self._model
        step = state.global_step + 1  # the step number the Trainer's logs will give this step
        if telemetry is None or model is None or step % telemetry.config.collect_every_n:
            return
        capture = self._capture
        batch = loss = logits = None
        if capture.step == step:
            batch, logits = capture.inputs, capture.logits
            if capture.losses:
                losses = torch.stack(capture.losses)  # on the device: no sync
                loss = losses.sum() if capture.scaled else losses.mean()
        extra: dict[str, Any] = {}
        if self._pre_clip is not None:
            extra["gradient_clipping"] = {"max_norm": self._max_norm, "pre_clip_norm": self._pre_clip}
        hook_kwargs: dict[str, Any] = {"loss": loss, "outputs": logits}
        if extra:
            hook_kwargs["extra"] = extra
        try:
            telemetry.on_batch_end(model, self._optimizer, step, self._epoch, None, batch, **hook_kwargs)
        finally:
            capture.clear()  # drop the references: the batch's memory may be freed now
            self._pre_clip = None


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer wraps the torch optimizer the Trainer built.
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _find_trainer() -> Any:
    """The Trainer whose loop called us: callbacks are not handed it, its frame holds it."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None


def _holdout_from_trainer(trainer: Any, model: torch.nn.Module, args: Any, size: int) -> dict[str, Any] | None:
    """The first ``size`` examples of the eval set, collated as the Trainer collates them."""
    if trainer is None:
        return None
    dataset = trainer.eval_dataset
    if isinstance(dataset, Mapping):  # several named eval sets: the first
        dataset = next(iter(dataset.values()), None)
    if dataset is None:
        return None
    try:
        examples = [dataset[i] for i in range(min(size, len(dataset)))]
    except TypeError:  # an IterableDataset: take its first examples
        examples = []
        for example in dataset:
            examples.append(example)
            if len(examples) >= size:
                break
    if not examples:
        return None
    n = len(examples)
    if args.remove_unused_columns and all(isinstance(e, Mapping) for e in examples):
        # As the Trainer's column removal: what forward() takes, plus the label names.
        keep = set(inspect.signature(model.forward).parameters) | set(_LABEL_KEYS) | set(trainer.label_names or [])
        examples = [{k: v for k, v in e.items() if k in keep} for e in examples]
    collate = trainer.data_collator or transformers.default_data_collator
    try:
        batch = collate(examples)
    except Exception as exc:
        warnings.warn(
            f"train-telemetry: the eval set's first {n} examples could not be collated for the holdout "
            f"({type(exc).__name__}: {exc}); pass TelemetryCallback(holdout=...)",
            stacklevel=2,
        )
        return None
    return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}
