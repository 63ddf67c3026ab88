"""A Lightning run: an MLP with BatchNorm on the 8x8 digits, flattened.

Runs in: a harness training process. The telemetry is the README's callback
(``TelemetryCallback(config)``); the holdout comes from the validation dataloader. Bugs are
what goes wrong inside a LightningModule (``configure_optimizers`` missing a module, the
output layer, the init, the inputs, the schedule, a module left in eval mode, manual
optimization without ``zero_grad``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from train_telemetry.integrations.lightning import TelemetryCallback

from .common import Case, table

BUGS = {
    "healthy": "Adam 3e-3 (seed 1: SGD+momentum 0.05 with a cosine schedule)",
    "no_zero_grad": "manual optimization without opt.zero_grad()",
    "eval_mode": "self.eval() in on_train_epoch_start (an evaluation helper left it so)",
    "frozen_bn": "BatchNorm momentum 0",
    "dead_relu": "first layer's bias at -20",
    "saturated_tanh": "tanh activations, weights x20",
    "stale_optimizer": "configure_optimizers returns Adam(self.body.parameters()): the head is left out",
    "softmax_ce": "the model ends in Softmax, fed to cross_entropy",
    "unnormalised": "raw 0..255 pixels",
    "poor_init": "every weight x10 at init",
    "lr_raised": "a step-interval schedule that multiplies the LR by 40 at 2/3 of max_steps (gamma 40, 1/40 meant)",
    "lr_tiny": "Adam at LR 1e-6",
    "lr_zero_early": "a step-interval linear decay reaching 0 at 30% of max_steps",
    "warmup_unfinished": "a linear warm-up 10x longer than the run",
}


# lr_raised: the LR x40 at 2/3 of the run, once the model has learned (the demo's
# non_convergence preset raises it 15x at AdamW 1e-3 / 1e-2). Tried by hand on the three
# classifier programs: at 15x (Adam 0.045) the loss settles back near where it got; at 40x
# (0.12) it bounces far above it; at 100x the CNN's and the Lightning MLP's ReLUs die and
# nothing is learned any more (no_learning). 40x is the strength that gives the symptom.
LR_RAISE = 40.0
# No momentum_high here (classifiers.py has it): SGD momentum 0.99 at 0.05 makes this BatchNorm
# MLP's loss bounce from the first third on, with no growth in its swings (median swing 0.34 in
# the first third, 0.32 in the last; tried by hand): the symptom is non_convergence's (a loss
# bouncing above the holdout's best), which lr_raised measures, not unstable_training's.


class DigitsModule(pl.LightningModule):
    def __init__(self, bug: str, seed: int, steps: int, data: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.bug, self.seed, self.steps, self.data = bug, seed, steps, data
        act = nn.Tanh if bug == "saturated_tanh" else nn.ReLU
        self.body = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128, momentum=0.0 if bug == "frozen_bn" else 0.1), act(),
            nn.Linear(128, 64), act(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)
        self.automatic_optimization = bug != "no_zero_grad"
        with torch.no_grad():
            if bug == "dead_relu":
                norm = self.body[1]
                assert isinstance(norm, nn.BatchNorm1d)
                norm.bias.fill_(-20.0)  # the BatchNorm shift feeding the first ReLU
            scale = {"saturated_tanh": 20.0, "poor_init": 10.0}.get(bug)
            if scale:
                for name, p in self.named_parameters():
                    # weight matrices; for tanh also BatchNorm's scale (it would undo the init)
                    if p.dim() > 1 or (bug == "saturated_tanh" and name.endswith("weight")):
                        p.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return out.softmax(-1) if self.bug == "softmax_ce" else out

    def on_train_epoch_start(self) -> None:
        if self.bug == "eval_mode":
            self.eval()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            assert not isinstance(opt, list)
            self.manual_backward(loss)
            opt.step()  # no opt.zero_grad(): the bug
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        bug, steps = self.bug, self.steps
        params = self.body.parameters() if bug == "stale_optimizer" else self.parameters()
        lr = 1e-6 if bug == "lr_tiny" else 3e-3
        if self.seed == 1 and bug == "healthy":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.005)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt = torch.optim.Adam(params, lr=lr)
        if bug == "lr_zero_early":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / (0.3 * steps)))
        elif bug == "lr_raised":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2 * steps // 3, gamma=LR_RAISE)
        elif bug == "warmup_unfinished":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (10 * steps)))
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        x, y, _, _ = self.data
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(self.seed))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        _, _, x, y = self.data
        return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)


def run(case: Case, out: Path, steps: int) -> None:
    bug, seed = case.bug, case.seed
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    torch.manual_seed(seed)
    x, y, x_hold, y_hold = table("digits", seed, standardise=bug != "unnormalised")
    if bug == "unnormalised":
        x, x_hold = x * 16, x_hold * 16
    module = DigitsModule(bug, seed, steps, (x, y, x_hold, y_hold))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1, check_val_every_n_epoch=1000,
        default_root_dir=str(out / "lightning"),
        callbacks=[TelemetryCallback({"output_dir": str(out), "collect_every_n": 1, "mode": "sync",
                                      "overhead_budget": None, "holdout_size": 64})],
    )  # fmt: skip
    trainer.fit(module)
