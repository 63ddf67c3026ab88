"""Mirrors: the records also sent to the trackers a team already looks at (TensorBoard,
MLflow, Weights & Biases, trackio, or your own class), never from the training path.

Runs in: wherever records are built (the worker process; the training process beside the
inline builder), each mirror on its own thread behind a bounded queue (hub.py, NOTE [mirror
isolation]); and in ``train-telemetry mirror`` (replay.py). Imports no torch and no tracker:
each tracker is imported on its mirror's thread, when the first record arrives.

One file per tracker, each registered in :data:`MIRRORS` (name -> ``module:Class``); their
options are config.MIRROR_OPTIONS, and a unit test keeps the two and the README equal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import TelemetryConfig
from .base import (
    BaseMirror,
    HoldoutTable,
    Mirror,
    MirrorContext,
    MirrorStats,
    holdout_table,
    record_scalars,
    record_step,
)
from .hub import MirrorHub, Warn, make_mirror, read_stats, stats_file_for

__all__ = [
    "MIRRORS",
    "BaseMirror",
    "HoldoutTable",
    "Mirror",
    "MirrorContext",
    "MirrorHub",
    "MirrorStats",
    "attach_active_runs",
    "close_mirrors",
    "holdout_table",
    "make_mirror",
    "mirror_run",
    "open_mirrors",
    "read_stats",
    "record_scalars",
    "record_step",
    "stats_file_for",
]

# The trackers, by the name the config uses: one file each. Keep equal to config.MIRROR_OPTIONS.
MIRRORS: dict[str, str] = {
    "tensorboard": "train_telemetry.mirrors.tensorboard:TensorBoardMirror",
    "mlflow": "train_telemetry.mirrors.mlflow:MlflowMirror",
    "wandb": "train_telemetry.mirrors.wandb:WandbMirror",
    "trackio": "train_telemetry.mirrors.trackio:TrackioMirror",
}


def _factory(name: str, options: dict[str, Any]) -> Callable[[], Mirror]:
    return lambda: make_mirror(name, options)


def _display_name(name: str) -> str:
    return name.rpartition(":")[2].rpartition(".")[2] if ":" in name else name


def _diagnoser(records_file: Path, finished: bool) -> Callable[[], tuple[list[dict[str, Any]], str]]:
    def run() -> tuple[list[dict[str, Any]], str]:
        from ..analysis.load import load_run
        from ..analysis.report import render_diagnoses
        from ..analysis.rules import diagnose

        found = [d.to_dict() for d in diagnose(load_run(records_file), finished=finished)]
        return found, "\n".join(render_diagnoses(found))

    return run


def open_mirrors(config: TelemetryConfig, run_dir: Path, records_file: Path, rank: int = 0,
                 warn: Warn | None = None) -> MirrorHub | None:
    """The hub of ``config.mirror`` for ``records_file``, or None when nothing is mirrored.

    Cheap: no thread and no tracker until the first record (hub.py).
    """
    specs = config.mirrors
    if not specs:
        with contextlib.suppress(OSError):  # an earlier run's stats never pass for this one's
            stats_file_for(records_file).unlink()
        return None
    context = MirrorContext(run_dir=Path(run_dir), run_name=Path(run_dir).resolve().name, rank=rank,
                            config=config.to_dict())
    return MirrorHub([(_display_name(n), _factory(n, o)) for n, o in specs], context,
                     stats_file=stats_file_for(records_file), diagnoser=_diagnoser(records_file, False), warn=warn)


def close_mirrors(hub: MirrorHub | None, config: TelemetryConfig, deadline: float | None = None) -> None:
    """Close ``hub``: each mirror may send what it holds for at most half of ``stop_timeout_s``
    (or until ``deadline``, stop()'s, if sooner); one whose call has not returned for
    ``mirror_drain_s`` is abandoned sooner. A hung tracker never holds stop() past its deadline.

    In the worker, the time is counted from here, after the queued records were written:
    stop() began earlier, so half its timeout leaves the worker the other half for those."""
    if hub is None:
        return
    end = time.monotonic() + config.stop_timeout_s / 2
    with contextlib.suppress(Exception):
        hub.close(end if deadline is None else min(end, deadline), stall_s=config.mirror_drain_s)


# The series prefix of a mirror that logs into a run it did not open (the user's active run,
# or the framework's under ``mirror: framework``), unless its options set one: the Trainer
# logs `train/loss` to TensorBoard and `epoch` to MLflow, Lightning what the user names; ours
# beside theirs under the same name would interleave two series into one.
ATTACHED_PREFIX = "telemetry/"


def attach_active_runs(config: TelemetryConfig) -> TelemetryConfig:
    """``config`` with the user's active MLflow / W&B run (in this, the training process) named
    in the options of those mirrors that name no run, so the worker logs into that run instead
    of opening a second one. Imports no tracker: one not imported yet has no active run."""
    specs = config.mirrors
    if not specs:
        return config
    changed = False
    mirror: dict[str, dict[str, Any]] = {}
    for name, options in specs:
        options = dict(options)
        attached = False
        with contextlib.suppress(Exception):  # a tracker's odd state never fails start()
            if name == "mlflow" and not options.get("run_id") and "mlflow" in sys.modules:
                mlflow = sys.modules["mlflow"]
                active = mlflow.active_run()
                if active is not None:
                    options["run_id"] = active.info.run_id
                    options.setdefault("tracking_uri", mlflow.get_tracking_uri())
                    attached = True
            elif name == "wandb" and not options.get("run_id") and "wandb" in sys.modules:
                run = getattr(sys.modules["wandb"], "run", None)
                if run is not None:
                    options.update(wandb_run_options(run, options))
                    attached = True
            elif name == "trackio" and "trackio" in sys.modules:
                run = sys.modules["trackio"].context_vars.current_run.get()
                if run is not None and not options.get("name"):
                    options.setdefault("project", run.project)
                    options["name"] = run.name
                    attached = True
        if attached:
            options.setdefault("prefix", ATTACHED_PREFIX)
            changed = True
        mirror[name] = options
    return config.replace(mirror=mirror) if changed else config


def wandb_run_options(run: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The wandb mirror's options that attach it to ``run`` (a wandb Run of this process)."""
    options = dict(options or {})
    options["run_id"] = run.id
    for key, attr in (("project", "project"), ("entity", "entity"), ("group", "group")):
        value = getattr(run, attr, None)
        if value and not options.get(key):
            options[key] = value
    settings = getattr(run, "settings", None)
    if settings is not None and not options.get("mode"):
        mode = getattr(settings, "mode", None)
        options["mode"] = "offline" if mode in ("offline", "dryrun") else "online"
    if settings is not None and not options.get("dir"):
        root = getattr(settings, "root_dir", None)
        if root:
            options["dir"] = str(root)
    return options


def mirror_run(path: str | Path, mirrors: list[tuple[str, dict[str, Any]]] | list[Mirror], *, follow: bool = False,
               rank: int | None = None, interval_s: float = 1.0, max_seconds: float | None = None,
               out: Any = None) -> dict[str, MirrorStats]:
    """Send the run at ``path`` to ``mirrors`` (names with options, or Mirror objects); with
    ``follow``, keep sending what a live run appends until it stops. Returns each mirror's stats."""
    from .replay import replay

    return replay(path, mirrors, follow=follow, rank=rank, interval_s=interval_s, max_seconds=max_seconds, out=out)
