"""Weights & Biases: history in a W&B run, online or offline (``wandb sync`` uploads it later).

Runs in: a mirror's thread (hub.py). Where it logs:

- the user's run, when this process holds it (``mode: sync``, or a ``wandb.run`` started
  before ``start()``: sinks.py names it in the options, mirrors.attach_active_runs). Its
  ``_step`` is the user's, so ours goes in the series ``train_telemetry.step``, declared the
  step metric of every series we log (``define_metric``): no conflict with the user's steps;
- the user's run from the worker process: online, through W&B's shared mode (several
  processes writing one run; our process is not the primary and never finishes it). Offline
  runs cannot be shared: we then open our own offline run in the user's group
  (``<group or run id>``, named ``<name>-telemetry``) and say so once;
- else our own run (project ``WANDB_PROJECT`` or "train-telemetry", named after the output
  directory, files in it), ``_step`` = the record's step, finished at close.

Diagnoses: the run's summary (``train_telemetry.diagnoses``: the codes) and a table of them;
our own run also gets a tag per code. The holdout: a ``wandb.Table`` of its last record.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .base import BaseMirror, HoldoutTable, MirrorContext

STEP_KEY = "train_telemetry.step"


class WandbMirror(BaseMirror):
    name = "wandb"

    def __init__(self, project: str | None = None, entity: str | None = None, name: str | None = None,
                 group: str | None = None, mode: str | None = None, dir: str | None = None,
                 run_id: str | None = None, prefix: str = "") -> None:
        self.project, self.entity, self.run_name, self.group = project, entity, name, group
        self.mode, self.dir, self.run_id, self.prefix = mode, dir, run_id, prefix
        self._run: Any = None
        self._owned = False  # we started it: _step is ours, we finish it
        self._finish = False  # our own handle (ours, or a shared one): finished at close
        self._defined: set[str] = set()
        self._last_step: int | None = None

    def open(self, context: MirrorContext) -> None:
        import wandb

        current = getattr(wandb, "run", None)
        if self.run_id and current is not None and current.id == self.run_id:
            self._run = current  # the user's run, in this process: log into it directly
            return
        mode: Any = self.mode or os.environ.get("WANDB_MODE") or None
        settings: dict[str, Any] = {"console": "off", "x_disable_stats": True, "save_code": False,
                                    "reinit": "create_new", "silent": True}
        directory = self.dir or str(context.run_dir)
        os.makedirs(directory, exist_ok=True)
        kwargs: dict[str, Any] = {"project": self.project or os.environ.get("WANDB_PROJECT") or "train-telemetry",
                                  "entity": self.entity, "dir": directory, "group": self.group}
        if self.run_id and mode != "offline":
            # Another process's run: W&B's shared mode lets several processes write one run.
            settings.update(mode="shared", x_primary=False, x_label="train-telemetry", x_update_finish_state=False)
            self._run = wandb.init(id=self.run_id, settings=wandb.Settings(**settings), **kwargs)
            self._finish = True
            return
        if self.run_id:
            print(f"train-telemetry mirror (pid {os.getpid()}): wandb: the run {self.run_id} is offline, and "
                  "offline runs cannot be shared between processes: logging to a run of its own in its group",
                  file=sys.stderr, flush=True)
            kwargs["group"] = self.group or self.run_id
        name = self.run_name or context.run_name
        self._run = wandb.init(name=f"{name}-telemetry" if self.run_id else name, mode=mode,
                               config={"train_telemetry": context.config}, settings=wandb.Settings(**settings),
                               **kwargs)
        self._owned = self._finish = True

    def _declare(self, keys: Any) -> None:
        for key in keys:
            if key not in self._defined:
                self._run.define_metric(key, step_metric=STEP_KEY)
                self._defined.add(key)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._owned:
            self._run.log(scalars, step=step)
        else:
            if not self._defined:
                self._run.define_metric(STEP_KEY)
            self._declare(scalars)
            self._run.log({**scalars, STEP_KEY: step})
        self._last_step = step

    def _log_extra(self, data: dict[str, Any], step: int | None) -> None:
        if self._owned:
            # at the last step logged (W&B refuses an earlier one)
            self._run.log(data, step=self._last_step if self._last_step is not None else step)
        else:
            self._run.log(data)

    def log_holdout(self, step: int, table: HoldoutTable) -> None:
        import wandb

        self._log_extra({f"{self.prefix}train_telemetry/holdout_examples":
                         wandb.Table(columns=list[Any](table.columns), data=table.rows)}, step)

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        import wandb

        codes = sorted({d["code"] for d in diagnoses})
        self._run.summary[f"{self.prefix}train_telemetry.diagnoses"] = ",".join(codes) or "none"
        rows = [[d["code"], d["severity"], d.get("title", ""), d.get("hint", "")] for d in diagnoses]
        self._log_extra({f"{self.prefix}train_telemetry/diagnoses":
                         wandb.Table(columns=["code", "severity", "title", "hint"], data=rows)}, None)
        if self._owned and codes:
            self._run.tags = tuple(self._run.tags or ()) + tuple(f"diagnosis:{c}" for c in codes)

    def close(self) -> None:
        if self._run is not None and self._finish:
            self._run.finish()
