"""trackio (Hugging Face): metrics in its local store (``TRACKIO_DIR``, default
``~/.cache/huggingface/trackio``), or a Space / server when trackio is configured for one.

Runs in: a mirror's thread (hub.py). Uses ``trackio.init(...)``'s Run object, never the module's
current run, so a user's own trackio run in the same process is left alone. Project and run
default to the output directory's name; ``resume="allow"``, so a resumed train-telemetry run
(a new segment, steps counting on) and the user's run of that name (``mirror: framework``
under ``report_to="trackio"``, or a current trackio run at ``start()``) get our series added,
not a second run. Diagnoses are trackio alerts (its notification feature: one per diagnosis,
at its severity); the holdout a ``trackio.Table``.
"""

from __future__ import annotations

from typing import Any

from .base import BaseMirror, HoldoutTable, MirrorContext

_LEVELS = {"info": "INFO", "warning": "WARN", "serious": "ERROR"}


class TrackioMirror(BaseMirror):
    name = "trackio"

    def __init__(self, project: str | None = None, name: str | None = None, group: str | None = None,
                 prefix: str = "") -> None:
        self.project, self.run_name, self.group, self.prefix = project, name, group, prefix
        self._run: Any = None
        self._last_step: int | None = None

    def open(self, context: MirrorContext) -> None:
        import inspect

        import trackio

        wanted: dict[str, Any] = {"project": self.project or context.run_name, "name": self.run_name or context.run_name,
                  "group": self.group, "resume": "allow", "embed": False, "auto_log_gpu": False, "auto_log_cpu": False}
        accepted = inspect.signature(trackio.init).parameters  # older trackio lacks some of them
        self._run = trackio.init(**{k: v for k, v in wanted.items() if k in accepted})

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)
        self._last_step = step

    def log_holdout(self, step: int, table: HoldoutTable) -> None:
        import trackio

        self._run.log({f"{self.prefix}train_telemetry/holdout_examples":
                       trackio.Table(columns=table.columns, data=table.rows)}, step=step)

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        import trackio

        AlertLevel = getattr(trackio, "AlertLevel", None)
        if AlertLevel is None or not hasattr(self._run, "alert"):  # trackio before alerts
            self._run.log({f"{self.prefix}train_telemetry/diagnoses": text}, step=self._last_step)
            return
        for d in diagnoses:
            level = getattr(AlertLevel, _LEVELS.get(d["severity"], "WARN"))
            self._run.alert(f"{d['code']}: {d.get('title', '')}", text=d.get("hint") or None, level=level,
                            step=self._last_step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
