"""The newer silent-failure rules on real training: bugs trained into a small MLP are named.

An MLP on scikit-learn's bundled wine table (no download), collected by the real Telemetry
(mode="sync": the worker is not what is tested here), then ``diagnose(load_run(dir))`` as a
user would: a softmax before ``CrossEntropyLoss``, a head replaced after the optimizer was
built, an LR schedule that reaches 0 a third into the run, raw (unstandardised) inputs.
The same loop without a bug gets no serious finding. A smoke run of the evaluation harness
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


def train(out: Path, bug: str | None) -> list[Diagnosis]:
    """60 Adam steps of a 13-64-64-3 MLP on wine with ``bug`` injected; the run's diagnoses."""
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
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if bug == "stale_head":
        model[4] = nn.Linear(64, 3)  # replaced after the optimizer was built: no group holds it
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: max(0.0, 1 - s / (STEPS / 3))) if bug == "short_schedule" else (lambda s: 1.0)
    )
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=1, mode="sync", overhead_budget=None))
    telemetry.set_holdout_data((x_hold, y_hold))
    telemetry.start(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    step = 0
    while step < STEPS:
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - 15, 16):
            xb, yb = x[perm[start : start + 16]], y[perm[start : start + 16]]
            outputs = model(xb)
            loss = loss_fn(outputs, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            telemetry.on_batch_end(model, opt, step, 0, None, (xb, yb), loss=loss, outputs=outputs)
            if step >= STEPS:
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
