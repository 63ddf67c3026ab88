"""``Telemetry.clip_grad_norm_``: torch's clip, bit for bit, and the pre-clip norms per group in the records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, read_records


def group_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_clip_returns_torchs_value_and_records_pre_clip_norms_per_group(tmp_path: Path, mode: str) -> None:
    """The clip returns exactly what torch's clip_grad_norm_ returns and leaves the same gradients; the record's
    gradient_norm_pre_clip per group equals the gradients before clipping, gradient_norm what was applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    frozen = nn.Linear(3, 3)  # outside every optimizer group, requires_grad off: a LoRA base
    frozen.requires_grad_(False)
    full = nn.Sequential(model, frozen)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1, "name": "body"},
                           {"params": model[2].parameters(), "lr": 0.1, "name": "head"}])
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path), collect_every_n=2, mode=mode, on_full="block"))
    telemetry.start(full, opt)
    g = torch.Generator().manual_seed(1)
    expected = {}
    for step in range(1, 7):
        x, y = torch.randn(8, 6, generator=g) * 5, torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(full(x), y) * 50  # large gradients: every step is clipped
        loss.backward()
        before = {"body": [p.grad.clone() for p in model[0].parameters()],
                  "head": [p.grad.clone() for p in model[2].parameters()]}
        reference = [p.grad.clone() for p in full.parameters() if p.grad is not None]
        ref_params = [nn.Parameter(p.detach().clone()) for p in full.parameters() if p.grad is not None]
        for p, grad in zip(ref_params, reference, strict=True):
            p.grad = grad
        want = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
        got = telemetry.clip_grad_norm_(full.parameters(), 0.5)
        assert torch.equal(got, want)
        assert all(torch.equal(p.grad, r.grad) for p, r in zip(model.parameters(), ref_params, strict=True))
        opt.step()
        telemetry.on_batch_end(full, opt, step, 0, None, (x, y), loss=loss)
        opt.zero_grad()
        expected[step] = ({k: group_norm(v) for k, v in before.items()}, float(want))
    telemetry.stop()
    records = read_records(tmp_path)
    assert [r["batch_idx"] for r in records] == [2, 4, 6]
    for rec in records:
        groups, total = expected[rec["batch_idx"]]
        pre = rec["gradient_norm_pre_clip"]
        for name, value in groups.items():
            assert pre[name] == pytest.approx(value, rel=1e-6)
        assert pre["overall"] == pytest.approx(total, rel=1e-6)
        assert pre["unassigned"] is None and rec["gradient_norm"]["unassigned"] is None
        assert rec["gradient_clipping"] == {"max_norm": 0.5, "pre_clip_norm": pytest.approx(total, rel=1e-7)}
        assert rec["gradient_norm"]["overall"] == pytest.approx(0.5, rel=1e-4)  # what the optimizer applied
        assert rec["weight_delta"]["unassigned"] == 0.0


@pytest.mark.timeout(60)
def test_a_loop_that_stops_clipping_records_no_stale_pre_clip_norms(tmp_path: Path) -> None:
    """Pre-clip norms belong to the collection right after the clip: a later collection without a clip has none."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path), collect_every_n=1, mode="sync"))
    telemetry.start(model, opt)
    for step in range(1, 4):
        model(torch.randn(3, 4)).sum().backward()
        if step == 1:
            telemetry.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, None)
        opt.zero_grad()
    telemetry.stop()
    records = read_records(tmp_path)
    assert "gradient_norm_pre_clip" in records[0] and "gradient_clipping" in records[0]
    assert all("gradient_norm_pre_clip" not in r and "gradient_clipping" not in r for r in records[1:])
