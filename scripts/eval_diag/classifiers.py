"""Two raw-loop classifiers: an MLP on a scikit-learn table and a small CNN on 8x8 digits.

Runs in: a harness training process. The loop is the README's: forward, loss,
``zero_grad``, backward, step, scheduler, ``telemetry.on_batch_end(model, opt, step, ...)``.
Bugs are what users get wrong in such a loop (see :data:`BUGS`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from train_telemetry import Telemetry

from .common import Case, table, telemetry_config

# bug -> what the injection is (the loop below reads the names)
BUGS = {
    "healthy": "Adam 3e-3, constant LR (seed 1: SGD+momentum 0.05, warm-up then cosine decay)",
    "no_zero_grad": "optimizer.zero_grad() never called",
    "no_zero_grad_clip": "optimizer.zero_grad() never called, gradients clipped at 1.0 (telemetry.clip_grad_norm_)",
    "eval_mode": "model.eval() before training and never model.train() (BatchNorm model)",
    "frozen_bn": "BatchNorm momentum 0",
    "dead_relu": "first layer's bias at -20",
    "saturated_tanh": "tanh activations, weights x20",
    "unstable": "SGD momentum 0.9 at LR 0.5",
    "momentum_high": "SGD at LR 0.05 with momentum 0.99 (0.9 meant): the loss swings ever wider",
    "lr_raised": "a step schedule that multiplies the LR by 40 at 2/3 of the run (gamma 40, 1/40 meant)",
    "adam_lr_high": "Adam at LR 0.1",
    "stale_optimizer": "the head (MLP) / the whole model (CNN) re-created after the optimizer was built",
    "softmax_ce": "the model ends in Softmax, fed to CrossEntropyLoss",
    "unnormalised": "raw inputs (no standardisation; digits as 0..255 pixels)",
    "poor_init": "every weight x10 at init",
    "lr_tiny": "Adam at LR 1e-6",
    "lr_zero_early": "linear decay that reaches 0 at 30% of the run (scheduler length wrong)",
    "warmup_unfinished": "a linear warm-up 10x longer than the run",
}


# lr_raised: the LR x40 at 2/3 of the run, once the model has learned (the demo's
# non_convergence preset raises it 15x at AdamW 1e-3 / 1e-2). Tried by hand on the three
# classifier programs: at 15x (Adam 0.045) the loss settles back near where it got; at 40x
# (0.12) it bounces far above it; at 100x the CNN's and the Lightning MLP's ReLUs die and
# nothing is learned any more (no_learning). 40x is the strength that gives the symptom.
LR_RAISE = 40.0
# momentum_high: SGD momentum 0.99 where 0.9 was meant, at LR 0.05 (the demo's unstable preset:
# 0.99 at 0.05): the effective step is 100x the LR, the loss swings ever wider.
MOMENTUM_HIGH = 0.99
MOMENTUM_LR = 0.05


class Net(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.softmax = nn.Softmax(dim=-1) if softmax else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return self.softmax(out) if self.softmax is not None else out


def _mlp(features: int, classes: int, bug: str, batchnorm: bool) -> Net:
    act = nn.Tanh if bug == "saturated_tanh" else nn.ReLU
    layers: list[nn.Module] = [nn.Linear(features, 64)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(64, momentum=0.0 if bug == "frozen_bn" else 0.1))
    layers += [act(), nn.Linear(64, 64), act()]
    return Net(nn.Sequential(*layers), nn.Linear(64, classes), softmax=bug == "softmax_ce")


def _cnn(classes: int, bug: str) -> Net:
    act = nn.Tanh if bug == "saturated_tanh" else nn.ReLU
    momentum = 0.0 if bug == "frozen_bn" else 0.1
    body = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum), act(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32, momentum=momentum), act(),
        nn.MaxPool2d(2), nn.Flatten(),
    )  # fmt: skip
    return Net(body, nn.Linear(32 * 4 * 4, classes), softmax=bug == "softmax_ce")


def _alter(model: nn.Module, bug: str) -> None:
    with torch.no_grad():
        if bug == "dead_relu":
            # the layer feeding the first ReLU (a BatchNorm's shift where there is one)
            modules = list(model.modules())
            first_relu = next(i for i, m in enumerate(modules) if isinstance(m, nn.ReLU))
            bias = modules[first_relu - 1].bias
            assert isinstance(bias, torch.Tensor)
            bias.fill_(-20.0)
        scale = {"saturated_tanh": 20.0, "poor_init": 10.0}.get(bug)
        if scale:
            for name, p in model.named_parameters():
                # weight matrices; for tanh also BatchNorm's scale (it would undo the init)
                if p.dim() > 1 or (bug == "saturated_tanh" and name.endswith("weight")):
                    p.mul_(scale)


def run(case: Case, out: Path, steps: int) -> None:
    """Train ``case`` (program "mlp" or "cnn") with telemetry into ``out``."""
    bug, seed = case.bug, case.seed
    torch.manual_seed(seed)
    cnn = case.program == "cnn"
    raw = bug == "unnormalised"
    x, y, x_hold, y_hold = table("digits" if cnn else "breast_cancer", seed, standardise=not raw)
    if cnn:
        if raw:
            x, x_hold = x * 16, x_hold * 16  # 0..16 intensities as 0..255 pixels
        x, x_hold = x.reshape(-1, 1, 8, 8), x_hold.reshape(-1, 1, 8, 8)
    classes = int(y.max()) + 1

    def build() -> Net:
        if cnn:
            return _cnn(classes, bug)
        return _mlp(x.shape[1], classes, bug, batchnorm=bug in ("eval_mode", "frozen_bn") or seed == 2)

    model = build()
    _alter(model, bug)
    sgd = bug in ("unstable", "momentum_high") or (bug == "healthy" and seed == 1)
    lr = {"unstable": 0.5, "adam_lr_high": 0.1, "lr_tiny": 1e-6, "momentum_high": MOMENTUM_LR}.get(bug, 0.05 if sgd else 3e-3)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM_HIGH if bug == "momentum_high" else 0.9)
        if sgd
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    if bug == "stale_optimizer":
        if cnn:
            model = build()  # re-created (e.g. re-seeded) after the optimizer was built
        else:
            model.head = nn.Linear(64, classes)  # a new head for the label set, after the optimizer

    def factor(s: int) -> float:
        if bug == "lr_zero_early":
            return max(0.0, 1 - s / (0.3 * steps))
        if bug == "warmup_unfinished":
            return min(1.0, (s + 1) / (10 * steps))
        if bug == "lr_raised":
            return LR_RAISE if s >= 2 * steps // 3 else 1.0
        if bug == "healthy" and seed == 1:
            warm = 20
            return (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    telemetry = Telemetry(telemetry_config(out))
    telemetry.set_holdout_data((x_hold[:64], y_hold[:64]))
    telemetry.start(model, opt)
    model.train(bug != "eval_mode")
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    step, epoch, batch_size = 0, 0, 32
    while step < steps:
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            xb, yb = x[order[start : start + batch_size]], y[order[start : start + batch_size]]
            outputs = model(xb)
            loss = loss_fn(outputs, yb)
            if bug not in ("no_zero_grad", "no_zero_grad_clip"):
                opt.zero_grad()
            loss.backward()
            if bug == "no_zero_grad_clip":
                telemetry.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            scheduler.step()
            step += 1
            telemetry.on_batch_end(model, opt, step, epoch, None, (xb, yb), loss=loss, outputs=outputs)
            if step >= steps:
                break
        epoch += 1
    telemetry.stop()
