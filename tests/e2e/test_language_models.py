"""Language models, as users train them: a flat nanoGPT-style script, a Hugging Face causal LM
in a raw loop and through the Trainer. Holdout numbers, pre-clip norms and the training itself
are checked against independent torch computations of the same run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from train_telemetry import Telemetry, TelemetryConfig, read_records

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SCRIPT = Path(__file__).parent / "_trainer_scripts" / "nanogpt_flat.py"
VOCAB = 50257  # GPT-2's


def run_script(out: Path, mode: str) -> tuple[list[str], dict[str, Any], str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), mode], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [line for line in proc.stdout.splitlines() if line.startswith("iter ")]
    return losses, json.loads((out / f"check_{mode}.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    losses, _, _ = run_script(tmp_path_factory.mktemp("off"), "off")
    assert len(losses) == 20
    return losses


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["async", "auto"])
def test_flat_nanogpt_script_records_the_holdout_and_pre_clip_norms(tmp_path: Path, mode: str,
                                                                    plain_losses: list[str]) -> None:
    """A flat script with no main guard trains unchanged (same printed losses, start-up printed once); its
    holdout's per-token loss, accuracy, perplexity and per-sequence losses and its pre-clip norms equal
    an independent computation at the same steps."""
    losses, check, stdout = run_script(tmp_path, mode)
    assert stdout.count("loading data") == 1
    assert losses == plain_losses  # telemetry changed nothing in training
    records = read_records(tmp_path)
    assert [r["batch_idx"] for r in records] == [5, 10, 15, 20]
    if mode == "async":
        assert {r["telemetry"]["built_by"] for r in records} == {"worker"}
    for rec in records:
        want = check[str(rec["batch_idx"])]
        hold = rec["holdout_logits"]
        assert hold["scored"] == "all"  # the model was given its targets, so it returned every position
        assert hold["tokens"] == 8 * 32
        assert math.isclose(hold["loss"], want["loss"], rel_tol=1e-5)
        assert math.isclose(hold["accuracy"], want["accuracy"], rel_tol=1e-6)
        assert math.isclose(hold["perplexity"], math.exp(want["loss"]), rel_tol=1e-5)
        assert hold["example_loss"] == pytest.approx(want["example_loss"], rel=1e-5)
        assert "logits" not in hold and "predictions" not in hold
        clip = rec["gradient_clipping"]
        assert clip["max_norm"] == 1.0
        assert clip["pre_clip_norm"] == pytest.approx(want["pre_clip_norm"], rel=1e-6)
        assert rec["gradient_norm_pre_clip"]["overall"] == pytest.approx(want["pre_clip_norm"], rel=1e-5)
        assert rec["gradient_norm"]["overall"] <= 1.0 + 1e-5  # what the optimizer applied
        assert rec["batch_stats"]["batch_size"] == 8 and rec["batch_stats"]["tokens"] == 8 * 32
        assert 0.0 <= rec["train"]["accuracy"] <= 1.0


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32))


def lm_batch(g: torch.Generator, rows: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    """A padded causal-LM batch as DataCollatorForLanguageModeling makes it: labels = input_ids, -100 on padding."""
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def lm_loop(tmp_path: Path, mode: str, autocast: bool = False) -> tuple[list[dict[str, Any]], list[float]]:
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    holdout = lm_batch(torch.Generator().manual_seed(2), rows=6)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(tmp_path / mode), collect_every_n=2, mode=mode,
                                          on_full="block", holdout_size=6))
    telemetry.set_holdout_data(holdout)
    telemetry.start(model, opt)
    expected = []
    for step in range(1, 7):
        batch = lm_batch(g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=out.loss, outputs=out)
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                expected.append(float(model(**holdout).loss))  # HF's own shifted, -100-masked loss
            model.train()
    telemetry.stop()
    return read_records(tmp_path / mode), expected


@pytest.mark.timeout(120)
def test_hf_causal_lm_raw_loop_holdout_is_shifted_per_token_and_the_same_wherever_built(tmp_path: Path) -> None:
    """A Hugging Face causal LM in a raw loop: the holdout loss is the model's own shifted, -100-masked loss;
    records stay in the kilobytes with a 50,257-token vocabulary; the worker and the training thread
    write the same holdout numbers."""
    by_mode = {}
    for mode in ("async", "sync"):
        records, expected = lm_loop(tmp_path, mode)
        assert [r["batch_idx"] for r in records] == [2, 4, 6]
        for rec, want in zip(records, expected, strict=True):
            hold = rec["holdout_logits"]
            assert hold["scored"] == "shifted"
            assert math.isclose(hold["loss"], want, rel_tol=1e-5), (hold["loss"], want)
            assert math.isclose(hold["perplexity"], math.exp(hold["loss"]), rel_tol=1e-9)
            assert len(hold["example_loss"]) == len(hold["example_accuracy"]) == 6
            line = json.dumps(rec)
            assert len(line) < 16 * 1024, len(line)
            stats = rec["batch_stats"]
            assert stats["batch_size"] == 4 and 0 < stats["tokens"] <= 64 and "distinct_labels" in stats
        by_mode[mode] = records
    for a, b in zip(by_mode["async"], by_mode["sync"], strict=True):
        assert a["holdout_logits"]["loss"] == pytest.approx(b["holdout_logits"]["loss"], rel=1e-6)
        assert a["holdout_logits"]["accuracy"] == b["holdout_logits"]["accuracy"]


@pytest.mark.timeout(120)
def test_holdout_built_inline_under_autocast_equals_the_float32_eval(tmp_path: Path) -> None:
    """The hook called inside the user's bf16 autocast block: the inline holdout eval still runs in float32."""
    records, _ = lm_loop(tmp_path / "a", "sync", autocast=True)
    model = tiny_gpt2()
    # the same training, replayed without telemetry, then an independent float32 eval of the holdout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    holdout = lm_batch(torch.Generator().manual_seed(2), rows=6)
    want = []
    for step in range(1, 7):
        batch = lm_batch(g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                logits = model(**{k: v for k, v in holdout.items() if k != "labels"}).logits.float()
            model.train()
            want.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), holdout["labels"][:, 1:].reshape(-1))))
    got = [r["holdout_logits"]["loss"] for r in records]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.timeout(240)
