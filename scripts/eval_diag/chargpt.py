"""A raw-loop character-level GPT (nanoGPT's loop, a model of our own writing).

Runs in: a harness training process. AdamW with a decay and a no-decay group, warm-up then
cosine decay computed per step (nanoGPT's ``get_lr``), gradients clipped at 1.0 through
``telemetry.clip_grad_norm_`` as the README says, ``(x, y)`` token batches, a holdout of fixed
validation sequences. Spikes are injected as LR bumps (temporary: the run recovers; or
permanent: it does not) and as corrupted batches (random tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from train_telemetry import Telemetry

from .common import Case, char_data, telemetry_config

BUGS = {
    "healthy": "AdamW 3e-3, warm-up 10 steps then cosine to 10% (seed 1: 1e-3, batch 8; seed 2: clipped at "
               "0.3, below every batch's gradient all run, as nanoGPT's own runs at 1.0 are)",
    "no_zero_grad": "optimizer.zero_grad() never called",
    "eval_mode": "model.eval() before training (dropout off)",
    "stale_optimizer": "lm_head re-created after the optimizer was built",
    "lr_tiny": "LR 1e-6",
    "lr_zero_early": "the cosine schedule's length set to 30% of the run, LR 0 after it",
    "warmup_unfinished": "warm-up set 10x longer than the run",
    "lr_bump": "LR x100 for 5 steps at 60% of the run (recovers)",
    "lr_jump": "LR x1000 from 60% of the run on (diverges)",
    "corrupt_batch": "two batches of random tokens at 60% of the run (recovers)",
}
BLOCK = 48


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, C/H]
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, width: int = 48, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(BLOCK, width)
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        logits = self.lm_head(self.norm(self.blocks(self.tok(idx) + self.pos(pos))))  # [B, T, V]
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def spike_step(steps: int) -> int:
    """Where a spike is injected: 60% into the run (after llm-foundry's 100-step window)."""
    return int(0.6 * steps)


def run(case: Case, out: Path, steps: int) -> None:
    bug, seed = case.bug, case.seed
    torch.manual_seed(seed)
    train_ids, val_ids, vocab = char_data()
    g = torch.Generator().manual_seed(seed)
    batch_size = 8 if seed == 1 else 16

    def get_batch(ids: torch.Tensor, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(ids) - BLOCK - 1, (rows,), generator=gen)
        x = torch.stack([ids[s : s + BLOCK] for s in starts.tolist()])
        y = torch.stack([ids[s + 1 : s + BLOCK + 1] for s in starts.tolist()])
        return x, y

    model = TinyGPT(vocab)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    base_lr = {"lr_tiny": 1e-6}.get(bug, 1e-3 if seed == 1 else 3e-3)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1, "name": "decay"},
         {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}],
        lr=base_lr, betas=(0.9, 0.95),
    )  # fmt: skip
    if bug == "stale_optimizer":
        model.lm_head = nn.Linear(model.lm_head.in_features, vocab, bias=False)
    warmup = 10 * steps if bug == "warmup_unfinished" else 10
    decay_steps = int(0.3 * steps) if bug == "lr_zero_early" else steps
    k = spike_step(steps)

    def get_lr(it: int) -> float:
        if it < warmup:
            lr = base_lr * (it + 1) / warmup
        elif bug == "lr_zero_early" and it >= decay_steps:
            lr = 0.0  # the schedule ran out: the loop clamps it at its end, 0
        else:
            ratio = min(1.0, (it - warmup) / max(1, decay_steps - warmup))
            lr = base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))
        if bug == "lr_bump" and k <= it < k + 5:
            lr *= 100
        if bug == "lr_jump" and it >= k:
            lr *= 1000
        return lr

    telemetry = Telemetry(telemetry_config(out, holdout_size=8))
    telemetry.set_holdout_data(get_batch(val_ids, 8, torch.Generator().manual_seed(999)))
    telemetry.start(model, opt)
    model.train(bug != "eval_mode")
    for it in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = get_lr(it)
        x, y = get_batch(train_ids, batch_size, g)
        if bug == "corrupt_batch" and it in (k, k + 1):
            x = torch.randint(vocab, x.shape, generator=g)
            y = torch.randint(vocab, y.shape, generator=g)
        logits, loss = model(x, y)
        assert loss is not None
        loss.backward()
        telemetry.clip_grad_norm_(model.parameters(), 0.3 if seed == 2 else 1.0)
        opt.step()
        telemetry.on_batch_end(model, opt, it, 0, None, (x, y), loss=loss, outputs=logits)
        if bug != "no_zero_grad":
            opt.zero_grad(set_to_none=True)
    telemetry.stop()
