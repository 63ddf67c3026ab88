"""on_full: block: every collection written, in seq order, once, with the values sync mode writes;
the worker runs with every core's threads while the trainer waits for it (issue 14)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from train_telemetry import SnapshotData, Telemetry, TelemetryConfig, metric, read_records
from train_telemetry.demo import SiameseNet
from train_telemetry.worker import boost_threads

STEPS = 14
REL = 1e-5


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"img1": torch.randn(8, 1, 8, 8, generator=g), "img2": torch.randn(8, 1, 8, 8, generator=g),
             "winner": torch.randint(0, 2, (8,), generator=g)} for _ in range(n)]


def _train(tmp: Path, mode: str, on_full: str, metrics: list[Any] | None = None,
           after_step: float = 0.0, **settings: Any) -> tuple[list[dict[str, Any]], list[list[torch.Tensor]], Any]:
    """STEPS steps of a seeded run collecting at every step; (records, weights at each hook, summary)."""
    torch.manual_seed(0)
    model = SiameseNet(width=4, embed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(STEPS)
    (tmp / mode).mkdir(exist_ok=True)
    cfg = TelemetryConfig(output_dir=str(tmp / mode / on_full), mode=mode, on_full=on_full, collect_every_n=1,
                          num_slots=2, holdout_size=16, **settings)
    telemetry = Telemetry(cfg, metrics=metrics or [])
    telemetry.set_holdout_data(_batches(2))
    telemetry.start(model, opt)
    weights = []
    for i, batch in enumerate(batches):
        out = model(batch["img1"], batch["img2"])
        loss = nn.functional.cross_entropy(out, batch["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
        telemetry.on_batch_end(model, opt, i, 0, None, batch, loss=loss, outputs=out)
        if after_step:
            time.sleep(after_step)
    summary = telemetry.stop()
    return read_records(tmp / mode / on_full), weights, summary


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=REL, abs=1e-9)
    return bool(a == b)


@pytest.mark.timeout(180)
def test_block_writes_every_collection_once_in_order_with_the_values_of_sync_mode(tmp_path: Path) -> None:
    """Same seeded run in sync and in async + block: one record per step, seq 0..n-1 in file order,
    and every metric value equal (weights also checked against torch at each step)."""
    sync, weights, sync_summary = _train(tmp_path, "sync", "drop")
    block, _, summary = _train(tmp_path, "async", "block")
    assert summary.snapshots_taken == summary.records_written == STEPS and summary.snapshots_dropped == 0
    assert [r["seq"] for r in block] == list(range(STEPS))  # in order, nothing twice, nothing missing
    assert [r["batch_idx"] for r in block] == list(range(STEPS))
    assert len(sync) == STEPS == sync_summary.records_written
    skip = {"timestamp", "time", "telemetry"}  # wall time and the hook's own cost differ by nature
    for s, b in zip(sync, block, strict=True):
        assert s.keys() == b.keys()
        for key in s.keys() - skip:
            assert _close(s[key], b[key]), (key, s[key], b[key])
    for i, record in enumerate(block):  # and against torch, independently of either mode
        norm = float(torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in weights[i]]).double()))
        assert record["weight_norm"]["overall"] == pytest.approx(norm, rel=REL)
        if i:
            delta = float(torch.cat([(a - b).reshape(-1) for a, b in zip(weights[i], weights[i - 1], strict=True)])
                          .double().norm())
            assert record["weight_delta"]["overall"] == pytest.approx(delta, rel=1e-4)


@metric(key="worker_threads", needs={"holdout"})
def _threads_metric(snap: SnapshotData) -> dict[str, float]:
    """A slow record (so the trainer waits), then the worker's torch thread count for the
    holdout forward (the first use of snap.holdout is where the worker re-checks)."""
    time.sleep(0.05)
    assert snap.holdout is not None
    return {"threads": float(torch.get_num_threads()), "pid": float(os.getpid())}


ONLY_THE_THREADS_METRIC = {"track_layers": False, "track_activations": False, "track_model_mode": False,
                           "track_weight_delta": False}


@pytest.mark.skipif(boost_threads() < 2, reason="one core: nothing to boost to")
@pytest.mark.timeout(180)
def test_the_worker_uses_every_core_while_the_trainer_waits_and_one_thread_otherwise(tmp_path: Path) -> None:
    """block with a worker slower than training: records built while the trainer waited show
    boost_threads() threads; a drop run whose trainer never waits builds its records with
    worker_threads (1), until stop() drains."""
    block, _, summary = _train(tmp_path, "async", "block", metrics=[_threads_metric], **ONLY_THE_THREADS_METRIC)
    assert summary.records_written == STEPS
    threads = [r["worker_threads"]["threads"] for r in block]
    assert {r["worker_threads"]["pid"] for r in block} != {float(os.getpid())}  # built by the worker
    # Each record shows the threads of its last check (snapshot start or first holdout use):
    # the trainer, whose steps are far shorter than a record, waits at most of those.
    assert float(boost_threads()) in threads, threads
    # drop, with training slower than the worker: no wait, so one thread (stop() drains nothing).
    drop, _, summary = _train(tmp_path, "async", "drop", metrics=[_threads_metric], after_step=0.3,
                              **ONLY_THE_THREADS_METRIC)
    assert summary.records_written == summary.snapshots_taken
    assert [r["worker_threads"]["threads"] for r in drop[:-2]] == [1.0] * (len(drop) - 2)


def test_weight_norms_come_from_the_delta_pass_and_a_failed_reference_is_reported_once(tmp_path: Path) -> None:
    """SnapshotData.weight_norms: the fused pass's norms (equal to torch's) when there is a
    reference; without one, or when reading it fails, torch's norms, and the failure is still
    raised (as itself) to the first metric that asks for the deltas."""
    from train_telemetry.metrics.api import InputFailed, _Lazy
    from train_telemetry.reference import ReferenceCheckpoint

    g = torch.Generator().manual_seed(1)
    flat = torch.randn(5000, generator=g)
    slot = [flat[:4000].view(40, 100), flat[4000:]]
    ref = ReferenceCheckpoint(tmp_path / "ref.pt", ["w", "b"], 2)
    ref.save([t - 0.25 for t in slot], 3, 0)
    found = ref.distances(slot)
    assert found is not None and found.current_norms is not None
    assert found.current_norms == pytest.approx([float(t.double().norm()) for t in slot], rel=1e-6)
    assert found.deltas == pytest.approx([0.25 * t.numel() ** 0.5 for t in slot], rel=1e-5)

    def snap(lazy: _Lazy | None) -> SnapshotData:
        return SnapshotData(batch_idx=0, epoch=0, seq=0, time=0.0, config=TelemetryConfig(), param_names=["w", "b"],
                            group_names=["g"], group_of=[0, 0], params=slot, _deltas=lazy)

    data = snap(_Lazy(lambda: ref.distances(slot)))
    assert data.weight_norms == found.current_norms
    data = snap(_Lazy(lambda: (_ for _ in ()).throw(OSError("disk gone"))))
    assert data.weight_norms == pytest.approx([float(t.norm()) for t in slot], rel=1e-6)
    with pytest.raises(OSError, match="disk gone"):
        data.weight_deltas  # noqa: B018  (the first reader gets the error itself: it goes into the record)
    with pytest.raises(InputFailed):
        data.weight_deltas  # noqa: B018
    assert copy.copy(snap(None)).weight_norms == pytest.approx([float(t.norm()) for t in slot], rel=1e-6)


@pytest.fixture
def torch_threads() -> Any:
    """Set the trainer's torch thread count for one test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.timeout(180)
