"""``mirror: framework``: the Lightning callback mirrors into the Trainer's own loggers' runs
(TensorBoardLogger's directory, MLFlowLogger's run) with no second configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from test_integration_lightning import Automatic  # noqa: E402
from test_mirrors import (  # noqa: E402
    assert_same,
    jsonl_series,
    mlflow_series,
    tensorboard_series,
    use_tracking_uri,
)

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
    # in the loggers' own runs, ours under telemetry/: apart from what the LightningModule logs
    assert_same(mlflow_series(uri, ml.run_id), jsonl_series(run, lambda k: "telemetry/" + k))
    held = tensorboard_series(Path(tb.log_dir))
    assert_same(held, jsonl_series(run, lambda k: "telemetry/" + k.replace(".", "/", 1)), rel=1e-6)


def test_hf_trainer_framework_mirror_logs_into_report_tos_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to=["tensorboard", "mlflow"] and mirror="framework": the records' series land in the
    TensorBoardCallback's log directory and in the run the MLflowCallback opened, step for step."""
    transformers = pytest.importorskip("transformers")
    import mlflow
    from test_integration_transformers import make_examples, make_model

    from train_telemetry.integrations.transformers import TelemetryCallback as HFCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_tracking_uri(monkeypatch, uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-2,
        logging_steps=1, report_to=["tensorboard", "mlflow"], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = HFCallback({"collect_every_n": 2, "mode": "sync", "tuning": {"mirror_drain_s": 60.0}},
                          mirror="framework")
    trainer = transformers.Trainer(model=make_model(), args=args, train_dataset=make_examples(24, 0),
                                   data_collator=transformers.default_data_collator, callbacks=[callback])
    trainer.train()
    summary = callback.summary
    assert summary is not None and set(summary.mirrors) == {"tensorboard", "mlflow"}, summary
    assert all(s.sent == summary.records_written == 3 for s in summary.mirrors.values()), summary.mirrors
    run = tmp_path / "out" / "telemetry"
    runs = mlflow.search_runs(experiment_names=["hf"], output_format="list")
    assert len(runs) == 1  # ours went into the Trainer's run, not a second one
    # ours under telemetry/, the Trainer's own series (loss, epoch, train/loss) untouched beside them
    held = mlflow_series(uri, runs[0].info.run_id)
    assert_same(held, jsonl_series(run, lambda k: "telemetry/" + k))
    assert [s for s, _ in held["loss"]] == [1, 2, 3, 4, 5, 6] and "epoch" in held
    (tb,) = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback"]
    board = tensorboard_series(Path(tb.logging_dir))
    assert_same(board, jsonl_series(run, lambda k: "telemetry/" + k.replace(".", "/", 1)), rel=1e-6)
    assert [s for s, _ in board["train/loss"]] == [1, 2, 3, 4, 5, 6]
