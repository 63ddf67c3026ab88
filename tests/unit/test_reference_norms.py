"""The worker's weight delta against the on-disk reference: exact, read in chunks, any torch.save layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_telemetry import reference as worker
from train_telemetry.reference import reference_norms


def _save(path: Path, state: dict[str, torch.Tensor], batch_idx: int = 7) -> None:
    torch.save({"batch_idx": batch_idx, "epoch": 0, "state_dict": state}, path)


def _expected(current: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    return ([float((c.double() - r.double()).norm()) for c, r in zip(current, refs, strict=True)],
            [float(r.double().norm()) for r in refs])


@pytest.mark.parametrize("chunk", [4 << 20, 64])  # 64 bytes: every tensor spans many reads
def test_delta_and_reference_norms_equal_torch_for_a_slot_shaped_checkpoint(
    tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views of one flat buffer per dtype (how the worker saves a slot), mixed dtypes, buffers after params."""
    monkeypatch.setattr(worker, "_READ_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    flat32 = torch.randn(1000, generator=g)
    flat64 = torch.randn(10, dtype=torch.float64, generator=g)
    state = {"a": flat32[:600].view(20, 30), "b": flat32[600:990], "c": flat64, "buf": flat32[990:],
             "steps": torch.arange(3)}
    _save(tmp_path / "ref.pt", state)
    refs = [state[k] for k in ("a", "b", "c")]
    current = [refs[0] + 0.5, refs[1] * 2, refs[2] - 3]
    deltas, norms, batch_idx = reference_norms(tmp_path / "ref.pt", ["a", "b", "c"], current)
    exp_deltas, exp_norms = _expected(current, refs)
    assert deltas == pytest.approx(exp_deltas, rel=1e-6) and norms == pytest.approx(exp_norms, rel=1e-6)
    assert batch_idx == 7


def test_a_checkpoint_it_cannot_read_in_place_falls_back_to_the_mmap(tmp_path: Path) -> None:
    """A non-contiguous reference (not what the worker writes, but a valid torch.save file) still gives exact values."""
    base = torch.randn(8, 6)
    state = {"w": base.t(), "v": torch.randn(5)}  # w is a transposed view: not contiguous
    _save(tmp_path / "ref.pt", state)
    current = [state["w"].contiguous() * 3, state["v"] + 1]
    deltas, norms, _ = reference_norms(tmp_path / "ref.pt", ["w", "v"], current)
    exp_deltas, exp_norms = _expected(current, [state["w"], state["v"]])
    assert deltas == pytest.approx(exp_deltas, rel=1e-6) and norms == pytest.approx(exp_norms, rel=1e-6)


def test_a_reference_that_does_not_match_the_model_names_the_tensor(tmp_path: Path) -> None:
    _save(tmp_path / "ref.pt", {"w": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="lacks 1 parameters, e.g. 'missing'"):
        reference_norms(tmp_path / "ref.pt", ["missing"], [torch.zeros(1)])
    with pytest.raises(ValueError, match=r"w is torch.float32\[2, 3\], the model's torch.float32\[3, 2\]"):
        reference_norms(tmp_path / "ref.pt", ["w"], [torch.zeros(3, 2)])
