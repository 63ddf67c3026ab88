"""MLflow: metrics in a run of any tracking URI (a server, ``sqlite:///mlflow.db``, Databricks).

Runs in: a mirror's thread (hub.py). Logs through ``MlflowClient`` by run id, never the fluent
API's thread-local active run, so it can log into a run another process (the trainer) holds:
the active run at ``start()`` (sinks.py puts its id in the options: mirrors.attach_active_runs),
the Trainer's or Lightning's (``mirror: framework``), or ``run_id``; else it opens a run named
after the output directory and ends it at close. Each record is one ``log_batch`` (chunks of
MLflow's 1000-metric limit), its step the record's step. Diagnoses become tags
(``train_telemetry.diagnoses``: the codes; ``train_telemetry.diagnosis.<code>``: the severity)
and the text artifact ``train_telemetry/diagnoses.txt``; the holdout table the artifact
``train_telemetry/holdout.json`` (MLflow's table format, with pandas) or ``holdout.csv``.
"""

from __future__ import annotations

import time
from typing import Any

from .base import BaseMirror, HoldoutTable, MirrorContext

_MAX_METRICS = 1000  # MLflow's log_batch limit


class MlflowMirror(BaseMirror):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 run_id: str | None = None, prefix: str = "") -> None:
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id = run_id
        self.prefix = prefix
        self._client: Any = None
        self._owned = False

    def open(self, context: MirrorContext) -> None:
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id:
            client.get_run(self.run_id)  # fails now, not per record, if it is not there
            return
        experiment_id = "0"
        if self.experiment:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
        run = client.create_run(experiment_id, run_name=self.run_name or context.run_name,
                                tags={"train_telemetry.output_dir": str(context.run_dir)})
        self.run_id, self._owned = run.info.run_id, True

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        for i in range(0, len(metrics), _MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + _MAX_METRICS], synchronous=True)

    def log_holdout(self, step: int, table: HoldoutTable) -> None:
        columns = {name: [row[i] for row in table.rows] for i, name in enumerate(table.columns)}
        columns["step"] = [step] * len(table.rows)
        try:
            self._client.log_table(self.run_id, data=columns, artifact_file="train_telemetry/holdout.json")
        except ImportError:  # log_table needs pandas
            self._client.log_text(self.run_id, table.to_csv(), "train_telemetry/holdout.csv")

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        codes = sorted({d["code"] for d in diagnoses})
        self._client.set_tag(self.run_id, f"{self.prefix}train_telemetry.diagnoses", ",".join(codes) or "none")
        for d in diagnoses:
            self._client.set_tag(self.run_id, f"{self.prefix}train_telemetry.diagnosis.{d['code']}", d["severity"])
        self._client.log_text(self.run_id, text + "\n", "train_telemetry/diagnoses.txt")

    def close(self) -> None:
        if self._owned and self._client is not None:
            self._client.set_terminated(self.run_id)
