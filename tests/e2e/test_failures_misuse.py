"""API misuse: the wrong call order is a clear error or a harmless no-op, never a hang or a crash.

stop() twice, start() twice, the hook before start()/after stop(), the context manager
with a failing block, and the hook called in a forked DataLoader worker. See failure
modes F9 and F23 in the research notes.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.config import Tuning
from train_telemetry.demo import SiameseNet


def make_batch(g: torch.Generator, n: int = 8) -> dict[str, torch.Tensor]:
    return {
        "img1": torch.randn(n, 1, 8, 8, generator=g),
        "img2": torch.randn(n, 1, 8, 8, generator=g),
        "winner": torch.randint(0, 2, (n,), generator=g),
    }


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss = nn.functional.cross_entropy(model(batch["img1"], batch["img2"]), batch["winner"])
    opt.zero_grad()
    loss.backward()
    opt.step()


def tiny_run() -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(0)
    model = SiameseNet(width=4, embed=8)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), torch.Generator().manual_seed(0)


def config(tmp_path: Path, **overrides: Any) -> TelemetryConfig:
    base: dict[str, Any] = {"output_dir": str(tmp_path / "run"), "collect_every_n": 1, "on_full": "block", "mode": "async",
                            "stop_timeout_s": 30.0, "tuning": Tuning(worker_nice=0)}
    base.update(overrides)
    return TelemetryConfig(**base)


def telemetry_warnings(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if "train-telemetry" in str(w.message) and text in str(w.message)]


@pytest.mark.timeout(30)
def test_stop_twice_returns_the_same_summary(tmp_path: Path) -> None:
    """A second stop() changes nothing and returns the first call's summary."""
    model, opt, g = tiny_run()
    telemetry = Telemetry(config(tmp_path, mode="sync")).start(model, opt)
    for step in range(3):
        batch = make_batch(g)
        train_step(model, opt, batch)
        telemetry.on_batch_end(model, opt, step, 0, None, batch)
    first = telemetry.stop()
    second = telemetry.stop()
    assert second is first
    assert first.records_written == 3
    assert len(read_records(tmp_path / "run")) == 3


@pytest.mark.timeout(30)
def test_start_twice_and_start_after_stop_are_clear_errors(tmp_path: Path) -> None:
    """start() on a running instance, or after stop(), raises a RuntimeError that says what to do."""
    model, opt, _ = tiny_run()
    telemetry = Telemetry(config(tmp_path, mode="sync")).start(model, opt)
    with pytest.raises(RuntimeError, match="called twice.*call stop"):
        telemetry.start(model, opt)
    telemetry.stop()
    with pytest.raises(RuntimeError, match="after stop.*create a new Telemetry"):
        telemetry.start(model, opt)


@pytest.mark.timeout(60)
def test_hook_before_start_starts_and_after_stop_is_a_no_op_with_one_warning_each(tmp_path: Path) -> None:
    """The hook before start() starts telemetry in the background (one warning, a later start() is
    then a no-op); after stop() it writes nothing and warns once, however often it is called."""
    model, opt, g = tiny_run()
    telemetry = Telemetry(config(tmp_path, mode="sync"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            telemetry.on_batch_end(model, opt, step, 0, None, make_batch(g))
        telemetry.start(model, opt)  # waits for the background start, then returns: no "called twice"
        telemetry.on_batch_end(model, opt, 5, 0, None, make_batch(g))
        summary = telemetry.stop()
        for step in range(5):
            telemetry.on_batch_end(model, opt, step, 0, None, make_batch(g))
    assert len(telemetry_warnings(caught, "before start()")) == 1
    assert len(telemetry_warnings(caught, "after stop()")) == 1
    records = read_records(tmp_path / "run")
    assert records and records[-1]["batch_idx"] == 5
    assert summary.snapshots_taken == len(records) and summary.snapshots_taken + summary.snapshots_dropped == 6


@pytest.mark.timeout(60)
def test_context_manager_reraises_the_users_exception_after_flushing(tmp_path: Path) -> None:
    """An exception in a ``with telemetry:`` block propagates unchanged, after every snapshot was written."""
    model, opt, g = tiny_run()
    telemetry = Telemetry(config(tmp_path))
    telemetry.set_holdout_data(make_batch(g, 16))

    class UserError(Exception):
        pass

    with pytest.raises(UserError, match="the training loop failed"), telemetry.start(model, opt):
        for step in range(5):
            batch = make_batch(g)
            train_step(model, opt, batch)
            telemetry.on_batch_end(model, opt, step, 0, None, batch)
        raise UserError("the training loop failed")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["records_written"] == summary["snapshots_taken"] == 5 and summary["clean"] is True
    assert [r["batch_idx"] for r in read_records(tmp_path / "run")] == [0, 1, 2, 3, 4]
    assert telemetry.stop().records_written == 5  # the with block's stop() already ran


class HookingDataset(Dataset[dict[str, Any]]):
    """A dataset whose __getitem__ calls the telemetry hook and stop(), as a careless user might."""

    def __init__(self, telemetry: Telemetry, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.telemetry, self.model, self.opt = telemetry, model, opt
        self.batches = [make_batch(torch.Generator().manual_seed(i), 1) for i in range(8)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            self.telemetry.on_batch_end(self.model, self.opt, 0, 0, None, self.batches[i])
            child_summary = self.telemetry.stop()
            seconds = time.monotonic() - t0
        item = {k: v[0] for k, v in self.batches[i].items()}
        item["child_warnings"] = torch.tensor(len(caught))
        item["child_records"] = torch.tensor(child_summary.records_written + child_summary.snapshots_taken)
        item["child_seconds"] = torch.tensor(seconds)
        return item


@pytest.mark.timeout(90)
def test_hook_in_a_forked_dataloader_worker_is_a_no_op(tmp_path: Path) -> None:
    """In a fork()ed DataLoader worker the hook and stop() do nothing and never touch the trainer's worker or file."""
    model, opt, g = tiny_run()
    telemetry = Telemetry(config(tmp_path))
    telemetry.set_holdout_data(make_batch(g, 16))
    telemetry.start(model, opt)
    loader = DataLoader(HookingDataset(telemetry, model, opt), batch_size=2, num_workers=2,
                        multiprocessing_context="fork")
    step = 0
    for _epoch in range(2):
        for batch in loader:
            assert int(batch["child_warnings"].sum()) == 0
            assert int(batch["child_records"].sum()) == 0
            assert float(batch["child_seconds"].max()) < 5.0
            train_step(model, opt, batch)
            telemetry.on_batch_end(model, opt, step, 0, None, batch)
            step += 1
    summary = telemetry.stop()
    assert summary.records_written == summary.snapshots_taken == step == 8
    assert summary.clean is True
    assert [r["seq"] for r in read_records(tmp_path / "run")] == list(range(8))
