"""The demo's language model: a tiny character-level GPT (nanoGPT's shape) on text it builds offline.

Runs in: the training process of ``scripts/demo.py --task chargpt``. The corpus is the
docstrings of a few standard-library modules, so nothing is downloaded. The loop is
nanoGPT's: ``(x, y)`` token batches ``[B, T]``, AdamW with a decay and a no-decay group,
a cosine LR, gradients clipped at 1.0 (through ``Telemetry.clip_grad_norm_``, so the
records keep the pre-clip norms), a holdout of fixed validation sequences.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import math
import pathlib
import re
import textwrap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharGPT", "docstring_corpus", "train_chargpt"]

_MODULES = (collections, functools, itertools, json, pathlib, re, argparse, textwrap)


def docstring_corpus() -> str:
    """The docstrings of a few standard-library modules and their public members (~100 KB)."""
    parts: list[str] = []
    for module in _MODULES:
        parts.append(module.__doc__ or "")
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None) if not name.startswith("_") else None
            if isinstance(doc, str):
                parts.append(doc)
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """nanoGPT's forward: ``(logits, loss)``; without targets only the last position's logits."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([_Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # [B, 1, V]: generation needs only the last
        logits = self.lm_head(x)  # [B, T, V]
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_chargpt(telemetry: Any, steps: int = 300, batch_size: int = 16, block_size: int = 64,
                  seed: int = 0) -> dict[str, float]:
    """Train the character GPT with ``telemetry`` hooked in nanoGPT's way; return the final losses."""
    text = docstring_corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)

    def get_batch(source: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(source) - block_size - 1, (rows,), generator=g)
        x = torch.stack([source[i : i + block_size] for i in ix])
        y = torch.stack([source[i + 1 : i + 1 + block_size] for i in ix])  # the next character
        return x, y

    torch.manual_seed(seed)
    model = CharGPT(len(chars), block_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1, "name": "decay"},
                                   {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}],
                                  lr=3e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    x_val, y_val = get_batch(val_data, 32)
    telemetry.set_holdout_data((x_val, y_val))
    telemetry.start(model, optimizer)
    loss = torch.tensor(float("nan"))
    try:
        for step in range(1, steps + 1):
            x, y = get_batch(train_data, batch_size)
            logits, loss = model(x, y)
            assert loss is not None
            loss.backward()
            telemetry.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            telemetry.on_batch_end(model, optimizer, step, 0, None, (x, y), loss=loss, outputs=logits)
            optimizer.zero_grad(set_to_none=True)
    finally:
        telemetry.stop()
    model.eval()
    with torch.no_grad():
        _, val_loss = model(x_val, y_val)
    return {"steps": steps, "train_loss": loss.item(), "val_loss": float(val_loss) if val_loss is not None else math.nan}
