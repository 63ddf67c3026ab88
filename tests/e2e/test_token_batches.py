"""Token labels end to end: a GPT-2-vocabulary model, a Hugging Face causal LM, and the
label name of plain ``(x, y)`` batches, through the real collector (worker and inline);
and where a failing holdout forward says it ran.

Every batch_stats and train value is checked against an independent torch computation on
the batch and outputs the test passed to the hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import TinyNet
from torch import nn

import train_telemetry.collect as collect_module
from train_telemetry import Telemetry, TelemetryConfig, TelemetryStartError, read_records
from train_telemetry.config import Tuning

VOCAB = 50257  # GPT-2's: a record per token id would be 1 MB
MAX_LINE_BYTES = 16 * 1024


class TokenModel(nn.Module):
    """The smallest next-token model over a GPT-2 vocabulary: [B, T] ids -> [B, T, V] logits."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def _config(tmp_path: Path, mode: str) -> TelemetryConfig:
    return TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, mode=mode,  # type: ignore[arg-type]
                           on_full="block", track_holdout_logits=False, tuning=Tuning(worker_nice=0))


def _expected_stats(labels: torch.Tensor, name: str) -> dict[str, float | int]:
    """The many-class batch_stats of ``labels``, from torch.unique: the five largest shares (ties: smaller id)."""
    kept = labels[labels >= 0]
    ids, counts = torch.unique(kept, return_counts=True)
    top = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))[:5]
    return {"batch_size": int(labels.shape[0]), "tokens": kept.numel(),
            "ignored_pct": 100.0 * float((labels < 0).double().mean()), "distinct_labels": ids.numel(),
            **{f"{name}_{i}_pct": 100.0 * n / kept.numel() for i, n in top}}


def greedy_ids(model: nn.Module, first: torch.Tensor, length: int) -> torch.Tensor:
    """Ids the model itself predicts one after another: most next-token predictions are right."""
    ids = first
    with torch.no_grad():
        while ids.shape[1] < length:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def _lines(tmp_path: Path) -> list[bytes]:
    return (tmp_path / "run" / "telemetry.jsonl").read_bytes().splitlines()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "aux_bytes"), [("sync", None), ("async", None), ("async", 16)])
def test_gpt2_vocabulary_labels_give_a_small_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, aux_bytes: int | None
) -> None:
    """(x, y) batches of [4, 32] GPT-2 ids: records under 16 KB with tokens, distinct ids, top shares and accuracy as torch counts them
    (aux_bytes 16: labels too big to copy, so the hook sends its bounded summary instead)."""
    if aux_bytes is not None:
        monkeypatch.setattr(collect_module, "AUX_BYTES", aux_bytes)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TokenModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(_config(tmp_path, mode))
    telemetry.start(model, opt)
    expected = []
    for step in range(3):
        x = torch.randint(0, VOCAB, (4, 32), generator=g)
        logits = model(x)
        y = torch.randint(0, VOCAB, (4, 32), generator=g)
        y[:, ::4] = torch.randint(0, 6, (4, 8), generator=g)  # a few frequent ids: top shares that are not ties
        y[:, 1::4] = logits.argmax(-1)[:, 1::4]  # a quarter predicted right: an accuracy that tells shifts apart
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss, outputs=logits)
        accuracy = float((logits.argmax(-1) == y).double().mean())
        assert accuracy >= 0.25 > float((logits[:, :-1].argmax(-1) == y[:, 1:]).double().mean())
        expected.append((_expected_stats(y, "1"), accuracy))
    assert telemetry.stop().clean
    lines = _lines(tmp_path)
    assert len(lines) == 3 and all(len(line) < MAX_LINE_BYTES for line in lines)
    for rec, (stats, accuracy) in zip(read_records(tmp_path / "run"), expected, strict=True):
        assert rec["batch_stats"] == pytest.approx(stats)
        assert rec["batch_stats"]["tokens"] == 128 and rec["batch_stats"]["ignored_pct"] == 0.0
        assert len(json.dumps(rec["batch_stats"])) < 400
        assert rec["train"]["accuracy"] == pytest.approx(accuracy)
        assert "errors" not in rec


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_hugging_face_causal_lm_scores_shifted_tokens_and_reports_padding(tmp_path: Path, mode: str) -> None:
    """GPT2LMHeadModel on {input_ids, attention_mask, labels} with -100 at padding: ignored_pct and accuracy of
    logits[:, :-1] against labels[:, 1:] over the scored labels, as torch computes them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=1000, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # greedy ids = training forward
                                     tie_word_embeddings=False)  # tied, a random model predicts the token it reads
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    telemetry = Telemetry(_config(tmp_path, mode))
    telemetry.start(model, opt)
    expected = []
    for step in range(3):
        ids = greedy_ids(model, torch.randint(0, 1000, (4, 1), generator=g), 16)
        lengths = torch.tensor([16, 12, 9, 5])
        mask = (torch.arange(16) < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=out.loss, outputs=out)
        target = batch["labels"][:, 1:]
        right = out.logits[:, :-1].argmax(-1) == target
        accuracy = float(right[target >= 0].double().mean())
        unshifted = out.logits.argmax(-1) == batch["labels"]
        assert accuracy > float(unshifted[batch["labels"] >= 0].double().mean()) + 0.2  # the two scorings differ
        expected.append((_expected_stats(batch["labels"], "labels"), accuracy))
    assert telemetry.stop().clean
    assert all(len(line) < MAX_LINE_BYTES for line in _lines(tmp_path))
    records = read_records(tmp_path / "run")
    assert len(records) == 3
    for rec, (stats, accuracy) in zip(records, expected, strict=True):
        assert rec["batch_stats"] == pytest.approx(stats)
        assert rec["batch_stats"]["ignored_pct"] == pytest.approx(100.0 * 22 / 64)
        assert rec["train"]["accuracy"] == pytest.approx(accuracy)
        assert "errors" not in rec


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tuple_batches_without_a_holdout_name_the_labels_by_position(tmp_path: Path, mode: str) -> None:
    """(x, y) classification batches and no holdout: batch_stats keys are 1_<cls>_pct (the label's position)."""
    torch.manual_seed(0)
    model = TinyNet(n_in=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(_config(tmp_path, mode))
    telemetry.start(model, opt)
    x, y = torch.randn(8, 5), torch.tensor([0, 2, 2, 1, 2, 0, 2, 2])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    telemetry.on_batch_end(model, opt, 0, 0, None, (x, y), loss=loss)
    assert telemetry.stop().clean
    (rec,) = read_records(tmp_path / "run")
    shares = torch.bincount(y, minlength=3).double() * 100.0 / len(y)
    assert rec["batch_stats"] == pytest.approx({**{f"1_{c}_pct": float(v) for c, v in enumerate(shares)},
                                                "batch_size": 8})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "where"), [("sync", "on the training thread"), ("async", "in the telemetry worker")])
def test_a_failing_holdout_forward_says_where_it_ran(tmp_path: Path, mode: str, where: str) -> None:
    """start() fails on a holdout the model cannot take, naming the thread or process that ran the forward."""
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), mode=mode, tuning=Tuning(worker_nice=0)))  # type: ignore[arg-type]
    telemetry.set_holdout_data((torch.randn(4, 7), torch.tensor([0, 1, 2, 0])))  # TinyNet(n_in=5) takes 5 features
    with pytest.raises(TelemetryStartError, match=f"the holdout forward failed {where}"):
        telemetry.start(TinyNet(n_in=5), None)
