"""A Hugging Face ``Trainer`` run: a tiny GPT-2 built from a config (no download), character LM.

Runs in: a harness training process. The telemetry is the README's one line:
``callbacks=[TelemetryCallback(config)]``; the Trainer clips at its default ``max_grad_norm``
1.0. Bugs are configuration mistakes (the LR, the schedule's lengths, an optimizer built by
hand that misses a module) and LR spikes through a hand-made scheduler.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from train_telemetry.integrations.transformers import TelemetryCallback

from .common import Case, char_data

BUGS = {
    "healthy": "AdamW 3e-3, linear decay with 10 warm-up steps (seed 1: cosine at 1e-3)",
    "lr_tiny": "learning_rate 1e-6",
    "lr_zero_early": "a hand-made linear decay that reaches 0 at 30% of max_steps",
    "warmup_unfinished": "warmup_steps 10x max_steps",
    "stale_optimizer": "a hand-built AdamW over every parameter except the final LayerNorm",
    "lr_bump": "hand-made schedule: LR x100 for 5 steps at 60% of the run (recovers)",
    "lr_jump": "hand-made schedule: LR x1000 from 60% of the run on (diverges)",
}
BLOCK = 48


class Windows(torch.utils.data.Dataset):
    """Fixed random windows of the text as causal-LM examples (labels = input_ids)."""

    def __init__(self, ids: torch.Tensor, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(ids) - BLOCK, (n,), generator=g).tolist()
        self.ids = ids

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.ids[self.starts[i] : self.starts[i] + BLOCK]
        return {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": window.clone()}


def spike_step(steps: int) -> int:
    """Where a spike is injected: 60% into the run (after llm-foundry's 100-step window)."""
    return int(0.6 * steps)


def run(case: Case, out: Path, steps: int) -> None:
    bug, seed = case.bug, case.seed
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    train_ids, val_ids, vocab = char_data()
    config = GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=48, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    base_lr = {"lr_tiny": 1e-6}.get(bug, 1e-3 if seed == 1 else 3e-3)
    args = TrainingArguments(
        output_dir=str(out / "hf"), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=base_lr, warmup_steps=10 * steps if bug == "warmup_unfinished" else 10,
        lr_scheduler_type="cosine" if seed == 1 else "linear", weight_decay=0.01,
        logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None)
    k = spike_step(steps)
    if bug == "stale_optimizer":
        params = [p for n, p in model.named_parameters() if not n.startswith("transformer.ln_f")]
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.01)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)))
    elif bug in ("lr_zero_early", "lr_bump", "lr_jump"):
        opt = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.01)

        def factor(s: int) -> float:
            warm = min(1.0, (s + 1) / 10)
            if bug == "lr_zero_early":
                return warm * max(0.0, 1 - s / (0.3 * steps))
            base = warm * 0.5 * (1 + math.cos(math.pi * s / steps))
            if bug == "lr_bump" and k <= s < k + 5:
                return base * 100
            if bug == "lr_jump" and s >= k:
                return base * 1000
            return base

        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, factor))
    trainer = Trainer(
        model=model, args=args, train_dataset=Windows(train_ids, steps * 16, seed),
        eval_dataset=Windows(val_ids, 16, 999), optimizers=optimizers,
        callbacks=[TelemetryCallback({"output_dir": str(out), "collect_every_n": 1, "mode": "sync",
                                      "overhead_budget": None, "holdout_size": 8})],
    )  # fmt: skip
    trainer.train()
