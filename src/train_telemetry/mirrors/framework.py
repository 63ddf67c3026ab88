"""``mirror: framework``: the trackers a Hugging Face Trainer (``report_to``) or a Lightning
Trainer (its loggers) is configured with, as mirror options: no second configuration.

Runs in: the training process, in the integrations' callbacks at the start of training (after
the framework's own tracker callbacks / loggers have opened their runs). Reads the frameworks'
objects only; imports no tracker. Each tracker found becomes a mirror that logs into the
framework's run (MLflow: its run id; W&B: its run, see wandb.py; trackio: its project and run
name; TensorBoard: its log directory, beside its event files).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from ..config import FRAMEWORK_MIRROR, TelemetryConfig
from . import ATTACHED_PREFIX, wandb_run_options


def _log_dir(writer: Any) -> str | None:
    for attr in ("log_dir", "logdir"):
        value = getattr(writer, attr, None)
        if callable(value):
            value = value()
        if value:
            return str(value)
    get = getattr(writer, "get_logdir", None)
    return str(get()) if callable(get) else None


def _mlflow_options(fluent: Any) -> dict[str, Any] | None:
    run = fluent.active_run() if fluent is not None else None
    return {"run_id": run.info.run_id, "tracking_uri": fluent.get_tracking_uri()} if run is not None else None


def _trackio_options(module: Any) -> dict[str, Any] | None:
    run = module.context_vars.current_run.get() if module is not None else None
    return {"project": run.project, "name": run.name} if run is not None else None


def transformers_mirrors(callbacks: Iterable[Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Mirror options for the report_to callbacks of a Trainer (its ``callback_handler.callbacks``),
    and the names of those found but not mirrored (no open run, or a tracker we have no mirror for)."""
    found: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for cb in callbacks:
        kind = type(cb).__name__
        try:
            options: dict[str, Any] | None = None
            if kind == "TensorBoardCallback":
                writer = getattr(cb, "tb_writer", None)
                log_dir = _log_dir(writer) if writer is not None else getattr(cb, "logging_dir", None)
                options = {"log_dir": str(log_dir)} if log_dir else None
                name = "tensorboard"
            elif kind == "MLflowCallback":
                options, name = _mlflow_options(getattr(cb, "_ml_flow", None)), "mlflow"
            elif kind == "WandbCallback":
                run = getattr(getattr(cb, "_wandb", None), "run", None)
                options, name = (wandb_run_options(run) if run is not None else None), "wandb"
            elif kind == "TrackioCallback":
                options, name = _trackio_options(getattr(cb, "_trackio", None)), "trackio"
            elif kind.endswith("Callback") and kind[:-8] and type(cb).__module__.startswith("transformers.integrations"):
                skipped.append(kind)
                continue
            else:
                continue
        except Exception as exc:  # a framework's odd state never fails training
            skipped.append(f"{kind} ({type(exc).__name__}: {exc})")
            continue
        if options is None:
            skipped.append(f"{kind} (no open run)")
        else:
            found[name] = options
    return found, skipped


def lightning_mirrors(loggers: Iterable[Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Mirror options for a Lightning Trainer's ``loggers`` (TensorBoardLogger, MLFlowLogger,
    WandbLogger), and the names of those not mirrored (CSVLogger and others)."""
    found: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind == "TensorBoardLogger":
                found["tensorboard"] = {"log_dir": str(logger.log_dir)}
            elif kind == "MLFlowLogger":
                run_id = logger.run_id  # creates the experiment and run if not yet: we log into it
                found["mlflow"] = {"run_id": run_id, "tracking_uri": logger._tracking_uri or
                                   logger.experiment.tracking_uri}
            elif kind == "WandbLogger":
                found["wandb"] = wandb_run_options(logger.experiment)
            else:
                skipped.append(kind)
        except Exception as exc:  # a logger's odd state never fails training
            skipped.append(f"{kind} ({type(exc).__name__}: {exc})")
    return found, skipped


def resolve_framework(config: TelemetryConfig, found: dict[str, dict[str, Any]], skipped: list[str],
                      framework: str) -> TelemetryConfig:
    """``config`` with ``framework`` in its mirrors replaced by the framework's trackers ``found``
    (a tracker the config names itself keeps the config's options)."""
    specs = config.mirrors
    if not any(name == FRAMEWORK_MIRROR for name, _ in specs):
        return config
    mirror = {name: options for name, options in specs if name != FRAMEWORK_MIRROR}
    for name, options in found.items():
        mirror.setdefault(name, {"prefix": ATTACHED_PREFIX, **options})
    if skipped:
        warnings.warn(f"train-telemetry: mirror: framework: not mirrored from the {framework}: {', '.join(skipped)}",
                      RuntimeWarning, stacklevel=3)
    if not found:
        warnings.warn(f"train-telemetry: mirror: framework: the {framework} reports to no tracker we can mirror to "
                      "(tensorboard, mlflow, wandb, trackio)", RuntimeWarning, stacklevel=3)
    return config.replace(mirror=mirror or None)
