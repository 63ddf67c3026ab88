"""``mirror: framework``: the Lightning callback mirrors into the Trainer's own loggers' runs
(TensorBoardLogger's directory, MLFlowLogger's run) with no second configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from test_integration_lightning import Automatic  # noqa: E402
from test_mirrors import assert_same, jsonl_series, mlflow_series, tensorboard_series  # noqa: E402

from train_telemetry.integrations.lightning import TelemetryCallback  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's sqlite store keeps artifacts in ./mlruns: the test's directory, not the repo."""
    monkeypatch.chdir(tmp_path)


def test_lightning_framework_mirror_logs_into_the_trainers_loggers(tmp_path: Path) -> None:
    """The records' series land in the MLFlowLogger's run and the TensorBoardLogger's directory."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    ml = MLFlowLogger(experiment_name="exp", tracking_uri=uri)
    callback = TelemetryCallback({"collect_every_n": 2, "mode": "sync", "tuning": {"mirror_drain_s": 60.0}},
                                 mirror="framework")
    trainer = pl.Trainer(max_epochs=1, logger=[tb, ml], callbacks=[callback], default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(Automatic())
    summary = callback.summary
    assert summary is not None and set(summary.mirrors) == {"tensorboard", "mlflow"}
    assert all(s.sent == summary.records_written > 0 for s in summary.mirrors.values()), summary.mirrors
    run = tmp_path / "telemetry"
    assert_same(mlflow_series(uri, ml.run_id), jsonl_series(run))
    held = tensorboard_series(Path(tb.log_dir))
    assert_same(held, jsonl_series(run, lambda k: k.replace(".", "/", 1)), rel=1e-6)
