"""A record never depends on where it was built (worker or training thread) nor on the hook's context."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, read_records

FAMILIES = ("gradient_norm", "weight_delta", "weight_norm", "learning_rates", "holdout_logits", "batch_stats", "train")


def run(out: Path, mode: str, context: Callable[[], Any]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=1, mode=mode, on_full="block"))
    g = torch.Generator().manual_seed(1)
    telemetry.set_holdout_data((torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)))
    telemetry.start(model, opt)
    for step in range(1, 4):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        outputs = model(x)
        loss = nn.functional.cross_entropy(outputs, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with context():
            telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss, outputs=outputs)
    telemetry.stop()
    return read_records(out)


@pytest.mark.timeout(120)
def test_records_are_the_same_from_either_builder_under_any_caller_context(tmp_path: Path) -> None:
    """The worker's records (no context) equal the training thread's with the hook called plainly, inside
    torch.inference_mode(), inside no_grad and inside a bf16 autocast block, value for value."""
    reference = run(tmp_path / "worker", "async", contextlib.nullcontext)
    contexts: dict[str, Callable[[], Any]] = {
        "plain": contextlib.nullcontext, "inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }
    for name, context in contexts.items():
        records = run(tmp_path / name, "sync", context)
        assert {r["telemetry"]["built_by"] for r in records} == {"trainer"}
        assert len(records) == len(reference) == 3
        for got, want in zip(records, reference, strict=True):
            for family in FAMILIES:
                assert got[family] == want[family], (name, family)
