"""The Hugging Face Trainer integration: a real ``transformers.Trainer`` on a tiny random BERT.

Every recorded gradient norm, LR, weight delta and holdout prediction is compared with an
independent computation that a test-only callback, registered after ours, takes from the
live model at the same ``on_optimizer_step``; and with the Trainer's own logs (grad_norm,
learning_rate, loss) at the same step number.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from train_telemetry import read_records  # noqa: E402
from train_telemetry.integrations.transformers import TelemetryCallback  # noqa: E402

REL = 1e-5
SEQ = 8


def make_examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(1, 50, (SEQ,), generator=g)
        length = int(torch.randint(4, SEQ + 1, (1,), generator=g))
        mask = (torch.arange(SEQ) < length).long()
        examples.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(int(ids[0]) % 2)})
    return examples


def make_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def close(a: float | None, b: float | None, rel: float = REL) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-8)


def total_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


class Expect(TrainerCallback):
    """Test-only: what the records must hold, computed from the live model at on_optimizer_step."""

    def __init__(self, holdout: dict[str, torch.Tensor], every: int) -> None:
        self.holdout = holdout
        self.every = every
        self.rows: list[dict[str, Any]] = []
        self.previous: list[list[torch.Tensor]] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any) -> None:
        self.previous = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any) -> None:
        step = state.global_step + 1
        if step % self.every:
            return
        groups = optimizer.param_groups
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in groups]
        weights = [[p.detach().clone() for p in g["params"]] for g in groups]
        assert self.previous is not None
        deltas = [total_norm([w - r for w, r in zip(ws, rs, strict=True)]) for ws, rs in zip(weights, self.previous, strict=True)]
        self.previous = weights
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in self.holdout.items() if k != "labels"}).logits
        model.train(was_training)
        self.rows.append({
            "step": step,
            "grad": total_norm([g for gs in grads for g in gs]),
            "group_grads": [total_norm(gs) for gs in grads],
            "lrs": [float(g["lr"]) for g in groups],
            "deltas": deltas,
            "delta": math.sqrt(sum(d * d for d in deltas)),
            "logits": logits.clone(),
        })


def train(tmp_path: Path, telemetry_config: dict[str, Any], *, max_grad_norm: float, holdout: Any = None,
          num_workers: int = 0, max_steps: int = 6) -> tuple[list[dict], Expect, Trainer]:
    train_set = make_examples(32, seed=1)
    eval_set = make_examples(12, seed=2)
    expected_holdout = default_data_collator(eval_set[: telemetry_config["holdout_size"]])
    callback = TelemetryCallback(config=telemetry_config, holdout=holdout)
    expect = Expect(expected_holdout, telemetry_config["collect_every_n"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=5e-2,
        lr_scheduler_type="linear",  # a different LR at every step: a stale LR would show
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=num_workers,
        seed=0,
    )
    trainer = Trainer(model=make_model(), args=args, train_dataset=train_set, eval_dataset=eval_set,
                      callbacks=[callback, expect])  # ours first: Expect sees the same moment after it
    trainer.train()
    assert callback.summary is not None and callback.summary.clean
    return read_records(tmp_path / "out" / "telemetry"), expect, trainer


def logged(trainer: Trainer) -> dict[int, dict[str, float]]:
    return {e["step"]: e for e in trainer.state.log_history if "grad_norm" in e}


def check_against_expect(records: list[dict], expect: Expect, holdout_labels: torch.Tensor) -> None:
    assert [r["batch_idx"] for r in records] == [row["step"] for row in expect.rows]
    for rec, row in zip(records, expect.rows, strict=True):
        assert close(rec["gradient_norm"]["overall"], row["grad"]), (rec["gradient_norm"], row)
        for i, g in enumerate(row["group_grads"]):
            assert close(rec["gradient_norm"][f"group_{i}"], g)
            assert close(rec["learning_rates"][f"group_{i}"], row["lrs"][i])
            assert close(rec["weight_delta"][f"group_{i}"], row["deltas"][i], rel=1e-4)
        assert close(rec["weight_delta"]["overall"], row["delta"], rel=1e-4)
        hold = rec["holdout_logits"]
        assert torch.allclose(torch.tensor(hold["logits"]), row["logits"], rtol=REL, atol=1e-6)
        assert hold["predictions"] == row["logits"].argmax(1).tolist()
        assert hold["labels"] == holdout_labels.tolist()


@pytest.mark.timeout(240)
def test_records_equal_the_trainers_logs_and_the_live_model_without_clipping(tmp_path: Path) -> None:
    """Clipping off: grad_norm, learning_rate and loss equal the Trainer's own logs at each step; every value equals the live model's."""
    config = {"output_dir": None, "collect_every_n": 2, "holdout_size": 6, "mode": "async", "on_full": "block"}
    # num_workers=2: forked DataLoader workers carry our hooks and the Telemetry; they must stay inert.
    records, expect, trainer = train(tmp_path, config, max_grad_norm=0.0, num_workers=2)
    assert [r["batch_idx"] for r in records] == [2, 4, 6]
    assert [r["epoch"] for r in records] == [0, 0, 1]  # 4 optimizer steps per epoch
    logs = logged(trainer)
    for rec in records:
        log = logs[rec["batch_idx"]]
        assert close(rec["gradient_norm"]["overall"], log["grad_norm"]), (rec["gradient_norm"], log)
        assert close(rec["learning_rates"]["group_0"], log["learning_rate"])
        assert close(rec["train"]["loss"], log["loss"])
        assert "gradient_clipping" not in rec
        assert rec["batch_stats"]["batch_size"] == 4  # the step's last micro-batch
        assert 0.0 <= rec["train"]["accuracy"] <= 1.0
    labels = default_data_collator(make_examples(12, seed=2)[:6])["labels"]
    check_against_expect(records, expect, labels)


@pytest.mark.timeout(240)
def test_clipping_records_the_pre_clip_norm_the_trainer_logs_and_the_applied_norm(tmp_path: Path) -> None:
    """Clipping on: gradient_clipping.pre_clip_norm is the Trainer's logged grad_norm; gradient_norm is what the optimizer applied."""
    holdout = default_data_collator(make_examples(12, seed=2)[:6])
    config = {"collect_every_n": 1, "holdout_size": 6, "mode": "sync"}
    max_norm = 0.05  # below this tiny BERT's gradient norms: every step is clipped
    records, expect, trainer = train(tmp_path, config, max_grad_norm=max_norm, holdout=holdout, max_steps=4)
    assert [r["batch_idx"] for r in records] == [1, 2, 3, 4]
    logs = logged(trainer)
    for rec in records:
        log = logs[rec["batch_idx"]]
        clip = rec["gradient_clipping"]
        assert clip["max_norm"] == max_norm
        assert close(clip["pre_clip_norm"], log["grad_norm"]), (clip, log)
        assert clip["pre_clip_norm"] > max_norm
        assert close(rec["gradient_norm"]["overall"], max_norm, rel=1e-4)  # clip_grad_norm_ scales to max_norm
        assert close(rec["learning_rates"]["group_0"], log["learning_rate"])
    check_against_expect(records, expect, holdout["labels"])


@pytest.mark.timeout(60)
def test_a_missing_transformers_names_the_extra_to_install() -> None:
    """Importing the integration without transformers raises ImportError naming the pip extra."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n"
        "    import train_telemetry.integrations.transformers\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert "pip install 'train-telemetry[transformers]'" in out.stdout, out.stderr
