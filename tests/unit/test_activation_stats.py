"""The activation statistics' cheap passes (sign sums, per-unit maxima) against plain
comparisons, over chunks, for every path: ReLU/ReLU6 (never negative), the rest of the
relu family (negative values), and outputs holding NaN."""

from __future__ import annotations

import math

import pytest
import torch

from train_telemetry.metrics.activations import Activations


def _reference(chunks: list[torch.Tensor]) -> dict[str, float]:
    x = torch.cat(chunks)
    alive = (x > 0).reshape(x.shape[0], -1).any(dim=0)
    return {"dead_fraction": 1.0 - float(alive.float().mean()), "positive_fraction": int((x > 0).sum()) / x.numel(),
            "mean": float(x.double().mean())}


@pytest.mark.parametrize("module", [torch.nn.ReLU(), torch.nn.ReLU6(), torch.nn.LeakyReLU(0.1), torch.nn.GELU()])
def test_relu_family_statistics_match_plain_comparisons_over_chunks(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), module).eval()
    with torch.no_grad():
        model[0].bias[:3] = -50.0  # three channels never positive: dead units
    metric = Activations()
    metric.instrument(model)
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        for _ in range(3):  # the holdout forward runs in chunks of eval_batch_size
            model(torch.randn(5, 1, 10, 10))
    got = metric.stats["1"].result()
    want = _reference(seen)
    assert got is not None and got["kind"] == "relu"
    assert got["dead_fraction"] == pytest.approx(want["dead_fraction"], abs=0)
    assert got["dead_fraction"] >= 3 / 8
    assert got["positive_fraction"] == pytest.approx(want["positive_fraction"], abs=0)
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-5)


def test_a_nan_in_a_relu_output_still_counts_positives_exactly() -> None:
    model = torch.nn.Sequential(torch.nn.ReLU()).eval()
    metric = Activations()
    metric.instrument(model)
    x = torch.tensor([[1.0, -1.0, float("nan")], [2.0, 0.0, 3.0]])
    with torch.no_grad():
        model(x)
    got = metric.stats["0"].result()
    assert got is not None
    assert got["positive_fraction"] == pytest.approx(3 / 6)  # 1, 2, 3: NaN is not positive
    assert got["dead_fraction"] == pytest.approx(1 / 3)  # unit 1 never positive; unit 2 was 3 once
    assert math.isnan(got["mean"])
