# A nanoGPT-style flat research script: no main guard, the model defined at top level, a
# holdout from its own get_batch('val'), clipping at 1.0 every step (as nanoGPT's train.py).
# Usage: nanogpt_flat.py OUT_DIR MODE   (MODE: async | auto | sync | off)
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from train_telemetry import Telemetry, TelemetryConfig

out_dir, mode = Path(sys.argv[1]), sys.argv[2]
print("loading data and building the model", flush=True)  # start-up: must be printed once

# data: characters of the standard library's docstrings (offline, deterministic)
text = "\n".join(filter(None, (json.__doc__, math.__doc__, F.__doc__, Path.__doc__, dict.__doc__, str.__doc__))) * 4
chars = sorted(set(text))
vocab_size = len(chars)
data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
n = int(0.9 * len(data))
train_data, val_data = data[:n], data[n:]
block_size, batch_size = 32, 8
gen = torch.Generator().manual_seed(1337)


def get_batch(split):
    d = train_data if split == "train" else val_data
    ix = torch.randint(len(d) - block_size, (batch_size,), generator=gen)
    x = torch.stack([d[i : i + block_size] for i in ix])
    y = torch.stack([d[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer=2, n_embd=32, n_head=4):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:  # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss


torch.manual_seed(1337)
model = GPT(vocab_size, block_size)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
grad_clip, max_iters, every = 1.0, 20, 5
X_val, Y_val = get_batch("val")  # the holdout: fixed examples from the validation split

telemetry = None
if mode != "off":
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out_dir), collect_every_n=every, mode=mode,
                                          on_full="block", holdout_size=batch_size))
    telemetry.set_holdout_data((X_val, Y_val))
    telemetry.start(model, optimizer)

check = {}
X, Y = get_batch("train")
for iter_num in range(1, max_iters + 1):
    batch = (X, Y)
    logits, loss = model(X, Y)
    X, Y = get_batch("train")  # nanoGPT fetches the next batch while the GPU works
    loss.backward()
    if telemetry is not None:
        norm = telemetry.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if telemetry is not None:
        telemetry.on_batch_end(model, optimizer, iter_num, 0, None, batch, loss=loss, outputs=logits)
    optimizer.zero_grad(set_to_none=True)
    print(f"iter {iter_num}: loss {loss.item():.6f}", flush=True)
    if iter_num % every == 0:  # an independent holdout eval at the weights the hook saw
        model.eval()
        with torch.no_grad():
            h_logits, _ = model(X_val, Y_val)
        model.train()
        flat = h_logits.reshape(-1, vocab_size)
        per_seq = F.cross_entropy(flat, Y_val.reshape(-1), reduction="none").view(batch_size, -1).mean(1)
        check[iter_num] = {"pre_clip_norm": norm.item(), "loss": F.cross_entropy(flat, Y_val.reshape(-1)).item(),
                           "accuracy": (h_logits.argmax(-1) == Y_val).float().mean().item(),
                           "example_loss": per_seq.tolist()}

if telemetry is not None:
    telemetry.stop()
(out_dir / f"check_{mode}.json").parent.mkdir(parents=True, exist_ok=True)
(out_dir / f"check_{mode}.json").write_text(json.dumps(check))
