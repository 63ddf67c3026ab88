"""The public metric API: a metric written here, in a test file, reaches the records, the
export and the report with no change to the package; the built-in per-layer breakdown and
activation statistics are checked against torch at the same step."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny import TinyRun
from torch import nn

from train_telemetry import Metric, SnapshotData, Telemetry, TelemetryConfig, metric, read_records
from train_telemetry.analysis import load_run, to_dataframe

REL = 1e-5


class Net(nn.Module):
    """Module level, so spawn can send it: a ReLU MLP with a tanh branch and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@metric(key="mean_abs_weight", needs={"weights"})
def mean_abs_weight(snap: SnapshotData) -> dict[str, float]:
    """The mean absolute weight of each param group (a user's metric)."""
    assert snap.params is not None
    out = {}
    for group, members in snap.group_members().items():
        values = torch.cat([snap.params[i].reshape(-1) for i in members])
        out[group] = float(values.abs().mean())
    return out


class SaturatedLogits(Metric):
    """The fraction of holdout logits beyond +-threshold (a user's class-based metric)."""

    key = "saturated_logits"
    needs = frozenset({"holdout"})

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def compute(self, snap: SnapshotData) -> dict[str, float] | None:
        holdout = snap.holdout
        if holdout is None:
            return None
        logits = torch.tensor(holdout["logits"])
        return {"fraction": float((logits.abs() > self.threshold).float().mean())}


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)


def _train(tmp_path: Path, mode: str, steps: int = 6) -> tuple[list[dict], list[dict], nn.Module]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([{"params": model.body.parameters(), "lr": 0.05, "name": "body"},
                           {"params": model.head.parameters(), "lr": 0.2, "name": "head"}])
    g = torch.Generator().manual_seed(1)
    holdout = (torch.randn(12, 6, generator=g) * 3, torch.randint(0, 3, (12,), generator=g))
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=2, mode=mode, on_full="block")  # type: ignore[arg-type]
    telemetry = Telemetry(config, metrics=[mean_abs_weight, SaturatedLogits(1.0)])
    telemetry.set_holdout_data([holdout])
    telemetry.start(model, opt)
    expected = []
    previous: dict[str, torch.Tensor] | None = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss)
        if step % 2 == 0:
            expected.append(_expect(model, holdout, previous))
            previous = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = telemetry.stop()
    assert summary.clean and summary.records_written == len(expected)
    return read_records(tmp_path / "run"), expected, model


def _expect(model: Net, holdout: tuple[torch.Tensor, torch.Tensor], previous: dict[str, torch.Tensor]) -> dict:
    """What the records must say at this step, computed from the live model and a copy of it."""
    params = dict(model.named_parameters())
    groups = {"body": [n for n in params if n.startswith("body")], "head": [n for n in params if n.startswith("head")]}
    mean_abs = {g: float(torch.cat([params[n].detach().reshape(-1) for n in names]).abs().mean())
                for g, names in groups.items()}
    layers: dict[str, dict[str, float]] = {"gradient_norm": {}, "weight_norm": {}, "update_ratio": {}}
    for module in ("body.0", "body.2", "body.3", "head"):
        names = [n for n in params if n.rpartition(".")[0] == module]
        layers["gradient_norm"][module] = float(torch.linalg.vector_norm(torch.cat([params[n].grad.reshape(-1) for n in names])))
        layers["weight_norm"][module] = float(torch.linalg.vector_norm(torch.cat([params[n].detach().reshape(-1) for n in names])))
        delta = torch.cat([(params[n].detach() - previous[n]).reshape(-1) for n in names])
        ref = torch.cat([previous[n].reshape(-1) for n in names])
        layers["update_ratio"][module] = float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(ref))
    # Activations: forward hooks on a copy of the model, in eval mode, on the holdout.
    clone = copy.deepcopy(model).eval()
    seen: dict[str, torch.Tensor] = {}
    for name in ("body.1", "body.2", "body.4"):
        clone.get_submodule(name).register_forward_hook(lambda _m, _i, out, n=name: seen.__setitem__(n, out.detach()))
    with torch.no_grad():
        logits = clone(holdout[0])
    relu, norm, tanh = seen["body.1"], seen["body.2"], seen["body.4"]
    activations = {
        "body.1": {"dead_fraction": float((~(relu > 0).any(dim=0)).float().mean()),
                   "positive_fraction": float((relu > 0).float().mean()), "mean": float(relu.mean())},
        "body.2": {"mean": float(norm.mean()), "std": float(norm.std(unbiased=False))},
        "body.4": {"saturated_fraction": float((tanh.abs() > 0.99).float().mean()), "mean": float(tanh.mean())},
    }
    return {"mean_abs": mean_abs, "layers": layers, "activations": activations,
            "saturated": float((logits.abs() > 1.0).float().mean())}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_metric_from_a_test_file_is_recorded_exactly(tmp_path: Path, mode: str) -> None:
    """A user's metrics (a decorated function and a Metric subclass) are recorded with exact values."""
    records, expected, _ = _train(tmp_path, mode)
    assert len(records) == 3
    for rec, want in zip(records, expected, strict=True):
        assert rec["mean_abs_weight"].keys() == {"body", "head"}
        for group, value in want["mean_abs"].items():
            assert _close(rec["mean_abs_weight"][group], value), (rec["batch_idx"], group)
        assert _close(rec["saturated_logits"]["fraction"], want["saturated"])
        assert "errors" not in rec


