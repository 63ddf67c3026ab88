"""``TelemetryCallback`` for a Lightning ``Trainer`` (``lightning.pytorch`` or ``pytorch_lightning``).

    trainer = Trainer(callbacks=[TelemetryCallback(config={"collect_every_n": 50})], ...)

Runs in: the training process, inside Lightning's fit loop (on every rank: the core decides
which rank writes). It drives one :class:`~train_telemetry.Telemetry` per ``fit()`` through
its public API only.

NOTE [one Lightning batch, as the callback sees it] (Lightning 2.x, ``_TrainingEpochLoop.advance``)::

    on_train_batch_start            <- forget which optimizers stepped
    automatic: training_step, zero_grad (first batch of a window), backward,
               and on the window's last batch optimizer.step(closure)
    manual:    training_step, in which the module calls opt.step() itself, once per optimizer
    optimizer.step() returns        <- a step post-hook (torch's register_step_post_hook):
                                       this optimizer stepped; keep the LRs it stepped with
    scheduler.step() (interval "step"; manual: the module's own sch.step())
    on_train_batch_end(outputs, batch)  <- COLLECT HERE when an optimizer stepped in this batch:
                                       grads are present until the next window's zero_grad,
                                       the weights are updated, the batch and the
                                       training_step's output are at hand

What the callback chooses:

- collection: at ``on_train_batch_end`` of a batch in which an optimizer stepped, so with
  ``accumulate_grad_batches`` only at real steps (and not when AMP skipped the step).
- step numbers: automatic optimization: ``batch_idx = trainer.global_step`` (after the step,
  1-based). Manual optimization: ``global_step`` counts every ``opt.step()`` (two per batch
  with two optimizers), so ``batch_idx`` counts the batches in which an optimizer stepped:
  ``global_step / optimizers`` when each steps once per batch. In both, ``batch_idx - 1`` is
  the step Lightning's loggers file that batch's ``self.log`` values under.
  ``collect_every_n`` counts ``batch_idx``.
- learning rates: the LRs each optimizer stepped with, as the post-hook saw them. A
  step-interval scheduler has already moved the LR by ``on_train_batch_end``; the callback
  puts the LRs the step used back in the param groups for the duration of the hook (which
  reads them as plain numbers) and restores the current ones right after: no step ever sees
  a changed LR.
- ``train.loss``: automatic: the loss whose gradient the step applied, the sum over the
  window of the losses Lightning backpropagated (each divided by ``accumulate_grad_batches``:
  the window's mean); manual: the ``training_step``'s returned loss. ``outputs`` (for train
  accuracy) is the output dict's ``logits`` or ``outputs`` entry; ``batch_stats`` describe
  the batch of the step (its last micro-batch under accumulation).
- holdout: ``holdout=`` if given, else the first ``holdout_size`` examples of the first
  validation dataloader (the trainer's, else the datamodule's or the module's
  ``val_dataloader()``), read once at ``on_train_start`` with the global RNG state restored
  afterwards (a DataLoader iterator draws its seed from it).
- the model is the LightningModule, the optimizers ``trainer.optimizers`` (a list when
  there are several: every param group of every optimizer is a group).
- stop: ``on_fit_end``, ``teardown("fit")`` and ``on_exception``, whichever comes first.
- records go to ``<trainer.default_root_dir>/telemetry`` unless the config sets ``output_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import load_config, missing_framework

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise missing_framework("lightning", "Lightning (lightning or pytorch_lightning)", "lightning") from exc

from .. import Telemetry, TelemetryConfig, TelemetrySummary

__all__ = ["TelemetryCallback"]


class TelemetryCallback(pl.Callback):
    """Collects train-telemetry records from a Lightning ``Trainer.fit`` run.

    Args:
        config: a :class:`~train_telemetry.TelemetryConfig`, a dict of its keys, the path of a
            YAML file, or None (defaults). Without ``output_dir`` the records go to
            ``<trainer.default_root_dir>/telemetry``.
        holdout: the fixed examples to evaluate (a batch or a list of batches); default: the
            first ``holdout_size`` examples of the validation dataloader.
        forward_fn: ``f(model, batch) -> logits`` for the holdout (module level, so it pickles).
        metrics: your own metrics (``Telemetry(config, metrics=...)``).
        mirror: the config's ``mirror`` (trackers the records are also sent to); ``"framework"``:
            the trackers of the Trainer's loggers (TensorBoardLogger, MLFlowLogger, WandbLogger),
            into their runs.
    """

    def __init__(
        self,
        config: TelemetryConfig | Mapping[str, Any] | str | Path | None = None,
        holdout: Any = None,
        forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
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
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._stepped: dict[int, list[Any]] = {}  # id(optimizer) -> LRs it stepped with, this batch
        self._manual = False
        self._batches_stepped = 0  # manual optimization's step counter
        self._window_losses: list[torch.Tensor] = []  # automatic: the losses of the open window

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.telemetry is not None:
            self.stop()
        config = self.config
        if config.output_dir is None:
            root = str(trainer.default_root_dir)
            os.makedirs(root, exist_ok=True)
            config = config.replace(output_dir=os.path.join(root, "telemetry"))
        if any(name == "framework" for name, _ in config.mirrors):
            from ..mirrors.framework import lightning_mirrors, resolve_framework

            config = resolve_framework(config, *lightning_mirrors(trainer.loggers), "Trainer's loggers")
        holdout = self.holdout
        if holdout is None and config.track_holdout_logits:
            holdout = _holdout_from_validation(trainer, pl_module, config.holdout_size)
        extra_args: dict[str, Any] = {"metrics": self.metrics} if self.metrics else {}
        telemetry = Telemetry(config, forward_fn=self.forward_fn, **extra_args)
        if holdout is not None:
            telemetry.set_holdout_data(holdout)
        self._optimizers = list(trainer.optimizers)
        telemetry.start(pl_module, self._optimizer_arg())
        self.telemetry = telemetry
        self.summary = None
        self._manual = not pl_module.automatic_optimization
        # A resumed run continues the count (each optimizer stepping once per batch).
        self._batches_stepped = trainer.global_step // max(1, len(self._optimizers)) if self._manual else 0
        self._window_losses = []
        self._stepped = {}
        self._handles = [opt.register_step_post_hook(self._on_step) for opt in self._optimizers]

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.stop()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.stop()  # everything collected before the exception is written

    def stop(self) -> TelemetrySummary | None:
        """Stop collecting and write everything queued (done when fit ends); returns the summary."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizers = []
        self._window_losses = []
        self._stepped = {}
        telemetry, self.telemetry = self.telemetry, None
        if telemetry is not None:
            self.summary = telemetry.stop()
        return self.summary

    # ------------------------------------------------------------------ the step
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Plain numbers or the LR objects themselves; read again at the hook only if collected.
        self._stepped[id(optimizer)] = [g["lr"] for g in optimizer.param_groups]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._stepped = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        telemetry = self.telemetry
        if telemetry is None:
            return
        every = telemetry.config.collect_every_n
        loss, logits = _loss_and_logits(outputs)
        if not self._stepped:  # accumulating: keep this micro-batch's loss if the step is collected
            if not self._manual and (trainer.global_step + 1) % every == 0 and loss is not None:
                self._window_losses.append(loss)
            return
        if self._manual:
            self._batches_stepped += 1
            step = self._batches_stepped
        else:
            step = int(trainer.global_step)
        window, self._window_losses = self._window_losses, []
        if step % every:
            return
        if not self._manual and loss is not None:
            # The window's backpropagated losses (each already divided by accumulate_grad_batches).
            loss = torch.stack([*window, loss]).sum() if window else loss
        restore = self._use_step_lrs()
        try:
            telemetry.on_batch_end(pl_module, self._optimizer_arg(), step, int(trainer.current_epoch), None, batch,
                                   loss=loss, outputs=logits)
        finally:
            for group, lr in restore:
                group["lr"] = lr

    def _optimizer_arg(self) -> Any:
        return self._optimizers[0] if len(self._optimizers) == 1 else self._optimizers

    def _use_step_lrs(self) -> list[tuple[dict[str, Any], Any]]:
        """Put the LRs each optimizer stepped with back in its groups; return what to restore."""
        restore: list[tuple[dict[str, Any], Any]] = []
        for opt in self._optimizers:
            used = self._stepped.get(id(opt))
            if used is None:
                continue
            for group, lr in zip(opt.param_groups, used, strict=False):
                if group["lr"] is not lr:
                    restore.append((group, group["lr"]))
                    group["lr"] = lr
        return restore


def _loss_and_logits(outputs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The training_step's loss and logits: a tensor is the loss; a dict has ``loss`` and maybe ``logits``/``outputs``."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach(), None
    if not isinstance(outputs, Mapping):
        return None, None
    loss = outputs.get("loss")
    logits = outputs.get("logits", outputs.get("outputs"))
    return (
        loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None,
        logits.detach() if isinstance(logits, torch.Tensor) else None,
    )


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (list, tuple)) else []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 1


def _holdout_from_validation(trainer: Any, pl_module: Any, size: int) -> list[Any] | None:
    """The first ``size`` examples (whole batches, the core trims them) of the first validation loader."""
    loader = trainer.val_dataloaders
    if loader is None:
        source = trainer.datamodule if getattr(trainer, "datamodule", None) is not None else pl_module
        try:
            loader = source.val_dataloader()
        except Exception:  # not implemented: no validation data, no holdout
            return None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    batches: list[Any] = []
    rows = 0
    # Iterating a DataLoader draws its base seed from the global RNG: training must not see that.
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            batches.append(batch)
            rows += _rows(batch)
            if rows >= size:
                break
    return batches or None
