"""The trainer -> worker hand-off: what travels in the slot, the header and the control queue.

A real tiny training run per test; every value is checked against torch at the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TinyNet, tiny_config
from torch import nn

import train_telemetry.collect as telemetry_module
from train_telemetry import Telemetry, TelemetryConfig, read_records


def _config(tmp_path: Path, mode: str, **extra: object) -> TelemetryConfig:
    return tiny_config(tmp_path / "run", mode, input_keys=["x"], label_key="y", holdout_size=8, **extra)


def _batch(g: torch.Generator, n: int = 12) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(n, 6, generator=g), "y": torch.randint(0, 3, (n,), generator=g)}


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(batch["x"])
    loss = nn.functional.cross_entropy(outputs, batch["y"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, outputs


def _start(
    tmp_path: Path, mode: str, seed: int, groups: Callable[[TinyNet], Any] | None = None, **config: object
) -> tuple[TinyNet, torch.optim.Optimizer, Telemetry, torch.Generator]:
    """A started run: a fresh TinyNet, SGD (over ``groups(model)`` if given), the holdout set when tracked."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.SGD(groups(model) if groups else model.parameters(), lr=0.1)
    telemetry = Telemetry(_config(tmp_path, mode, **config))
    if telemetry.config.track_holdout_logits:
        telemetry.set_holdout_data(_batch(g, 8))
    telemetry.start(model, opt)
    return model, opt, telemetry, g


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_param_group_added_mid_run_is_named_from_that_record_on(tmp_path: Path, mode: str) -> None:
    """The group map travels as a versioned message; records before the change keep the old map."""
    model, opt, telemetry, g = _start(
        tmp_path, mode, 1, groups=lambda m: [{"params": m.body.parameters(), "lr": 0.1, "name": "body"}])
    expected_head = []
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": model.head.parameters(), "lr": 0.01, "name": "head"})
        batch = _batch(g)
        loss, outputs = _step(model, opt, batch)
        telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=outputs)
        expected_head.append(float(nn.utils.get_total_norm([p.grad for p in model.head.parameters()])))
    summary = telemetry.stop()
    records = read_records(tmp_path / "run")
    assert summary.clean and len(records) == 6
    for rec in records[:3]:  # the head is trained by nobody yet
        assert set(rec["learning_rates"]) == {"group_0", "body"}
        assert "unassigned" in rec["gradient_norm"] and "head" not in rec["gradient_norm"]
    for rec, head in zip(records[3:], expected_head[3:], strict=True):
        assert set(rec["learning_rates"]) == {"group_0", "body", "group_1", "head"}
        assert rec["learning_rates"]["head"] == pytest.approx(0.01)
        assert rec["gradient_norm"]["head"] == pytest.approx(head, rel=1e-5)
        assert "unassigned" not in rec["gradient_norm"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("aux_bytes", [1 << 20, 16])  # 16: labels and outputs do not fit: counted in the hook
def test_label_counts_and_accuracy_are_exact_whether_copied_or_computed_in_the_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aux_bytes: int
) -> None:
    monkeypatch.setattr(telemetry_module, "AUX_BYTES", aux_bytes)
    model, opt, telemetry, g = _start(tmp_path, "async", 2)
    expected = []
    for step in range(5):
        batch = _batch(g, n=10 + step)  # a new shape each step: a new aux layout each time
        loss, outputs = _step(model, opt, batch)
        telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=outputs)
        counts = torch.bincount(batch["y"], minlength=3).tolist()
        expected.append((counts, float((outputs.argmax(1) == batch["y"]).float().mean()), float(loss.detach())))
    summary = telemetry.stop()
    records = read_records(tmp_path / "run")
    assert summary.clean and len(records) == 5
    for rec, (counts, accuracy, loss_value) in zip(records, expected, strict=True):
        n = sum(counts)
        assert rec["batch_stats"]["batch_size"] == n
        for cls in range(3):
            assert rec["batch_stats"][f"y_{cls}_pct"] == pytest.approx(100.0 * counts[cls] / n)
        assert rec["train"]["accuracy"] == pytest.approx(accuracy)
        assert rec["train"]["loss"] == pytest.approx(loss_value, rel=1e-6)
        assert "errors" not in rec


@pytest.mark.timeout(120)
def test_labels_given_as_a_list_and_a_float_loss_are_recorded(tmp_path: Path) -> None:
    model, opt, telemetry, g = _start(tmp_path, "async", 3, track_holdout_logits=False)
    batch = _batch(g)
    loss, _ = _step(model, opt, batch)
    labels = batch["y"].tolist()
    telemetry.on_batch_end(model, opt, 0, 0, None, {"x": batch["x"], "y": labels}, loss=float(loss.detach()))
    assert torch.is_grad_enabled()  # the hook turns grad mode off for its copies and back on
    with torch.no_grad():
        telemetry.on_batch_end(model, opt, 1, 0, None, batch, loss=loss)
        assert not torch.is_grad_enabled()
    telemetry.stop()
    rec, _ = read_records(tmp_path / "run")
    for cls in range(3):
        assert rec["batch_stats"][f"y_{cls}_pct"] == pytest.approx(100.0 * labels.count(cls) / len(labels))
    assert rec["batch_stats"]["batch_size"] == len(labels)
    assert rec["train"] == {"loss": pytest.approx(float(loss.detach())), "accuracy": None}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_delta_reference_on_disk_is_the_last_collection_and_loads_with_torch(tmp_path: Path, mode: str) -> None:
    """last_checkpoint.pt is rewritten in place at each collection; torch.load reads the weights of the last one."""
    model, opt, telemetry, g = _start(tmp_path, mode, 4)
    for step in range(4):
        batch = _batch(g)
        loss, outputs = _step(model, opt, batch)
        telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=outputs)
    assert telemetry.stop().clean
    ckpt = torch.load(tmp_path / "run" / "last_checkpoint.pt", weights_only=True)
    assert (ckpt["batch_idx"], ckpt["epoch"]) == (3, 0)
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], value), name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_the_other_start_methods_hand_over_every_snapshot(tmp_path: Path, start_method: str) -> None:
    """The slots, ring and semaphore reach a fork- or forkserver-started worker as well as a spawned one."""
    model, opt, telemetry, g = _start(tmp_path, "async", 5, start_method=start_method)
    norms = []
    for step in range(3):
        batch = _batch(g)
        loss, outputs = _step(model, opt, batch)
        telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=outputs)
        norms.append(float(nn.utils.get_total_norm([p.grad for p in model.parameters()])))
    summary = telemetry.stop()
    records = read_records(tmp_path / "run")
    assert summary.clean and [r["batch_idx"] for r in records] == [0, 1, 2]
    assert [r["gradient_norm"]["overall"] for r in records] == pytest.approx(norms, rel=1e-5)
    assert all(len(r["holdout_logits"]["logits"]) == 8 for r in records)