@pytest.mark.timeout(180)
def test_layers_and_activations_equal_torch_at_the_same_step(tmp_path: Path) -> None:
    """Per-layer grad norm, weight norm, update ratio and activation statistics equal torch's at each collection."""
    records, expected, _ = _train(tmp_path, "async")
    for rec, want in zip(records, expected, strict=True):
        layers = rec["layers"]
        assert list(layers["gradient_norm"]) == ["body.0", "body.2", "body.3", "head"]
        for family, values in want["layers"].items():
            for module, value in values.items():
                assert _close(layers[family][module], value), (rec["batch_idx"], family, module)
        acts = rec["activations"]
        assert {k: acts[k]["kind"] for k in acts} == {"body.1": "relu", "body.2": "norm", "body.4": "tanh"}
        for module, values in want["activations"].items():
            for stat, value in values.items():
                assert math.isclose(acts[module][stat], value, rel_tol=1e-4, abs_tol=1e-6), (rec["batch_idx"], module, stat)


@pytest.mark.timeout(180)
def test_a_new_metric_shows_in_export_without_package_changes(tmp_path: Path) -> None:
    """The user's metric becomes export columns, read with no knowledge of the metric."""
    records, _, _ = _train(tmp_path, "sync")
    frame = to_dataframe(load_run(tmp_path / "run"))
    for column in ("mean_abs_weight.body", "mean_abs_weight.head", "saturated_logits.fraction", "layers.gradient_norm.head"):
        assert column in frame.columns, column
    assert frame["mean_abs_weight.head"].tolist() == pytest.approx([r["mean_abs_weight"]["head"] for r in records])


def test_bad_metrics_are_refused_with_the_fix(tmp_path: Path) -> None:
    """A metric that is not a Metric, needs something unknown, or reuses a key, fails at construction."""
    config = TelemetryConfig(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="not a train_telemetry.Metric"):
        Telemetry(config, metrics=[lambda snap: {}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="needs \\['gradients'\\]"):
        Telemetry(config, metrics=[metric(key="x", needs={"gradients"})(lambda snap: {})])
    with pytest.raises(ValueError, match="two metrics write the record key 'gradient_norm'"):
        Telemetry(config, metrics=[metric(key="gradient_norm")(lambda snap: {})])


@metric(key="named_best", needs={"weights"})
def named_best(snap: SnapshotData) -> dict[str, object]:
    """A user's metric with a mistake: a string where the record holds numbers."""
    return {"group": "head", "value": 1.0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_metric_value_the_schema_refuses_costs_its_key_not_the_record(tiny_run: Callable[..., TinyRun], mode: str) -> None:
    """Every line written matches the schema its readers use: a metric returning a string is left out
    with an errors entry naming it and the bad key; the rest of the record, and load_run, are intact."""
    run = tiny_run(mode, collect_every_n=2, metrics=[named_best])
    run.train(range(4))
    telemetry = run.telemetry
    summary = telemetry.stop()
    records = read_records(telemetry.output_dir)
    assert len(records) == 2 and summary.errors == {"named_best: RecordError": 2}
    for rec in records:
        assert "named_best" not in rec and rec["gradient_norm"]["overall"] > 0
        (entry,) = rec["errors"]
        assert entry["where"] == "named_best" and "$.named_best.group" in entry["message"], entry
    assert len(load_run(telemetry.output_dir).records) == 2
