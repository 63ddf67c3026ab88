"""The core collector end to end: real tiny training runs, records checked against torch.

Every recorded value is compared with an independent computation taken by the test at the
same step (grads, weight copies, LRs, a separate eval of the holdout), in both modes.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, TrainingTelemetry, read_records
from train_telemetry.demo import SiameseNet

REL = 1e-5
GROUPS = ("backbone", "head")


def make_batches(n_batches: int, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "img1": torch.randn(batch_size, 1, 8, 8, generator=g),
            "img2": torch.randn(batch_size, 1, 8, 8, generator=g),
            "winner": torch.randint(0, 2, (batch_size,), generator=g),
        }
        for _ in range(n_batches)
    ]


def make_run(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = SiameseNet(width=4, embed=8)
    opt = torch.optim.SGD(
        [
            {"params": list(model.backbone.parameters()), "lr": 0.01, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": 0.1, "name": "head"},
        ],
        momentum=0.9,
    )
    # An LR that changes every step, so a stale LR would be caught.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
    return model, opt, sched


def group_params(model: nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    return {"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters())}


def close(a: float | None, b: float | None, rel: float = REL) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def independent_eval(model: nn.Module, holdout: dict[str, torch.Tensor]) -> torch.Tensor:
    clone = copy.deepcopy(model)
    clone.eval()
    with torch.no_grad():
        return clone(holdout["img1"], holdout["img2"])


def train_and_expect(
    config: TelemetryConfig, steps: int, start_with_model: bool = True
) -> tuple[list[dict], list[dict], object]:
    """Train with telemetry on; return (records, what the test computed at each collection, summary)."""
    model, opt, sched = make_run()
    batches = make_batches(steps)
    holdout_batches = make_batches(3, batch_size=8, seed=99)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data(holdout_batches)
    holdout = {k: torch.cat([b[k] for b in holdout_batches])[: config.holdout_size] for k in holdout_batches[0]}
    telemetry.start(model, opt) if start_with_model else telemetry.start()
    previous = {name: [p.detach().clone() for p in ps] for name, ps in group_params(model).items()} if start_with_model else None
    expected: list[dict] = []
    loss_fn = nn.CrossEntropyLoss()
    for batch_idx, batch in enumerate(batches, 1):
        outputs = model(batch["img1"], batch["img2"])
        loss = loss_fn(outputs, batch["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        telemetry.on_batch_end(model, opt, batch_idx, 0, torch.device("cpu"), batch, loss=loss, outputs=outputs)
        if batch_idx % config.collect_every_n == 0:
            groups = group_params(model)
            exp = {
                "batch_idx": batch_idx,
                "grad": {"overall": float(nn.utils.get_total_norm([p.grad for p in model.parameters()]))}
                | {g: float(nn.utils.get_total_norm([p.grad for p in ps])) for g, ps in groups.items()},
                "lr": dict(zip(GROUPS, sched.get_last_lr(), strict=True)),
                "weights": {g: [p.detach().clone() for p in ps] for g, ps in groups.items()},
                "logits": independent_eval(model, holdout),
                "labels": holdout["winner"],
                "loss": float(loss.detach()),
                "accuracy": float((outputs.argmax(1) == batch["winner"]).float().mean()),
                "counts": torch.bincount(batch["winner"], minlength=2).tolist(),
            }
            if previous is not None:
                exp["delta"] = {
                    g: math.sqrt(sum(float((w - r).pow(2).sum()) for w, r in zip(exp["weights"][g], previous[g], strict=True)))
                    for g in GROUPS
                }
                exp["delta"]["overall"] = math.sqrt(sum(v * v for v in exp["delta"].values()))
            else:
                exp["delta"] = None
            previous = exp["weights"]
            expected.append(exp)
    summary = telemetry.stop()
    return read_records(config.output_dir), expected, summary


def check_record(rec: dict, exp: dict) -> None:
    assert rec["batch_idx"] == exp["batch_idx"]
    for key in ("overall", *GROUPS):
        assert close(rec["gradient_norm"][key], exp["grad"][key]), (key, rec["gradient_norm"], exp["grad"])
    for g in GROUPS:
        assert close(rec["learning_rates"][g], exp["lr"][g])
    assert rec["learning_rates"]["group_0"] == rec["learning_rates"]["backbone"]
    assert rec["learning_rates"]["group_1"] == rec["learning_rates"]["head"]
    for g in GROUPS:
        norm = math.sqrt(sum(float(w.pow(2).sum()) for w in exp["weights"][g]))
        assert close(rec["weight_norm"][g], norm)
    if exp["delta"] is None:
        assert all(v is None for v in rec["weight_delta"].values())
    else:
        for key in ("overall", *GROUPS):
            assert close(rec["weight_delta"][key], exp["delta"][key], rel=1e-4), (key, rec["weight_delta"], exp["delta"])
    hold = rec["holdout_logits"]
    logits = torch.tensor(hold["logits"])
    assert torch.allclose(logits, exp["logits"], rtol=REL, atol=1e-6)
    assert hold["labels"] == exp["labels"].tolist()
    assert hold["predictions"] == exp["logits"].argmax(1).tolist()
    assert close(hold["accuracy"], float((exp["logits"].argmax(1) == exp["labels"]).float().mean()))
    assert close(rec["train"]["loss"], exp["loss"])
    assert close(rec["train"]["accuracy"], exp["accuracy"])
    n = sum(exp["counts"])
    assert rec["batch_stats"]["batch_size"] == n
    assert close(rec["batch_stats"]["winner_0_pct"], 100.0 * exp["counts"][0] / n)
    assert close(rec["batch_stats"]["winner_1_pct"], 100.0 * exp["counts"][1] / n)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_every_recorded_value_matches_an_independent_torch_computation(tmp_path: Path, mode: str) -> None:
    """Grad norms, LRs, weight norms and deltas, holdout logits, train loss/acc and batch balance equal torch's own values at the hook."""
    # block: this test wants every collection recorded (drop would skip some when the
    # worker lags behind these very short steps; drops are tested elsewhere).
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=3, holdout_size=20, mode=mode, on_full="block")
    records, expected, summary = train_and_expect(config, steps=15)
    assert [r["batch_idx"] for r in records] == [3, 6, 9, 12, 15]
    assert [r["seq"] for r in records] == list(range(5))
    for rec, exp in zip(records, expected, strict=True):
        check_record(rec, exp)
        assert rec["reference_batch_idx"] == (None if rec["seq"] == 0 else rec["batch_idx"] - 3)
        assert rec["telemetry"]["dropped_before"] == 0
        assert rec["telemetry"]["hook_ms"] > 0
        assert rec["rank"] == 0 and rec["world_size"] == 1
        assert len(rec["holdout_logits"]["logits"]) == 20
    assert summary.records_written == 5 and summary.snapshots_taken == 5 and summary.clean
    assert (tmp_path / "run" / "last_checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["records_written"] == 5


@pytest.mark.timeout(120)
def test_first_delta_is_null_without_a_model_at_start(tmp_path: Path) -> None:
    """start() without a model: the first weight_delta is null (never a fake 0), later ones are exact."""
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=4, holdout_size=8, on_full="block")
    records, expected, _ = train_and_expect(config, steps=12, start_with_model=False)
    assert len(records) == 3
    assert all(v is None for v in records[0]["weight_delta"].values())
    for rec, exp in zip(records, expected, strict=True):
        check_record(rec, exp)


