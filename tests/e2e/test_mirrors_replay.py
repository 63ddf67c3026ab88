"""``train-telemetry mirror``: a finished run sent to trackers, and a live one followed until it
stops; read back through the trackers' own readers and compared with the JSONL."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from test_mirrors import assert_same, jsonl_series, mlflow_series, tensorboard_series  # noqa: I001

from train_telemetry.cli import main
from train_telemetry.records import encode_record
from train_telemetry.testing import make_meta, make_records, make_summary, write_run

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's sqlite store keeps artifacts in ./mlruns: the test's directory, not the repo."""
    monkeypatch.chdir(tmp_path)


def test_mirror_sends_a_finished_run_to_tensorboard_and_mlflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every record of a recorded run reaches both trackers at its step; exit status 0."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = write_run(tmp_path / "run", make_records(n=8), meta=make_meta(), summary=make_summary(8))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    status = main(["mirror", str(run), "--to", "tensorboard", "--log-dir", str(tmp_path / "tb"),
                   "--to", "mlflow", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "tensorboard: sent 8 of 8 records, dropped 0, ok" in out
    assert_same(tensorboard_series(tmp_path / "tb"), jsonl_series(run, lambda k: k.replace(".", "/", 1)), rel=1e-6)
    (mlrun,) = MlflowClient(uri).search_runs(["0"])
    assert_same(mlflow_series(uri, mlrun.info.run_id), jsonl_series(run))
    assert "train_telemetry.diagnoses" in mlrun.data.tags


def test_mirror_follow_sends_what_a_live_run_appends_until_it_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--follow: records appended while it runs are sent; summary.json ends it."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    records = make_records(n=6)
    write_run(run, records[:2], meta=make_meta())

    def train() -> None:
        for record in records[2:]:
            time.sleep(0.3)
            with open(run / "telemetry.jsonl", "ab") as f:
                f.write(encode_record(record))
        (run / "summary.json").write_text(json.dumps(make_summary(6)))

    writer = threading.Thread(target=train)
    writer.start()
    status = main(["mirror", str(run), "--to", "tensorboard", "--log-dir", str(tmp_path / "tb"), "--follow",
                   "--interval", "0.1", "--max-seconds", "60"])
    writer.join()
    assert status == 0
    assert "sent 6 of 6 records" in capsys.readouterr().out
    assert_same(tensorboard_series(tmp_path / "tb"), jsonl_series(run, lambda k: k.replace(".", "/", 1)), rel=1e-6)


def test_mirror_names_a_bad_tracker_and_its_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --to exits 2 naming the valid trackers."""
    run = write_run(tmp_path / "run", make_records(n=2))
    assert main(["mirror", str(run), "--to", "tensorbord"]) == 2
    assert "did you mean 'tensorboard'? valid: tensorboard, mlflow, wandb, trackio" in capsys.readouterr().err
