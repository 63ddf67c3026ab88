"""The newer silent-failure rules on real training: bugs trained into a small MLP are named.

An MLP on scikit-learn's bundled wine table (no download), collected by the real Telemetry
(mode="sync": the worker is not what is tested here), then ``diagnose(load_run(dir))`` as a
user would: a softmax before ``CrossEntropyLoss``, a head replaced after the optimizer was
built, an LR schedule that reaches 0 a third into the run, raw (unstandardised) inputs,
gradients never zeroed under clipping, SGD momentum 0.99, an LR raised 40x late.
The same loop without a bug (with and without clipping) gets no serious finding. A smoke run of the evaluation harness
(scripts/eval_diagnosis.py --quick) closes the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.analysis import Diagnosis, diagnose, load_run

sklearn_datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.timeout(60)

STEPS = 60


def train(out: Path, bug: str | None, steps: int = STEPS, clip: float | None = None) -> list[Diagnosis]:
    """``steps`` Adam steps of a 13-64-64-3 MLP on wine with ``bug`` injected, the gradients
    clipped at ``clip`` (``telemetry.clip_grad_norm_``) when given; the run's diagnoses."""
    data = sklearn_datasets.load_wine()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    if bug != "raw_inputs":
        x = (x - x.mean(0)) / x.std(0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    x_hold, y_hold, x, y = x[:40], y[:40], x[40:], y[40:]
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)]
    if bug == "softmax":
        layers.append(nn.Softmax(dim=-1))
    model = nn.Sequential(*layers)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.99)  # 0.99 typed for 0.9
        if bug == "momentum_high"
        else torch.optim.Adam(model.parameters(), lr=3e-3)
    )
    if bug == "stale_head":
        model[4] = nn.Linear(64, 3)  # replaced after the optimizer was built: no group holds it

    def factor(s: int) -> float:
        if bug == "short_schedule":
            return max(0.0, 1 - s / (steps / 3))
        if bug == "lr_raised":
            return 40.0 if s >= 2 * steps // 3 else 1.0  # a step schedule's gamma 40, 1/40 meant
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=1, mode="sync", overhead_budget=None))
    telemetry.set_holdout_data((x_hold, y_hold))
    telemetry.start(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    step = 0
    while step < steps:
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - 15, 16):
            xb, yb = x[perm[start : start + 16]], y[perm[start : start + 16]]
            outputs = model(xb)
            loss = loss_fn(outputs, yb)
            if bug != "no_zero_grad":
                opt.zero_grad()
            loss.backward()
            if clip is not None:
                telemetry.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            scheduler.step()
            step += 1
            telemetry.on_batch_end(model, opt, step, 0, None, (xb, yb), loss=loss, outputs=outputs)
            if step >= steps:
                break
    telemetry.stop()
    return diagnose(load_run(out))


@pytest.mark.parametrize(
    ("bug", "code", "words"),
    [
        ("softmax", "probabilities_as_logits", "3 outputs per example that are probabilities"),
        ("stale_head", "params_not_updated", "layer '4'"),
        ("short_schedule", "lr_schedule_ends_early", "with 6"),  # 6x% of the run to go
        ("raw_inputs", "poor_initial_scale", "layer '1'"),
    ],
)
def test_bug_in_a_real_run_is_named_with_its_evidence(tmp_path: Path, bug: str, code: str, words: str) -> None:
    """The injected bug's code is in the diagnoses, with evidence, a hint, and the layer or
    numbers that show it in its title."""
    found = train(tmp_path / bug, bug)
    named = [d for d in found if d.code == code]
    assert named, [(d.code, d.title) for d in found]
    assert named[0].evidence and named[0].hint
    assert words in named[0].title, named[0].title


def test_the_same_loop_without_a_bug_has_no_serious_finding(tmp_path: Path) -> None:
    """The healthy loop: no serious diagnosis, and none of the newer codes at all."""
    found = train(tmp_path / "healthy", None)
    assert not [d for d in found if d.severity == "serious"], [(d.code, d.title) for d in found]
    newer = {"params_not_updated", "probabilities_as_logits", "lr_schedule_ends_early", "lr_warmup_unfinished",
             "poor_initial_scale", "training_stalled", "loss_spike", "gradient_spike"}  # fmt: skip
    assert not {d.code for d in found} & newer, [(d.code, d.title) for d in found]


@pytest.mark.timeout(150)
def test_gradients_never_zeroed_under_clipping_are_named(tmp_path: Path) -> None:
    """Without zero_grad, clip_grad_norm_ at 1.0 rescales the summed .grad in place every step,
    so the sum never grows: gradients_not_zeroed names it from the pre-clip norm held at
    max_norm while the loss fell. The same loop with zero_grad, clipped at 1.0 or far below
    its gradients (0.05), is not named."""
    found = train(tmp_path / "no_zero_grad", "no_zero_grad", clip=1.0)
    named = [d for d in found if d.code == "gradients_not_zeroed"]
    assert named and named[0].severity == "serious", [(d.code, d.title) for d in found]
    assert "held at the clipping threshold" in named[0].title, named[0].title
    assert named[0].evidence and "zero_grad" in named[0].hint
    for clip in (1.0, 0.05):
        healthy = train(tmp_path / f"healthy-{clip}", None, clip=clip)
        assert not [d for d in healthy if d.code == "gradients_not_zeroed" or d.severity == "serious"], [
            (d.code, d.title) for d in healthy
        ]


@pytest.mark.parametrize(
    ("bug", "steps", "code"),
    [
        ("momentum_high", 2 * STEPS, "unstable_training"),  # SGD momentum 0.99 for 0.9
        ("lr_raised", STEPS, "non_convergence"),  # the LR x40 at 2/3 of the run, after learning
    ],
)
def test_a_run_that_swings_or_bounces_back_up_is_named(tmp_path: Path, bug: str, steps: int, code: str) -> None:
    """Momentum 0.99 makes the loss swing ever wider (unstable_training); an LR raised 40x once
    the model has learned leaves the train loss bouncing far above the holdout's best
    (non_convergence). Each names its code with the numbers in its title."""
    found = train(tmp_path / bug, bug, steps=steps)
    named = [d for d in found if d.code == code]
    assert named and named[0].severity == "serious", [(d.code, d.title) for d in found]
    assert named[0].evidence and named[0].hint
    words = "oscillates with growing amplitude" if code == "unstable_training" else "the holdout's best loss"
    assert words in named[0].title, named[0].title


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_evaluation_harness_smoke_run_scores_its_runs() -> None:
    """``scripts/eval_diagnosis.py --quick`` trains its four runs, finds the injected softmax
    and LR spike, and prints the per-rule table and the spike table with the baselines."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "eval_diagnosis.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| `probabilities_as_logits` | 1/1 = 1.00 |" in out, out
    assert "| ours: `loss_spike` | train loss | 1/1 = 1.00 |" in out, out
    assert "llm-foundry" in out and "Megatron" in out and "ZClip" in out
    assert "FAILED" not in out
