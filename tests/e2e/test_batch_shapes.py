"""Real training code, unchanged: tuple batches, Hugging Face dicts, the seed's dict, and
several optimizers, through the real collector (worker process), checked against torch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import TinyNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, read_records


class KwModel(nn.Module):
    """Hugging Face style: keyword inputs, an output object with .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"logits": self.head(pooled)}


def _eval(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*args, **kwargs)
    model.train()
    return out["logits"] if isinstance(out, dict) else out


def _pct(labels: torch.Tensor, name: str, classes: int) -> dict[str, float]:
    counts = torch.bincount(labels, minlength=classes).tolist()
    return {f"{name}_{c}_pct": 100.0 * n / len(labels) for c, n in enumerate(counts)}


@pytest.mark.timeout(180)
def test_tensordataset_tuples_need_no_keys(tmp_path: Path) -> None:
    """(x, y) batches of a TensorDataset DataLoader: holdout predictions and batch balance with no key configured."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=16, shuffle=False)
    model = TinyNet(n_in=5, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, holdout_size=20,
                                          on_full="block"))
    telemetry.set_holdout_data(loader)  # a whole DataLoader: the first 20 rows are kept
    telemetry.start(model, opt)
    hx, hy = data.tensors[0][:20], data.tensors[1][:20]
    expected = []
    for step, (x, y) in enumerate(loader):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss)
        expected.append((_eval(model, hx), _pct(y, "1", 3)))
    assert telemetry.stop().clean
    records = read_records(tmp_path / "run")
    assert len(records) == 4
    for rec, (logits, pct) in zip(records, expected, strict=True):
        assert rec["holdout_logits"]["labels"] == hy.tolist()
        assert torch.allclose(torch.tensor(rec["holdout_logits"]["logits"]), logits, rtol=1e-5, atol=1e-6)
        assert rec["batch_stats"] == {**pct, "batch_size": 16}


@pytest.mark.timeout(180)
def test_hugging_face_style_dicts_are_fed_as_keywords(tmp_path: Path) -> None:
    """A dict of input_ids/attention_mask/labels is fed as model(**inputs); .logits / ['logits'] are read."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = KwModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 20, (n, 6), generator=g),
                "attention_mask": torch.ones(n, 6, dtype=torch.long), "labels": torch.randint(0, 2, (n,), generator=g)}

    holdout = batch(10)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, on_full="block"))
    telemetry.set_holdout_data(holdout)
    telemetry.start(model, opt)
    expected = []
    for step in range(3):
        b = batch(8)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = nn.functional.cross_entropy(out["logits"], b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, b, loss=loss, outputs=out)
        acc = float((out["logits"].argmax(-1) == b["labels"]).float().mean())
        expected.append((_eval(model, input_ids=holdout["input_ids"], attention_mask=holdout["attention_mask"]),
                         _pct(b["labels"], "labels", 2), acc))
    assert telemetry.stop().clean
    records = read_records(tmp_path / "run")
    for rec, (logits, pct, acc) in zip(records, expected, strict=True):
        assert torch.allclose(torch.tensor(rec["holdout_logits"]["logits"]), logits, rtol=1e-5, atol=1e-6)
        assert rec["batch_stats"] == {**pct, "batch_size": 8}
        assert math.isclose(rec["train"]["accuracy"], acc)


@pytest.mark.timeout(120)
def test_a_configured_position_works_from_yaml(tmp_path: Path) -> None:
    """input_keys/label_key as tuple positions in YAML: (label, x) batches read the right parts."""
    path = tmp_path / "t.yaml"
    path.write_text(f"telemetry:\n  output_dir: {tmp_path / 'run'}\n  collect_every_n: 1\n  input_keys: [1]\n"
                    "  label_key: 0\n  mode: sync\n")
    config = TelemetryConfig.from_yaml(path)
    assert (config.input_keys, config.label_key) == ([1], 0)
    torch.manual_seed(0)
    model = TinyNet(n_in=5, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y, x = torch.tensor([0, 0, 2, 1]), torch.randn(4, 5)
    telemetry = Telemetry(config)
    telemetry.set_holdout_data((y, x))
    telemetry.start(model, opt)
    telemetry.on_batch_end(model, opt, 0, 0, None, (y, x))
    telemetry.stop()
    rec = read_records(tmp_path / "run")[0]
    assert rec["holdout_logits"]["labels"] == y.tolist()
    assert torch.allclose(torch.tensor(rec["holdout_logits"]["logits"]), _eval(model, x), rtol=1e-5, atol=1e-6)
    assert rec["batch_stats"] == {"0_0_pct": 50.0, "0_1_pct": 25.0, "0_2_pct": 25.0, "batch_size": 4}


@pytest.mark.timeout(60)
def test_an_ambiguous_holdout_fails_start_showing_its_structure(tmp_path: Path) -> None:
    """A dict whose labels cannot be told fails start() with the batch's keys and the config key to set."""
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), mode="sync"))
    telemetry.set_holdout_data({"a": torch.zeros(4, 5), "b": torch.zeros(4)})
    with pytest.raises(TelemetryConfigError, match=r"'a' \(tensor \[4, 5\]\).*'b' \(tensor \[4\]\).*label_key"):
        telemetry.start(TinyNet(n_in=5, hidden=16), None)


@pytest.mark.timeout(180)
def test_several_optimizers_are_all_recorded(tmp_path: Path) -> None:
    """start(model, [opt_a, opt_b]): every group of every optimizer is a group; names stay unique; all LRs."""
    torch.manual_seed(0)
    model = TinyNet(n_in=5, hidden=16)
    opt_a = torch.optim.SGD([{"params": model.body.parameters(), "lr": 0.1, "name": "body"}])
    opt_b = torch.optim.Adam([{"params": model.head.parameters(), "lr": 0.01}])  # unnamed: group_1
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, on_full="block"))
    telemetry.start(model, [opt_a, opt_b])
    g = torch.Generator().manual_seed(0)
    expected = []
    for step in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss.backward()
        opt_a.step()
        opt_b.step()
        telemetry.on_batch_end(model, [opt_a, opt_b], step, 0, None, (x, y))
        grads = {"body": [p.grad for p in model.body.parameters()], "group_1": [p.grad for p in model.head.parameters()]}
        expected.append(({k: float(nn.utils.get_total_norm(v)) for k, v in grads.items()}, sched.get_last_lr()[0]))
        sched.step()
    assert telemetry.stop().clean
    records = read_records(tmp_path / "run")
    assert len(records) == 3
    for rec, (norms, lr_b) in zip(records, expected, strict=True):
        assert set(rec["gradient_norm"]) == {"overall", "body", "group_1"}  # no "unassigned"
        for name, value in norms.items():
            assert math.isclose(rec["gradient_norm"][name], value, rel_tol=1e-5)
        assert rec["learning_rates"] == {"group_0": 0.1, "body": 0.1, "group_1": pytest.approx(lr_b)}