def test_hf_causal_lm_through_the_trainer_records_a_token_holdout(tmp_path: Path) -> None:
    """A tiny GPT-2 through the Hugging Face Trainer with clipping: the holdout taken from eval_dataset is scored
    shifted, its loss at the last step equals the model's own loss on it, and records stay in the kilobytes."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from train_telemetry.integrations.transformers import TelemetryCallback

    g = torch.Generator().manual_seed(3)
    examples = [{k: v[0] for k, v in lm_batch(g, rows=1).items()} for _ in range(24)]
    callback = TelemetryCallback(config={"collect_every_n": 2, "holdout_size": 4, "mode": "sync"})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=args, train_dataset=examples[:16], eval_dataset=examples[16:],
                      data_collator=default_data_collator, callbacks=[callback])
    trainer.train()
    records = read_records(tmp_path / "out" / "telemetry")
    assert [r["batch_idx"] for r in records] == [2, 4]
    holdout = default_data_collator(examples[16:20])
    model.eval()
    with torch.no_grad():
        want = float(model(**holdout).loss)
    last = records[-1]["holdout_logits"]
    assert last["scored"] == "shifted" and len(last["example_loss"]) == 4
    assert math.isclose(last["loss"], want, rel_tol=1e-5), (last["loss"], want)
    assert all(len(json.dumps(r)) < 16 * 1024 for r in records)
    assert all("gradient_clipping" in r and "distinct_labels" in r["batch_stats"] for r in records)
