"""The Lightning integration: real ``Trainer.fit`` runs on tiny modules, on CPU.

An automatic-optimization module with ``accumulate_grad_batches=2`` and a manual-optimization
module with two optimizers. Every recorded gradient norm, LR, weight delta, train loss and
holdout prediction is compared with an independent computation that a test-only callback,
registered after ours, takes from the live module at the same step.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from train_telemetry import read_records  # noqa: E402
from train_telemetry.integrations.lightning import TelemetryCallback  # noqa: E402

REL = 1e-5


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    return [{"x": x[i], "y": y[i]} for i in range(n)]


class Base(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(48, seed=1), batch_size=4, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(16, seed=2), batch_size=4)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass


class Automatic(Base):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["x"])
        return {"loss": nn.functional.cross_entropy(logits, batch["y"]), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD([
            {"params": [*self.embed.parameters(), *self.body.parameters()], "lr": 0.05, "name": "backbone"},
            {"params": self.head.parameters(), "lr": 0.2, "name": "head"},
        ], momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.2 * s))  # changes every step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Manual(Base):
    """Two optimizers, stepped by hand: embed+body (two named groups) with SGD, the head with Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        opt_a, opt_b = self.optimizers()
        logits = self(batch["x"])
        loss = nn.functional.cross_entropy(logits, batch["y"])
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        for sched in self.lr_schedulers():
            sched.step()
        return {"loss": loss.detach(), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        opt_a = torch.optim.SGD([
            {"params": self.embed.parameters(), "lr": 0.05, "name": "embed"},
            {"params": self.body.parameters(), "lr": 0.1, "name": "body"},
        ], momentum=0.9)
        opt_b = torch.optim.Adam([{"params": self.head.parameters(), "lr": 0.01, "name": "head"}])
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.2 * s)) for o in (opt_a, opt_b)]
        return [opt_a, opt_b], scheds


def total_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def close(a: float | None, b: float | None, rel: float = REL) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-8)


class Expect(pl.Callback):
    """Test-only: what the records must hold, from the live module at the step's on_train_batch_end."""

    def __init__(self, holdout: dict[str, torch.Tensor], every: int) -> None:
        self.holdout = holdout
        self.every = every
        self.rows: list[dict[str, Any]] = []
        self.previous: dict[str, list[torch.Tensor]] = {}
        self.lrs_used: dict[str, float] = {}
        self.losses: list[torch.Tensor] = []
        self.last_step = 0
        self.batches_stepped = 0

    @staticmethod
    def groups(trainer: Any) -> dict[str, list[torch.nn.Parameter]]:
        return {g["name"]: list(g["params"]) for opt in trainer.optimizers for g in opt.param_groups}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.previous = {n: [p.detach().clone() for p in ps] for n, ps in self.groups(trainer).items()}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs_used.update({g["name"]: float(g["lr"]) for g in optimizer.param_groups})  # before any scheduler step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        if trainer.global_step == self.last_step:
            return  # accumulating: no optimizer step in this batch
        self.last_step = trainer.global_step
        self.batches_stepped += 1
        step = trainer.global_step if pl_module.automatic_optimization else self.batches_stepped
        losses, self.losses = self.losses, []
        if step % self.every:
            return
        groups = self.groups(trainer)
        weights = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}
        deltas = {n: total_norm([w - r for w, r in zip(weights[n], self.previous[n], strict=True)]) for n in groups}
        self.previous = weights
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(self.holdout["x"])
        pl_module.train()
        self.rows.append({
            "step": step,
            "global_step": trainer.global_step,
            "grads": {n: total_norm([p.grad for p in ps if p.grad is not None]) for n, ps in groups.items()},
            "grad": total_norm([p.grad for ps in groups.values() for p in ps if p.grad is not None]),
            "lrs": dict(self.lrs_used),
            "deltas": deltas,
            "delta": math.sqrt(sum(d * d for d in deltas.values())),
            "logits": logits.clone(),
            "loss": float(torch.stack(losses).sum()),
            "labels": batch["y"].tolist(),
        })


def fit(tmp_path: Path, module: pl.LightningModule, config: dict[str, Any], **trainer_args: Any) -> tuple[list[dict], Expect, TelemetryCallback]:
    holdout_rows = make_data(16, seed=2)[: config["holdout_size"]]
    holdout = {"x": torch.stack([r["x"] for r in holdout_rows]), "y": torch.stack([r["y"] for r in holdout_rows])}
    callback = TelemetryCallback(config={"input_keys": ["x"], "label_key": "y", "on_full": "block", **config})
    expect = Expect(holdout, config["collect_every_n"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path / "root"),
        callbacks=[callback, expect], **trainer_args,  # ours first: Expect sees the same moment after it
    )
    trainer.fit(module)
    assert callback.summary is not None and callback.summary.clean
    return read_records(tmp_path / "root" / "telemetry"), expect, callback


