"""The CUDA path: pinned slots, non-blocking copies, no device sync in the hook. Skipped without a GPU.

Written on a machine without one: the first session lent a GPU should run this file
(``python -m pytest tests/e2e/test_cuda.py``) before anything else on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    """Module level, so that spawn can pickle it for the worker's holdout eval."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["auto", "async", "sync"])
def test_cuda_records_equal_torch_and_the_async_hook_never_synchronizes(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    model = Net().to(device)
    opt = torch.optim.AdamW([{"params": model.body.parameters(), "lr": 1e-3, "name": "body"},
                             {"params": model.head.parameters(), "lr": 1e-2, "name": "head"}])
    holdout = {"x": torch.randn(20, 16, generator=g), "y": torch.randint(0, 4, (20,), generator=g)}
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=2, mode=mode, on_full="block",
                             input_keys=["x"], label_key="y", holdout_size=20)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data(holdout)
    telemetry.start(model, opt)
    expected = []
    for step in range(8):
        batch = {"x": torch.randn(32, 16, generator=g).to(device), "y": torch.randint(0, 4, (32,), generator=g).to(device)}
        outputs = model(batch["x"])
        loss = nn.functional.cross_entropy(outputs, batch["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mode != "sync" and step >= 2:  # after the first collection's one-time setup
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing op in the hook raises
        try:
            telemetry.on_batch_end(model, opt, step, 0, device, batch, loss=loss, outputs=outputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if step % 2 == 0:
            clone = Net()
            clone.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
            clone.eval()
            with torch.no_grad():
                logits = clone(holdout["x"])
            expected.append({
                "grad": float(nn.utils.get_total_norm([p.grad for p in model.parameters()])),
                "weight": float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters()))),
                "loss": float(loss),
                "accuracy": float((outputs.argmax(1) == batch["y"]).float().mean()),
                "logits": logits,
                "counts": torch.bincount(batch["y"].cpu(), minlength=4).tolist(),
            })
    summary = telemetry.stop()
    assert summary.clean and summary.hook_errors == 0
    assert summary.mode == ("sync" if mode == "sync" else "async")  # auto: a CUDA model keeps the worker
    records = read_records(tmp_path / "run")
    assert [r["batch_idx"] for r in records] == [0, 2, 4, 6]
    for rec, exp in zip(records, expected, strict=True):
        assert rec["gradient_norm"]["overall"] == pytest.approx(exp["grad"], rel=1e-5)
        assert rec["weight_norm"]["overall"] == pytest.approx(exp["weight"], rel=1e-5)
        assert rec["train"]["loss"] == pytest.approx(exp["loss"], rel=1e-6)
        assert rec["train"]["accuracy"] == pytest.approx(exp["accuracy"])
        assert torch.allclose(torch.tensor(rec["holdout_logits"]["logits"]), exp["logits"], rtol=1e-4, atol=1e-5)
        for cls in range(4):
            assert rec["batch_stats"][f"y_{cls}_pct"] == pytest.approx(100.0 * exp["counts"][cls] / 32)
        assert "errors" not in rec