@pytest.mark.timeout(120)
def test_mutating_weights_after_the_hook_does_not_change_the_record(tmp_path: Path) -> None:
    """The record holds the weights at the hook even when the trainer mutates them right after it returns."""
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, holdout_size=8, on_full="block")
    model, opt, _ = make_run()
    batches = make_batches(6)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data(make_batches(1, seed=5))
    telemetry.start(model, opt)
    expected_norms = []
    for batch_idx, batch in enumerate(batches, 1):
        loss = nn.functional.cross_entropy(model(batch["img1"], batch["img2"]), batch["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, batch_idx, 0, None, batch)
        with torch.no_grad():
            expected_norms.append(math.sqrt(sum(float(p.pow(2).sum()) for p in model.head.parameters())))
            for p in model.parameters():  # what an optimizer does right after the hook, exaggerated
                p.add_(1000.0)
    telemetry.stop()
    records = read_records(config.output_dir)
    assert len(records) == 6
    for rec, norm in zip(records, expected_norms, strict=True):
        assert close(rec["weight_norm"]["head"], norm)
    # The control: the next record does see the mutation, so aliasing would have been caught.
    assert records[1]["weight_delta"]["head"] > 1000.0


@pytest.mark.timeout(60)
def test_nan_and_inf_are_recorded_as_such_and_every_line_is_strict_json(tmp_path: Path) -> None:
    """A NaN gradient and an Inf loss come back as NaN/Inf from read_records, are flagged, and each line parses with json.loads."""
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, mode="sync", track_holdout_logits=False)
    model, opt, _ = make_run()
    telemetry = Telemetry(config).start(model, opt)
    for batch_idx, batch in enumerate(make_batches(2), 1):
        loss = nn.functional.cross_entropy(model(batch["img1"], batch["img2"]), batch["winner"])
        opt.zero_grad()
        loss.backward()
        if batch_idx == 2:
            model.head[0].weight.grad[0, 0] = float("nan")
        telemetry.on_batch_end(model, opt, batch_idx, 0, None, batch, loss=torch.tensor(float("inf")) if batch_idx == 2 else loss)
    telemetry.stop()
    lines = (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    for line in lines:
        json.loads(line, parse_constant=reject)
    records = read_records(tmp_path / "run")
    assert "nonfinite" not in records[0]
    assert math.isnan(records[1]["gradient_norm"]["head"])
    assert math.isnan(records[1]["gradient_norm"]["overall"])
    assert not math.isnan(records[1]["gradient_norm"]["backbone"])
    assert records[1]["train"]["loss"] == math.inf
    assert {"gradient_norm.head", "gradient_norm.overall", "train.loss"} <= set(records[1]["nonfinite"])


@pytest.mark.timeout(60)
def test_groups_without_names_and_params_without_grads(tmp_path: Path) -> None:
    """Unnamed groups are keyed group_<i>; a group whose params got no grads records null, not 0."""
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, mode="sync", track_holdout_logits=False)
    model, _, _ = make_run()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([{"params": list(model.backbone.parameters()), "lr": 0.0}, {"params": list(model.head.parameters()), "lr": 0.1}])
    telemetry = Telemetry(config).start(model, opt)
    batch = make_batches(1)[0]
    loss = nn.functional.cross_entropy(model(batch["img1"], batch["img2"]), batch["winner"])
    loss.backward()
    opt.step()
    telemetry.on_batch_end(model, opt, 1, 0, None, batch)
    telemetry.stop()
    (rec,) = read_records(tmp_path / "run")
    assert rec["gradient_norm"]["group_0"] is None
    assert rec["gradient_norm"]["group_1"] > 0
    assert rec["learning_rates"] == {"group_0": 0.0, "group_1": 0.1}
    assert rec["weight_delta"]["group_0"] == 0.0
    assert rec["weight_delta"]["group_1"] > 0


@pytest.mark.timeout(60)
def test_holdout_keeps_the_first_examples_not_batches(tmp_path: Path) -> None:
    """set_holdout_data takes a list of batches or one batch and keeps exactly the first holdout_size examples."""
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, mode="sync", holdout_size=11)
    model, opt, _ = make_run()
    batches = make_batches(3, batch_size=4, seed=7)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data(batches)
    telemetry.start(model, opt)
    telemetry.on_batch_end(model, opt, 1, 0, None, None)
    telemetry.stop()
    (rec,) = read_records(tmp_path / "run")
    labels = torch.cat([b["winner"] for b in batches])[:11].tolist()
    assert rec["holdout_logits"]["labels"] == labels
    assert "batch_stats" not in rec  # no batch given: nothing to count

    one = Telemetry(config.replace(output_dir=str(tmp_path / "one")))
    one.set_holdout_data(batches[0])
    one.start(model, opt)
    one.on_batch_end(model, opt, 1, 0, None, None)
    one.stop()
    assert read_records(tmp_path / "one")[0]["holdout_logits"]["labels"] == batches[0]["winner"].tolist()


