"""Mirrors end to end: real tiny training runs mirrored to the real trackers in local/offline
modes, read back through each tracker's own reader and compared with the JSONL step for step;
and fake trackers that raise, take 700 ms a call or never return."""

from __future__ import annotations

import glob
import json
import math
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.mirrors import BaseMirror
from train_telemetry.mirrors.base import record_scalars, record_step
from train_telemetry.records import decode_typed_record

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's sqlite store keeps artifacts in ./mlruns: the test's directory, not the repo."""
    monkeypatch.chdir(tmp_path)


def train(config: TelemetryConfig, steps: int = 24, step_s: float = 0.0) -> Any:
    """A tiny classifier trained for ``steps`` steps with telemetry; returns stop()'s summary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05, "name": "body"},
                           {"params": model[2].parameters(), "lr": 0.1, "name": "head"}])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data((x[:16], y[:16]))
    telemetry.start(model, opt)
    for i in range(1, steps + 1):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, i, 0, None, (x, y), loss=loss, outputs=out)
        if step_s:
            time.sleep(step_s)  # room for the worker: every collection gets its record
    return telemetry.stop()


def jsonl_series(run_dir: Path, rename: Any = lambda k: k) -> dict[str, list[tuple[int, float]]]:
    """Each scalar series of the JSONL: name -> [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "telemetry.jsonl").read_bytes().splitlines():
        record = decode_typed_record(line)
        for key, value in record_scalars(record).items():
            series.setdefault(rename(key), []).append((record_step(record), value))
    return series


def assert_same(held: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]],
                rel: float = 0.0) -> None:
    assert expected and set(expected) <= set(held), sorted(set(expected) - set(held))[:5]
    for key, points in expected.items():
        got = held[key]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert all(math.isclose(a, b, rel_tol=rel, abs_tol=0.0 if rel == 0 else 1e-12)
                   for (_, a), (_, b) in zip(got, points, strict=True)), key


def config(tmp_path: Path, mirror: Any, mode: str = "async", **extra: Any) -> TelemetryConfig:
    return TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=3, mode=mode, mirror=mirror,
                           tuning={"worker_nice": 0, "mirror_drain_s": 60.0}, **extra)


# --- the real trackers -------------------------------------------------------------------------

def tensorboard_series(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_tensorboard_holds_the_jsonls_series_step_for_step(tmp_path: Path, mode: str) -> None:
    """TensorBoard's EventAccumulator reads every series of the JSONL at the same steps (as
    float32, TensorBoard's scalar type), tags as `export --tensorboard` names them; the
    diagnoses and the holdout table are text summaries."""
    pytest.importorskip("tensorboard")
    summary = train(config(tmp_path, ["tensorboard"], mode), step_s=0.02)
    run = tmp_path / "run"
    assert summary.mirrors["tensorboard"].sent == summary.records_written > 0
    held = tensorboard_series(run / "tensorboard")
    assert_same(held, jsonl_series(run, lambda k: k.replace(".", "/", 1)), rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train_telemetry/diagnoses", "train_telemetry/holdout_examples"} <= set(acc.Tags()["tensors"])


def mlflow_series(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_mlflow_holds_the_jsonls_series_step_for_step(tmp_path: Path, mode: str) -> None:
    """MlflowClient.get_metric_history of a local sqlite store equals the JSONL exactly; the run
    is named after the output directory, ended, tagged with the diagnoses, and has the holdout table."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(config(tmp_path, {"mlflow": {"tracking_uri": uri}}, mode), step_s=0.02)
    assert summary.mirrors["mlflow"].sent == summary.records_written > 0
    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert "train_telemetry.diagnoses" in run.data.tags
    assert_same(mlflow_series(uri, run.info.run_id), jsonl_series(tmp_path / "run"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "train_telemetry")}
    assert {"train_telemetry/diagnoses.txt"} <= artifacts and artifacts & {
        "train_telemetry/holdout.json", "train_telemetry/holdout.csv"}


