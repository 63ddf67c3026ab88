"""Resume into the same directory: a script restarted from its checkpoint appends a new run
segment to the same records; another model there is refused with the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TinyNet
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, read_records
from train_telemetry.analysis import load_run


def _train(out: Path, steps: range, state: dict | None, model: nn.Module | None = None, **cfg: object) -> dict:
    """One 'script run': load the checkpoint if any, train ``steps`` with telemetry, return the checkpoint at step 50."""
    torch.manual_seed(0)
    model = model or TinyNet(n_in=4, n_out=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=10, mode="sync", **cfg))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(steps.start)
    telemetry.set_holdout_data((torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)))
    telemetry.start(model, opt)
    saved: dict = {}
    for step in steps:
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss)
        if step == 50:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    telemetry.stop()
    return saved


@pytest.mark.timeout(120)
def test_a_resumed_run_appends_a_segment_and_seq_counts_on(tmp_path: Path) -> None:
    """Stopped at step 60, resumed from the step-50 checkpoint: one file, two segments, seq never repeats."""
    out = tmp_path / "run"
    checkpoint = _train(out, range(0, 61), None)
    _train(out, range(51, 81), checkpoint)
    records = read_records(out)
    assert [(r.get("segment", 0), r["batch_idx"]) for r in records] == (
        [(0, s) for s in range(0, 61, 10)] + [(1, s) for s in range(60, 81, 10)])
    assert [r["seq"] for r in records] == list(range(len(records)))
    # batch_idx is a global counter here: the step is batch_idx, the repeated 60 included.
    assert [r["step"] for r in records] == [r["batch_idx"] for r in records]
    meta = json.loads((out / "run.json").read_text())
    assert meta["segment"] == 1 and [s["first_seq"] for s in meta["segments"]] == [0, 7]
    assert json.loads((out / "summary.json").read_text())["segment"] == 1
    # Read as one run: the resumed segment wins for the steps it repeats (60).
    run = load_run(out)
    assert len(run.segments) == 2 and run.resumes == [60]
    assert [(r.get("segment", 0), r["batch_idx"]) for r in run.records][-4:] == [(0, 50), (1, 60), (1, 70), (1, 80)]
    assert [r["batch_idx"] for r in run.superseded] == [60]
    report = subprocess.run([sys.executable, "-m", "train_telemetry.cli", "report", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert "2 segments: resumed at step 60" in report.stdout, report.stdout + report.stderr


@pytest.mark.timeout(120)
def test_another_model_in_the_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A different model (or record settings) in an output_dir with records: a clear error; overwrite replaces."""
    out = tmp_path / "run"
    _train(out, range(0, 21), None)
    with pytest.raises(TelemetryConfigError, match=r"fresh directory.*overwrite: true.*model differs: body.weight"):
        _train(out, range(0, 21), None, model=TinyNet(n_in=4, hidden=16, n_out=2))
    with pytest.raises(TelemetryConfigError, match=r"holdout_size was 50, now 7"):
        _train(out, range(0, 21), None, holdout_size=7)
    _train(out, range(0, 11), None, model=TinyNet(n_in=4, hidden=16, n_out=2), overwrite=True)
    assert [(r.get("segment", 0), r["seq"]) for r in read_records(out)] == [(0, 0), (0, 1)]


def _epochs(out: Path, epochs: range, mode: str) -> None:
    """Train ``epochs`` of 10 batches whose ``batch_idx`` restarts at 0 each epoch."""
    torch.manual_seed(0)
    model = TinyNet(n_in=4, n_out=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=3, mode=mode,  # type: ignore[arg-type]
                                          on_full="block", overhead_budget=None))
    telemetry.start(model, opt)
    for epoch in epochs:
        for batch_idx in range(10):
            x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            telemetry.on_batch_end(model, opt, batch_idx, epoch, None, (x, y))
    assert telemetry.stop().records_written == 4 * len(epochs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_step_counts_on_where_batch_idx_restarts_each_epoch_and_across_a_resume(tmp_path: Path, mode: str) -> None:
    """The record's ``step`` never goes back: epoch e's batch b is step 10e + b, from the worker and
    inline alike, and a resumed run's next epoch counts on from the last record."""
    out = tmp_path / "run"
    _epochs(out, range(0, 2), mode)
    _epochs(out, range(2, 3), mode)  # resumed: a new start() into the same directory, at epoch 2
    records = read_records(out)
    expected = [(e, b, 10 * e + b) for e in range(3) for b in (0, 3, 6, 9)]
    assert [(r["epoch"], r["batch_idx"], r["step"]) for r in records] == expected
    assert load_run(out).steps == [step for _, _, step in expected]