@pytest.mark.timeout(60)
def test_custom_forward_fn_and_batch_keys(tmp_path: Path) -> None:
    """input_keys/label_key and a picklable forward_fn decide how the holdout is fed to the model copy."""
    config = TelemetryConfig(
        output_dir=str(tmp_path / "run"), collect_every_n=1, input_keys=["x"], label_key="y", holdout_size=6
    )
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    holdout = {"x": torch.randn(6, 5), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    telemetry = Telemetry(config, forward_fn=scaled_forward)
    telemetry.set_holdout_data(holdout)
    telemetry.start(model, opt)
    batch = {"x": torch.randn(4, 5), "y": torch.tensor([2, 2, 2, 1])}
    nn.functional.cross_entropy(model(batch["x"]), batch["y"]).backward()
    opt.step()
    telemetry.on_batch_end(model, opt, 1, 0, None, batch)
    expected = scaled_forward(model, holdout).detach()
    telemetry.stop()
    (rec,) = read_records(tmp_path / "run")
    assert torch.allclose(torch.tensor(rec["holdout_logits"]["logits"]), expected, rtol=REL, atol=1e-6)
    assert rec["batch_stats"] == {"y_0_pct": 0.0, "y_1_pct": 25.0, "y_2_pct": 75.0, "batch_size": 4}


def scaled_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"]) * 2.0


@pytest.mark.timeout(60)
def test_disabled_telemetry_does_nothing(tmp_path: Path) -> None:
    """enabled: false makes start, the hook and stop no-ops that write nothing."""
    out = tmp_path / "run"
    model, opt, _ = make_run()
    with TrainingTelemetry(TelemetryConfig(enabled=False, output_dir=str(out), collect_every_n=1)) as t:
        t.on_batch_end(model, opt, 1, 0, None, make_batches(1)[0])
    assert not out.exists()
    assert t.stop().records_written == 0


@pytest.mark.timeout(120)
def test_training_numerics_and_rng_are_unchanged_by_telemetry(tmp_path: Path) -> None:
    """A run with telemetry ends with bit-identical weights, the same RNG state and the model still in train mode."""

    def run(with_telemetry: bool) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        model, opt, sched = make_run(seed=3)
        model.train()
        batches = make_batches(6, seed=4)
        t = Telemetry(TelemetryConfig(output_dir=str(tmp_path / f"run{with_telemetry}"), collect_every_n=2, holdout_size=4))
        t.set_holdout_data(make_batches(1, seed=9))
        if with_telemetry:
            t.start(model, opt)
        torch.manual_seed(123)
        for batch_idx, batch in enumerate(batches, 1):
            out = nn.functional.dropout(model(batch["img1"], batch["img2"]), 0.2)
            loss = nn.functional.cross_entropy(out, batch["winner"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if with_telemetry:
                t.on_batch_end(model, opt, batch_idx, 0, None, batch, loss=loss, outputs=out)
        state = torch.get_rng_state()
        mode = model.training
        if with_telemetry:
            t.stop()
        return [p.detach().clone() for p in model.parameters()], state, mode

    w0, rng0, _ = run(False)
    w1, rng1, training = run(True)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert torch.equal(rng0, rng1)
    assert training


@pytest.mark.timeout(180)
def test_seed_analysis_example_runs_unchanged_on_a_real_run(tmp_path: Path) -> None:
    """The seed design's analysis snippet (json + matplotlib) runs as written against our telemetry.jsonl."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    run_dir = tmp_path / "outputs" / "run_xyz" / "telemetry"
    run_dir.parent.mkdir(parents=True)
    subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "scripts" / "demo.py"), "--task", "pairs", "--max-steps", "64",
         "--collect-every-n", "8", "--output-dir", str(run_dir), "--no-report", "--on-full", "block"],
        check=True, capture_output=True, timeout=150,
    )
    seed_snippet = textwrap.dedent(
        """
        import matplotlib
        matplotlib.use("Agg")
        import json
        import matplotlib.pyplot as plt

        # Load telemetry data
        metrics = []
        with open('outputs/run_xyz/telemetry/telemetry.jsonl') as f:
            for line in f:
                metrics.append(json.loads(line))

        # Extract gradient norms
        batch_indices = [m['batch_idx'] for m in metrics]
        grad_norms = [m['gradient_norm']['overall'] for m in metrics]

        # Plot
        plt.plot(batch_indices, grad_norms)
        plt.xlabel('Batch Index')
        plt.ylabel('Gradient Norm')
        plt.title('Gradient Norm Over Training')
        plt.savefig('grad_norm_plot.png')
        print(len(metrics), batch_indices[:3])
        """
    )
    result = subprocess.run([sys.executable, "-c", seed_snippet], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "8"
    assert (tmp_path / "grad_norm_plot.png").stat().st_size > 1000