def use_tracking_uri(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """mlflow.set_tracking_uri(uri) for this test only (it is process-wide: under -n 2 the next
    test in this worker must find MLflow as it was, not pinned to this test's store)."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)


def test_mlflow_logs_into_the_users_active_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLflow run active in the trainer at start(): the worker logs into it (no second run),
    its series under telemetry/, and leaves it open."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_tracking_uri(monkeypatch, uri)
    with mlflow.start_run(run_name="mine") as mine:
        mlflow.log_metric("my_loss", 1.0, step=1)
        summary = train(config(tmp_path, ["mlflow"]), step_s=0.02)
        run_id = mine.info.run_id
        status = mlflow.tracking.MlflowClient(uri).get_run(run_id).info.status
    assert status == "RUNNING"  # ours to end, not the mirror's
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(uri).search_runs(["0"])) == 1
    assert summary.mirrors["mlflow"].sent == summary.records_written > 0
    # ours under telemetry/ (mirrors.ATTACHED_PREFIX), the user's own series untouched beside them
    held = mlflow_series(uri, run_id)
    assert_same(held, jsonl_series(tmp_path / "run", lambda k: "telemetry/" + k))
    assert held["my_loss"] == [(1, 1.0)]


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of a W&B offline run file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    block, pos, pending, rows = 32768, 7, b"", []  # 7: the ":W&B" header, magic and version
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_jsonls_series_step_for_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An offline W&B run (its .wandb file, read with wandb's own protobuf Record) holds every
    series of the JSONL at _step = the record's step, and the holdout and diagnoses tables."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = train(config(tmp_path, {"wandb": {"project": "tt-test"}}), step_s=0.02)
    assert summary.mirrors["wandb"].sent == summary.records_written > 0, summary.mirrors
    held: dict[str, list[tuple[int, float]]] = {}
    tables = set()
    for row in wandb_history(tmp_path / "run"):
        for key, value in row.items():
            if key.endswith("/_type") and value == "table-file":  # a wandb.Table, its fields flattened
                tables.add(key.rpartition("/")[0])
            elif not key.startswith("_"):
                held.setdefault(key, []).append((row["_step"], value))
    assert_same(held, jsonl_series(tmp_path / "run"))
    assert {"train_telemetry/holdout_examples", "train_telemetry/diagnoses"} <= tables


def test_trackio_local_store_holds_the_jsonls_series_step_for_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trackio's local store (SQLiteStorage.get_logs) holds every series of the JSONL at the
    record's steps, in a project and run named after the output directory."""
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # the worker's trackio stores here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = train(config(tmp_path, ["trackio"]), step_s=0.02)
    assert summary.mirrors["trackio"].sent == summary.records_written > 0, summary.mirrors
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    held: dict[str, list[tuple[int, float]]] = {}
    for row in sqlite_storage.SQLiteStorage.get_logs("run", run="run"):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)) and not isinstance(value, bool):
                held.setdefault(key, []).append((row["step"], value))
    assert_same(held, jsonl_series(tmp_path / "run"))


# --- trackers that fail ------------------------------------------------------------------------

class RaisingTracker(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise ConnectionError("tracker down")


class SlowTracker(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        time.sleep(0.7)


class HungTracker(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        threading.Event().wait()


class MissingTracker(BaseMirror):
    def open(self, context: Any) -> None:
        import no_such_tracker  # noqa: F401


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_failing_trackers_lose_no_record_and_stop_keeps_its_deadline(tmp_path: Path, mode: str) -> None:
    """A raising, a 700 ms-a-call, a never-returning and a not-installed tracker, together: every
    collection is in the JSONL, stop() returns within its timeout, and the summary says what
    each mirror sent and dropped."""
    cfg = config(tmp_path, [RaisingTracker, SlowTracker, HungTracker, MissingTracker], mode,
                 stop_timeout_s=20.0, overhead_budget=None, on_full="block").replace(
        tuning={"worker_nice": 0, "mirror_drain_s": 1.5})
    t0 = time.monotonic()
    summary = train(cfg, steps=30)
    assert time.monotonic() - t0 < 60
    assert summary.stop_seconds < 20.0 and summary.clean
    assert summary.records_written == summary.snapshots_taken == 10
    lines = (tmp_path / "run" / "telemetry.jsonl").read_bytes().splitlines()
    assert [decode_typed_record(line).batch_idx for line in lines] == list(range(3, 31, 3))
    m = summary.mirrors
    assert (m["RaisingTracker"].failed_calls, m["RaisingTracker"].dropped, m["RaisingTracker"].state) == (10, 10, "ok")
    # 700 ms a call, returning: at stop it keeps its time (stall_s is for calls that never return)
    assert (m["SlowTracker"].sent, m["SlowTracker"].dropped, m["SlowTracker"].state) == (10, 0, "ok")
    assert m["HungTracker"].state == "abandoned" and (m["HungTracker"].sent, m["HungTracker"].dropped) == (0, 10)
    assert m["MissingTracker"].state == "failed" and m["MissingTracker"].dropped == 10
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["mirrors"]["HungTracker"]["state"] == "abandoned"