def check(records: list[dict], expect: Expect, names: tuple[str, ...], holdout_labels: list[int]) -> None:
    assert [r["batch_idx"] for r in records] == [row["step"] for row in expect.rows]
    assert expect.rows, "nothing was collected"
    for rec, row in zip(records, expect.rows, strict=True):
        assert close(rec["gradient_norm"]["overall"], row["grad"]), (rec["gradient_norm"], row["grads"])
        for name in names:
            assert close(rec["gradient_norm"][name], row["grads"][name])
            assert close(rec["learning_rates"][name], row["lrs"][name]), (rec["learning_rates"], row["lrs"])
            assert close(rec["weight_delta"][name], row["deltas"][name], rel=1e-4)
        assert close(rec["weight_delta"]["overall"], row["delta"], rel=1e-4)
        assert close(rec["train"]["loss"], row["loss"])
        hold = rec["holdout_logits"]
        assert torch.allclose(torch.tensor(hold["logits"]), row["logits"], rtol=REL, atol=1e-6)
        assert hold["predictions"] == row["logits"].argmax(1).tolist()
        assert hold["labels"] == holdout_labels
        counts = [row["labels"].count(c) for c in range(3)]
        assert rec["batch_stats"]["batch_size"] == len(row["labels"])
        for c in range(3):
            assert close(rec["batch_stats"].get(f"y_{c}_pct", 0.0), 100.0 * counts[c] / len(row["labels"]))


@pytest.mark.timeout(240)
def test_automatic_optimization_with_accumulation_records_each_real_step(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: one record per optimizer step, numbered trainer.global_step, equal to the live module's values."""
    config = {"collect_every_n": 2, "holdout_size": 10, "mode": "async"}
    records, expect, _ = fit(tmp_path, Automatic(), config, max_steps=8, accumulate_grad_batches=2)
    assert [r["batch_idx"] for r in records] == [2, 4, 6, 8]
    assert [r["epoch"] for r in records] == [0, 0, 0, 1]  # 12 batches = 6 steps per epoch
    # The LR the step used: the scheduler's value before its step, 0.05 / (1 + 0.2 * (step - 1)).
    for rec in records:
        assert close(rec["learning_rates"]["backbone"], 0.05 / (1 + 0.2 * (rec["batch_idx"] - 1)))
    holdout_labels = [int(r["y"]) for r in make_data(16, seed=2)[:10]]
    check(records, expect, ("backbone", "head"), holdout_labels)


@pytest.mark.timeout(240)
def test_manual_optimization_with_two_optimizers_records_every_group_once_per_batch(tmp_path: Path) -> None:
    """Manual optimization, two optimizers: one record per training batch, all three named groups, exact values."""
    config = {"collect_every_n": 3, "holdout_size": 8, "mode": "sync"}
    records, expect, _ = fit(tmp_path, Manual(), config, max_steps=18)  # 18 = 9 batches x 2 optimizer steps
    assert [r["batch_idx"] for r in records] == [3, 6, 9]
    assert [row["global_step"] for row in expect.rows] == [6, 12, 18]  # global_step counts both optimizers
    for rec in records:
        assert set(rec["learning_rates"]) >= {"group_0", "group_1", "group_2", "embed", "body", "head"}
        assert rec["learning_rates"]["group_2"] == rec["learning_rates"]["head"]
    holdout_labels = [int(r["y"]) for r in make_data(16, seed=2)[:8]]
    check(records, expect, ("embed", "body", "head"), holdout_labels)


class Exploding(Automatic):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        if self.trainer.global_step >= 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.timeout(240)
def test_an_exception_in_training_stops_telemetry_with_everything_written(tmp_path: Path) -> None:
    """When training_step raises, on_exception stops the Telemetry: the records before it are on disk and the summary is clean."""
    callback = TelemetryCallback(config={"input_keys": ["x"], "label_key": "y", "collect_every_n": 1,
                                         "holdout_size": 4, "mode": "sync"})
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=10,
                         default_root_dir=str(tmp_path / "root"), callbacks=[callback])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Exploding())
    assert callback.telemetry is None and callback.summary is not None
    assert callback.summary.clean and callback.summary.records_written == 3
    assert [r["batch_idx"] for r in read_records(tmp_path / "root" / "telemetry")] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_a_missing_lightning_names_the_extra_to_install() -> None:
    """Importing the integration with neither lightning nor pytorch_lightning raises ImportError naming the pip extra."""
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "try:\n"
        "    import train_telemetry.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert "pip install 'train-telemetry[lightning]'" in out.stdout, out.stderr
