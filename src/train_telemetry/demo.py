"""The seed's scenario, runnable: a Siamese pair model trained with telemetry on.

Runs in: the training process (``scripts/demo.py`` and the tests import it).

Task: given two handwritten digits (scikit-learn's bundled 8x8 digits, no download),
predict which one shows the larger digit (``winner`` = 1 when ``img2`` does). A shared
conv backbone embeds each image; a head compares the embeddings. Backbone and head are
two param groups named ``backbone`` and ``head`` with LR 1x and 10x, as in the seed.

Presets inject known pathologies into the same real run, so the report's diagnoses can
be checked against a known truth (see :data:`PRESETS`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PRESETS", "SiameseNet", "DemoData", "load_digit_pairs", "make_optimizer", "train"]

PRESETS = {
    "healthy": "the seed's setup: backbone LR 1x, head LR 10x, shuffled balanced batches",
    "frozen_backbone": "backbone parameters left with requires_grad=False (forgot to unfreeze)",
    "head_lr_100x": "head LR 100x the backbone's instead of 10x",
    "single_class_batches": "batches sorted by label, so every batch holds one class",
    "shuffled_labels": "training labels shuffled relative to the inputs: nothing to learn",
    "exploding_lr": "LR 300x too high: gradients explode",
    "no_zero_grad": "the loop never calls optimizer.zero_grad(): gradients sum over steps",
    "dead_relu": "the embedding layer's bias starts at -10: its ReLUs never fire",
    "saturated_tanh": "tanh activations with 10x initial weights: most units saturate",
    "eval_mode": "the loop calls model.eval() instead of model.train(): BatchNorm never updates",
    "frozen_bn": "BatchNorm momentum 0: its running statistics never move",
    "unstable": "SGD with momentum 0.99 at LR 0.05: the loss swings ever wider",
    "non_convergence": "the LR schedule raises the LR 15x at 2/3 of the run (gamma 15, not 1/15): "
    "the loss bounces far above where it got",
}

BASE_LR = 1e-3  # backbone LR (AdamW); the head gets 10x


class Backbone(nn.Module):
    def __init__(
        self, width: int = 16, embed: int = 32, activation: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            activation(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            activation(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, embed),
            activation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # [B, 1, 8, 8] -> [B, embed]


class SiameseNet(nn.Module):
    """Two images -> 2 logits: which one shows the larger digit."""

    def __init__(
        self, width: int = 16, embed: int = 32, activation: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.backbone = Backbone(width, embed, activation)
        self.head = nn.Sequential(nn.Linear(3 * embed, 64), activation(), nn.Linear(64, 2))

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        e1, e2 = self.backbone(img1), self.backbone(img2)
        return self.head(torch.cat([e1, e2, e1 - e2], dim=1))  # [B, 2]


@dataclass
class DemoData:
    train: dict[str, torch.Tensor]  # img1, img2: [N, 1, 8, 8]; winner: [N] in {0, 1}
    val: dict[str, torch.Tensor]


def load_digit_pairs(n_train: int = 4096, n_val: int = 512, seed: int = 0) -> DemoData:
    """Pairs of distinct digits from disjoint train/val images; ``winner`` = 1 if img2 > img1."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the demo trains on scikit-learn's bundled digits: pip install 'train-telemetry[demo]'"
        ) from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    cut = int(0.7 * len(order))

    def pairs(idx: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        a = idx[torch.randint(len(idx), (4 * n,), generator=g)]
        b = idx[torch.randint(len(idx), (4 * n,), generator=g)]
        keep = labels[a] != labels[b]  # ties have no winner
        a, b = a[keep][:n], b[keep][:n]
        return {"img1": images[a], "img2": images[b], "winner": (labels[b] > labels[a]).long()}

    return DemoData(train=pairs(order[:cut], n_train), val=pairs(order[cut:], n_val))


def make_optimizer(
    model: SiameseNet, head_lr_factor: float = 10.0, base_lr: float = BASE_LR
) -> torch.optim.Optimizer:
    """AdamW with the seed's two named groups: backbone at 1x, head at ``head_lr_factor``x."""
    return torch.optim.AdamW(
        [
            {"params": list(model.backbone.parameters()), "lr": base_lr, "name": "backbone"},
            {
                "params": list(model.head.parameters()),
                "lr": base_lr * head_lr_factor,
                "name": "head",
            },
        ],
        weight_decay=1e-4,
    )


def iterate_batches(
    data: dict[str, torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    sort_by_label: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    n = len(data["winner"])
    order = (
        torch.argsort(data["winner"], stable=True)
        if sort_by_label
        else torch.randperm(n, generator=generator)
    )
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def build_run(
    preset: str, seed: int = 0
) -> tuple[SiameseNet, torch.optim.Optimizer, DemoData, dict[str, Any]]:
    """Model, optimizer, data and loop options for a preset (see :data:`PRESETS`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    data = load_digit_pairs(seed=seed)
    model = SiameseNet(activation=nn.Tanh if preset == "saturated_tanh" else nn.ReLU)
    options: dict[str, Any] = {
        "sort_by_label": False,
        "zero_grad": preset != "no_zero_grad",
        "train_mode": preset != "eval_mode",
        # A step schedule's factor at 2/3 of the run; None: the seed's cosine decay.
        "lr_step_gamma": None,
    }
    head_factor = 10.0
    base_lr = BASE_LR
    if preset == "frozen_backbone":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    elif preset == "head_lr_100x":
        head_factor = 100.0
    elif preset == "single_class_batches":
        options["sort_by_label"] = True
    elif preset == "shuffled_labels":
        g = torch.Generator().manual_seed(seed + 1)
        data.train["winner"] = data.train["winner"][
            torch.randperm(len(data.train["winner"]), generator=g)
        ]
    elif preset == "exploding_lr":
        base_lr = BASE_LR * 300
    elif preset == "dead_relu":
        embed = model.backbone.features[7]
        assert isinstance(embed, nn.Linear)
        with torch.no_grad():
            embed.bias.fill_(-10.0)  # pre-activations ~N(-10, <1): the ReLU after it never fires
    elif preset == "saturated_tanh":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(10.0)  # pre-activations 10x wider than the default init's: |x| >> 2.6
    elif preset == "frozen_bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # running stats = (1 - 0) * running + 0 * batch: never move
    elif preset == "non_convergence":
        # 15x the seed's LRs once the model has learned: AdamW's steps then overshoot the
        # minimum it reached, and the loss settles into bouncing 2-3x above the holdout's
        # best. (10x bounces less, 20x kills the ReLUs: that run learns nothing any more.)
        options["lr_step_gamma"] = 15.0
    if preset == "unstable":
        # Plain SGD over both groups at the seed's ratio: the momentum and LR are what is wrong.
        lr, momentum = 0.05, 0.99
        sgd = torch.optim.SGD(
            [
                {
                    "params": list(model.backbone.parameters()),
                    "lr": lr / head_factor,
                    "name": "backbone",
                },
                {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
            ],
            momentum=momentum,
        )
        return model, sgd, data, options
    return model, make_optimizer(model, head_factor, base_lr), data, options


def train(
    telemetry: Any,
    preset: str = "healthy",
    epochs: int = 3,
    batch_size: int = 32,
    max_steps: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train the preset's run with ``telemetry`` hooked in the seed's way; return final metrics."""
    model, optimizer, data, options = build_run(preset, seed)
    holdout = [{k: v[i : i + 25] for k, v in data.val.items()} for i in range(0, 50, 25)]
    telemetry.set_holdout_data(holdout)
    steps_per_epoch = len(data.train["winner"]) // batch_size
    total = (
        steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    )
    scheduler: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        if options["lr_step_gamma"] is None
        else torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(2 * total // 3, 1), gamma=options["lr_step_gamma"]
        )
    )
    telemetry.start(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed + 2)
    step = 0
    device = torch.device("cpu")
    try:
        for epoch in range(epochs):
            model.train(options["train_mode"])
            for batch_idx, batch in enumerate(
                iterate_batches(data.train, batch_size, g, options["sort_by_label"]), 1
            ):
                outputs = model(batch["img1"], batch["img2"])
                loss = loss_fn(outputs, batch["winner"])
                if options["zero_grad"]:
                    optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                telemetry.on_batch_end(
                    model, optimizer, batch_idx, epoch, device, batch, loss=loss, outputs=outputs
                )
                step += 1
                if step >= total:
                    break
            if step >= total:
                break
    finally:
        summary = telemetry.stop()
    model.eval()
    with torch.no_grad():
        val_acc = float(
            (model(data.val["img1"], data.val["img2"]).argmax(1) == data.val["winner"])
            .float()
            .mean()
        )
    return {"steps": step, "val_accuracy": val_acc, "records": summary.records_written}
