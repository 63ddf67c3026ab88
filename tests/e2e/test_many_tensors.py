"""Models with many small parameter tensors (snapshot.MANY_TENSORS and more): the hook's
batched path (one cat of the weights per dtype, stacked gradient norms) records exactly
what torch computes on the model, per parameter, group and layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.snapshot import MANY_TENSORS


class ManyTensors(nn.Module):
    """``count`` small Linear layers side by side (2 tensors each), float32, and a head (float64 by default)."""

    def __init__(self, count: int, head_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.cells = nn.ModuleList([nn.Linear(3, 2) for _ in range(count)])
        self.head = nn.Linear(2, 2).to(head_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.cells)  # each cell sees its own scaling of x: every gradient differs
        out = torch.stack([cell(x * (1 + i / n)) for i, cell in enumerate(self.cells)]).sum(0)  # [B, 2]
        return self.head(out.to(self.head.weight.dtype)).float()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_many_tensor_records_equal_torch_per_group_and_layer(tmp_path: Path, mode: str) -> None:
    """More than MANY_TENSORS parameter tensors of two dtypes, two named groups: gradient norms,
    weight norms and deltas (overall, per group, per layer) equal torch's, collection after collection."""
    torch.manual_seed(0)
    model = ManyTensors(MANY_TENSORS // 2 + 10)
    params = dict(model.named_parameters())
    assert len(params) > MANY_TENSORS
    cells = [p for n, p in params.items() if n.startswith("cells")]
    optimizer = torch.optim.SGD([{"params": cells, "lr": 0.1, "name": "cells"},
                                 {"params": model.head.parameters(), "lr": 0.5, "name": "head"}])
    config = TelemetryConfig(output_dir=str(tmp_path / "run"), collect_every_n=1, mode=mode, on_full="block",
                             track_holdout_logits=False)
    telemetry = Telemetry(config)
    telemetry.start(model, optimizer)
    before = {n: p.detach().clone() for n, p in params.items()}
    want = []
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        telemetry.on_batch_end(model, optimizer, step, batch=(x, y), loss=loss)
        now = {n: p.detach().clone() for n, p in params.items()}
        sq = {"gradient_norm": {n: p.grad.double().square().sum().item() for n, p in params.items()},
              "weight_norm": {n: w.double().square().sum().item() for n, w in now.items()},
              "weight_delta": {n: (now[n] - before[n]).double().square().sum().item() for n in params}}
        want.append(sq)
        before = now
        optimizer.zero_grad(set_to_none=True)
    telemetry.stop()
    records = read_records(tmp_path / "run")
    assert len(records) == 3
    for record, sq in zip(records, want, strict=True):
        assert "errors" not in record, record["errors"]
        for family, values in sq.items():
            by_group = {"overall": sum(values.values()),
                        "cells": sum(v for n, v in values.items() if n.startswith("cells")),
                        "head": sum(v for n, v in values.items() if n.startswith("head"))}
            for key, value in by_group.items():
                assert math.isclose(record[family][key], math.sqrt(value), rel_tol=1e-5), (family, key)
            layers = record["layers"][family]
            for layer in ("cells.0", f"cells.{len(model.cells) - 1}", "head"):
                value = sum(v for n, v in values.items() if n.rsplit(".", 1)[0] == layer)
                assert math.isclose(layers[layer], math.sqrt(value), rel_tol=1e-5, abs_tol=1e-9), (family, layer)


FSDP2_MANY = """
import math, sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[3])
from test_many_tensors import ManyTensors
from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.snapshot import MANY_TENSORS
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
model = ManyTensors(MANY_TENSORS // 2 + 10, torch.float32)  # FSDP2: one dtype
plain = ManyTensors(MANY_TENSORS // 2 + 10, torch.float32)
plain.load_state_dict(model.state_dict())
fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
t = Telemetry(TelemetryConfig(output_dir=sys.argv[2], mode="sync", collect_every_n=1, track_holdout_logits=False))
t.start(model, opt)
x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
torch.nn.functional.cross_entropy(model(x), y).backward()
torch.nn.functional.cross_entropy(plain(x), y).backward()
opt.step()
t.on_batch_end(model, opt, 0)
t.stop()
record = read_records(sys.argv[2])[0]
assert "errors" not in record, record["errors"]
names = [n for n, _ in plain.named_parameters()]
want = {n: p.grad.double().norm().item() for n, p in plain.named_parameters()}
got = record["layers"]["gradient_norm"]
for layer in ("cells.0", "cells.7", "head"):
    value = math.sqrt(sum(v * v for n, v in want.items() if n.rsplit(".", 1)[0] == layer))
    print("layer", layer, got[layer], value)
print("overall", record["gradient_norm"]["overall"], math.sqrt(sum(v * v for v in want.values())))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_many_tensors_under_fsdp2_record_each_layers_gradient_norm(tmp_path: Path) -> None:
    """FSDP2 (one rank: the sharded path, ShardSync's norms of the local shards by shape):
    each layer's gradient norm and the overall one equal torch's on the unsharded model."""
    import os
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", FSDP2_MANY, str(tmp_path / "store"), str(tmp_path / "run"), here],
                          capture_output=True, text=True, timeout=100, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith(("layer", "overall"))]
    assert len(lines) == 4, proc.stdout
    for words in lines:
        assert math.isclose(float(words[-2]), float(words[-1]), rel_tol=1e-5), words
