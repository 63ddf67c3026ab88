"""Silent bugs in real training: each is trained into a small model and the diagnosis names it.

Small MLPs on scikit-learn's bundled iris, wine and breast-cancer tables (no download),
collected by the real Telemetry (mode="sync": the worker is not what is tested here), then
``diagnose(load_run(dir))`` as a user would. Each healthy counterpart gets no serious finding.
The activation and model-mode bugs need the ``activations`` / ``model_mode`` record keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.analysis import Diagnosis, diagnose, load_run

sklearn_datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.timeout(60)


def load_table(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_holdout, y_holdout), standardised features, a 70/30 split."""
    data = {
        "iris": sklearn_datasets.load_iris,
        "wine": sklearn_datasets.load_wine,
        "breast_cancer": sklearn_datasets.load_breast_cancer,
    }[name]()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    x = (x - x.mean(0)) / x.std(0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


@dataclass
class Setup:
    """One training run: data set, model, optimizer and the loop's mistakes."""

    dataset: str = "iris"
    optimizer: str = "sgd"  # sgd, sgdm (momentum 0.9), adam
    lr: float = 0.01
    steps: int = 40
    every: int = 1
    zero_grad: bool = True
    train_mode: bool = True
    activation: type[nn.Module] = nn.ReLU
    batchnorm: bool = False
    bn_momentum: float | None = 0.1
    alter: Callable[[nn.Module], None] | None = None


def build_model(setup: Setup, features: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(features, 32)]
    if setup.batchnorm:
        layers.append(nn.BatchNorm1d(32, momentum=setup.bn_momentum))
    layers += [setup.activation(), nn.Linear(32, 32), setup.activation(), nn.Linear(32, classes)]
    model = nn.Sequential(*layers)
    if setup.alter is not None:
        setup.alter(model)
    return model


def train(setup: Setup, out: Path) -> list[Diagnosis]:
    """Train ``setup`` with telemetry on (sync mode); return the diagnoses of its run."""
    x, y, x_hold, y_hold = load_table(setup.dataset)
    model = build_model(setup, x.shape[1], int(y.max()) + 1)
    if setup.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
    else:
        momentum = 0.9 if setup.optimizer == "sgdm" else 0.0
        opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=momentum)
    config = TelemetryConfig(
        output_dir=str(out), collect_every_n=setup.every, mode="sync",
        input_keys=["x"], label_key="y", holdout_size=len(y_hold),
    )  # fmt: skip
    telemetry = Telemetry(config)
    telemetry.set_holdout_data({"x": x_hold, "y": y_hold})
    telemetry.start(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    step, batch_size = 0, 16
    model.train(setup.train_mode)
    while step < setup.steps:
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            batch = {
                "x": x[order[start : start + batch_size]],
                "y": y[order[start : start + batch_size]],
            }
            outputs = model(batch["x"])
            loss = loss_fn(outputs, batch["y"])
            if setup.zero_grad:
                opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=outputs)
            if step >= setup.steps:
                break
    telemetry.stop()
    return diagnose(load_run(out))


def codes(diagnoses: list[Diagnosis], severity: str | None = None) -> set[str]:
    return {d.code for d in diagnoses if severity is None or d.severity == severity}


def dead_bias(model: nn.Module) -> None:
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.bias.fill_(-20.0)  # standardised inputs: pre-activations ~N(-20, ~1) never > 0


def wide_init(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)  # pre-activations ~20x the default init's: tanh at +-1


# bug -> (the code that must be named, the run that has it, serious codes it may bring along).
BUGS: dict[str, tuple[str, Setup, set[str]]] = {
    "no_zero_grad_every_step": ("gradients_not_zeroed", Setup("wine", zero_grad=False), set()),
    "no_zero_grad_every_4": (
        "gradients_not_zeroed",
        Setup("iris", zero_grad=False, steps=80, every=4),
        {"unstable_training", "non_convergence"},
    ),
    "no_zero_grad_breast_cancer": (
        "gradients_not_zeroed",
        Setup("breast_cancer", zero_grad=False, steps=80, every=4),
        set(),
    ),
    "lr_too_high_with_momentum": (
        "unstable_training",
        Setup("breast_cancer", "sgdm", lr=0.5, steps=60, every=2),
        {"non_convergence", "lr_too_high"},  # lr_too_high: the cause, named from the step size
    ),
    "adam_lr_too_high": (
        "non_convergence",
        Setup("breast_cancer", "adam", lr=0.1, steps=40, every=1),
        {"unstable_training", "dying_relu", "lr_too_high"},  # Adam at 0.1 also kills ReLUs
    ),
    "dead_relu": (
        "dying_relu",
        Setup("wine", alter=dead_bias),
        {
            "vanishing_gradients",
            "frozen_group",
            "no_learning",
            "prediction_collapse",
            "non_convergence",
        },
    ),
    "saturated_tanh": (
        "saturated_activations",
        Setup("wine", activation=nn.Tanh, alter=wide_init),
        {"vanishing_gradients", "no_learning", "unstable_training", "non_convergence"},
    ),
    "eval_mode": ("eval_mode_training", Setup("iris", batchnorm=True, train_mode=False), set()),
    "frozen_bn": ("frozen_batchnorm_stats", Setup("iris", batchnorm=True, bn_momentum=0.0), set()),
}

HEALTHY: dict[str, Setup] = {
    "wine_sgd_every_step": Setup("wine", lr=0.05),
    "iris_sgd_every_4": Setup("iris", lr=0.05, steps=80, every=4),
    "breast_cancer_sgd_every_4": Setup("breast_cancer", lr=0.05, steps=80, every=4),
    "breast_cancer_adam_every_2": Setup("breast_cancer", "adam", lr=0.01, steps=60, every=2),
    "iris_batchnorm": Setup("iris", lr=0.05, batchnorm=True),
    "wine_tanh": Setup("wine", lr=0.05, activation=nn.Tanh),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_silent_bug_is_named(tmp_path: Path, bug: str) -> None:
    """A real run with the bug gets its diagnosis, and no serious one the bug does not explain."""
    code, setup, consequences = BUGS[bug]
    found = train(setup, tmp_path / bug)
    assert code in codes(found), [(d.code, d.title) for d in found]
    named = next(d for d in found if d.code == code)
    assert named.evidence and named.hint
    assert not codes(found, "serious") - {code} - consequences, [(d.code, d.title) for d in found]


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_counterpart_gets_no_serious_diagnosis(tmp_path: Path, name: str) -> None:
    """The same data sets and models trained correctly get no serious diagnosis."""
    found = train(HEALTHY[name], tmp_path / name)
    assert not codes(found, "serious"), [(d.code, d.title) for d in found]


@pytest.mark.parametrize("bug", ["lr_too_high_with_momentum", "adam_lr_too_high"])
def test_an_lr_far_too_high_is_named_from_the_step_size(tmp_path: Path, bug: str) -> None:
    """Whatever else the LR does to the run, its steps moving the weights by a large share of
    their norm name the cause: lr_too_high, with the group, its LR and the step sizes."""
    _, setup, _ = BUGS[bug]
    found = train(setup, tmp_path / bug)
    (named,) = [d for d in found if d.code == "lr_too_high"]
    assert named.severity == "serious" and f"at LR {setup.lr:g}" in named.title, named.title
    assert all(v >= 0.3 for e in named.evidence for k, v in e.values.items() if k.startswith("update_ratio_per_step"))