def test_auto_builds_inline_when_training_takes_every_core_with_the_records_of_the_worker(
        tmp_path: Path, torch_threads: Any) -> None:
    """mode: auto, a CPU trainer whose torch threads take every usable core: no core is left
    for a worker, so the trainer builds each record itself (telemetry.built_by "trainer",
    summary.mode "sync", no worker process); with on_full: block every collection is written,
    in order, once, with the values the worker writes for the same run."""
    from train_telemetry.sinks import usable_cores

    torch_threads(usable_cores())
    auto, weights, summary = _train(tmp_path, "auto", "block")
    torch_threads(1)
    worker, _, worker_summary = _train(tmp_path, "async", "block")
    assert summary.mode == "sync" and summary.worker_pid is None
    assert worker_summary.mode == "async" and worker_summary.worker_pid is not None
    assert [r["seq"] for r in auto] == [r["batch_idx"] for r in auto] == list(range(STEPS))
    assert {r["telemetry"]["built_by"] for r in auto} == {"trainer"}
    assert {r["telemetry"]["built_by"] for r in worker} == {"worker"}
    skip = {"timestamp", "time", "telemetry"}
    for a, w in zip(auto, worker, strict=True):
        assert a.keys() == w.keys()
        for key in a.keys() - skip:
            assert _close(a[key], w[key]), (key, a[key], w[key])
    info = __import__("json").loads((tmp_path / "auto" / "block" / "run.json").read_text())
    assert info["mode"] == "sync" and "no core is left for a worker" in info["mode_reason"]
    norm = float(torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in weights[-1]]).double()))
    assert auto[-1]["weight_norm"]["overall"] == pytest.approx(norm, rel=REL)


@pytest.mark.skipif(boost_threads() == 1, reason="one usable core: training's one thread always takes it")
@pytest.mark.timeout(120)
def test_auto_keeps_the_worker_when_training_leaves_a_core_idle(tmp_path: Path, torch_threads: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch thread on two or more cores: the worker has a core of its own and builds the
    records (with the default drop, under the default budget). The same thread count with as
    many training processes on the host as cores (LOCAL_WORLD_SIZE, set by torchrun) leaves
    none: inline."""
    from train_telemetry.sinks import resolve_mode, usable_cores

    torch_threads(1)
    records, _, summary = _train(tmp_path, "auto", "drop", after_step=0.05)
    assert summary.mode == "async" and summary.worker_pid is not None
    assert records and {r["telemetry"]["built_by"] for r in records} == {"worker"}
    model = nn.Linear(2, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores()))
    mode, why = resolve_mode(TelemetryConfig(), model)
    assert mode == "sync" and f"1 torch thread x {usable_cores()} processes" in why
    assert resolve_mode(TelemetryConfig(mode="async"), model)[0] == "async"  # as given
    torch_threads(usable_cores())
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_mode(TelemetryConfig(mode="sync"), model)[0] == "sync"
    assert resolve_mode(TelemetryConfig(mode="async"), model)[0] == "async"
