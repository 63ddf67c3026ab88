"""The token holdout's numbers against plain torch, however the holdout is cut into chunks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train_telemetry.batches import BatchFormat, slice_batch
from train_telemetry.metrics import holdout
from train_telemetry.metrics.holdout import HoldoutForward, evaluate_holdout

VOCAB, T, ROWS = 40, 24, 10


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.embed(idx))  # [B, T, V]


@pytest.mark.parametrize("tokens_per_chunk", [4096, 3 * T, T - 1])
def test_token_holdout_equals_plain_torch_whatever_the_chunking(monkeypatch: pytest.MonkeyPatch,
                                                                 tokens_per_chunk: int) -> None:
    """Per-token loss/accuracy, perplexity and per-sequence numbers equal one plain torch pass; chunks never
    hold more label positions than TOKENS_PER_CHUNK (but at least one row); -100 labels are not scored."""
    monkeypatch.setattr(holdout, "TOKENS_PER_CHUNK", tokens_per_chunk)
    torch.manual_seed(0)
    model = TinyLM()
    x = torch.randint(0, VOCAB, (ROWS, T))
    y = torch.randint(0, VOCAB, (ROWS, T))
    y[0, :5] = -100
    batch = (x, y)
    fmt = BatchFormat.resolve(batch, ["img1", "img2"], "winner", True)
    got = evaluate_holdout(model, batch, y, HoldoutForward.for_model(model, batch, fmt, None), slice_batch, 256)
    assert model.calls == math.ceil(ROWS / max(1, min(256, tokens_per_chunk // T)))
    with torch.no_grad():
        logits = model.head(model.embed(x))
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none", ignore_index=-100).view(ROWS, T)
    valid = y >= 0
    assert got["tokens"] == int(valid.sum()) and got["scored"] == "all"
    assert got["loss"] == pytest.approx(float(per_token[valid].mean()), rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    correct = (logits.argmax(-1) == y) & valid
    assert got["accuracy"] == int(correct.sum()) / int(valid.sum())
    want_rows = (per_token * valid).sum(1) / valid.sum(1)
    assert got["example_loss"] == pytest.approx(want_rows.tolist(), rel=1e-6)
    assert got["example_accuracy"] == [int(c) / int(v) for c, v in zip(correct.sum(1), valid.sum(1), strict=True)]
