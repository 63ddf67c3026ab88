"""Where a NaN/Inf came from: a real tiny run with a NaN put into one gradient, one weight, or
an Inf that a GradScaler skips; the first record after it names the tensor, its group and
layer, and whether the optimizer applied it; the hook adds no host sync to find it."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TinyNet, batches, tiny_config
from torch import nn

from train_telemetry import Telemetry, read_records
from train_telemetry.analysis import diagnose, load_run

BAD = 5  # the step the value goes bad


def _run(out: Path, mode: str, spoil: Callable[[TinyNet, int], None], when: str,
         scaler: torch.amp.GradScaler | None = None, on_hook: Callable[[bool], None] | None = None) -> list[dict[str, Any]]:
    """8 steps of TinyNet under SGD with groups body/head, every step recorded; ``spoil(model,
    step)`` runs after backward (``when="grad"``) or after the optimizer step (``"weight"``)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD([{"params": model.body.parameters(), "name": "body"},
                           {"params": model.head.parameters(), "name": "head"}], lr=0.1)
    telemetry = Telemetry(tiny_config(out, mode, track_holdout_logits=False))
    telemetry.start(model, opt)
    data = batches(0)
    for step in range(8):
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if when == "grad":
            spoil(model, step)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if when == "weight":
            spoil(model, step)
        if on_hook is not None:
            on_hook(True)
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss)
        if on_hook is not None:
            on_hook(False)
    telemetry.stop()
    return read_records(out)


def _at(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    (record,) = [r for r in records if r["step"] == step]
    return record


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_nan_put_into_one_gradient_is_named_at_the_next_record(tmp_path: Path, mode: str) -> None:
    def spoil(model: TinyNet, step: int) -> None:
        if step == BAD:
            assert model.body.bias.grad is not None
            model.body.bias.grad[2] = math.nan

    records = _run(tmp_path / "run", mode, spoil, "grad")
    assert all("nonfinite" not in r for r in records if r["step"] < BAD)
    origin = _at(records, BAD)["nonfinite_origin"]
    # SGD applied it: the same parameter's weight is NaN too, and nothing else yet.
    assert origin["first"] == [
        {"kind": "gradient", "param": "body.bias", "group": "body", "layer": "body", "value": "nan"},
        {"kind": "weight", "param": "body.bias", "group": "body", "layer": "body", "value": "nan"},
    ]
    assert (origin["gradients"], origin["weights"], origin["parameters"]) == (1, 1, 4)
    assert origin["step_skipped"] is False and origin["since_step"] == BAD - 1
    # The next forward spreads it: the loss and every later parameter go NaN; the record says so.
    later = _at(records, BAD + 1)["nonfinite_origin"]
    assert later["first"][0]["kind"] == "loss" and later["since_step"] == BAD - 1
    (found,) = [d for d in diagnose(load_run(tmp_path / "run")) if d.code == "nonfinite"]
    assert f"first at step {BAD}: gradient of body.bias (group body, layer body)" in found.title, found.title
    assert f"all finite at step {BAD - 1}; the optimizer applied it" in found.title, found.title


@pytest.mark.timeout(120)
def test_a_nan_put_into_one_weight_names_that_weight_and_no_gradient(tmp_path: Path) -> None:
    def spoil(model: TinyNet, step: int) -> None:
        if step == BAD:
            with torch.no_grad():
                model.head.weight[0, 1] = math.inf

    records = _run(tmp_path / "run", "async", spoil, "weight")
    origin = _at(records, BAD)["nonfinite_origin"]
    assert origin["first"] == [{"kind": "weight", "param": "head.weight", "group": "head", "layer": "head",
                                "value": "+inf"}]
    assert (origin["gradients"], origin["weights"], origin["step_skipped"]) == (0, 1, None)


@pytest.mark.timeout(120)
def test_a_step_a_grad_scaler_skipped_is_named_as_skipped(tmp_path: Path) -> None:
    """An Inf gradient under torch.amp.GradScaler: the optimizer step is skipped, the weights stay
    finite, and the record says the step was skipped; the run goes on finite."""
    def spoil(model: TinyNet, step: int) -> None:
        if step == BAD:
            assert model.head.weight.grad is not None
            model.head.weight.grad[0, 0] = math.inf

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    records = _run(tmp_path / "run", "sync", spoil, "grad", scaler=scaler)
    origin = _at(records, BAD)["nonfinite_origin"]
    assert [(t["kind"], t["param"]) for t in origin["first"]] == [("gradient", "head.weight")]
    assert origin["step_skipped"] is True and origin["weights"] == 0
    assert _at(records, BAD)["weight_delta"]["overall"] == 0.0  # the weights did not move
    assert all("nonfinite" not in r for r in records if r["step"] != BAD)
    assert scaler.get_scale() == 2.0**7  # GradScaler itself saw the Inf once
    (found,) = [d for d in diagnose(load_run(tmp_path / "run")) if d.code == "nonfinite"]
    assert "the optimizer skipped that step" in found.title and "GradScaler" in found.hint


@pytest.mark.timeout(120)
def test_finding_the_origin_adds_no_host_sync_to_the_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside on_batch_end (async: the hook alone), with NaN in the run: no .item(), .tolist(),
    float(tensor) or synchronize call."""
    calls: list[str] = []
    inside = [False]
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *a: Any, _name: str = name, _original: Any = original, **k: Any) -> Any:
            if inside[0]:
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))

    def spoil(model: TinyNet, step: int) -> None:
        if step == BAD:
            assert model.body.weight.grad is not None
            model.body.weight.grad[0, 0] = math.nan

    def hook(entering: bool) -> None:
        inside[0] = entering

    records = _run(tmp_path / "run", "async", spoil, "grad", on_hook=hook)
    assert _at(records, BAD)["nonfinite_origin"]["first"][0]["param"] == "body.weight"
    assert calls == []
