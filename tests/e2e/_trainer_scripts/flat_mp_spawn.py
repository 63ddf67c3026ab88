# The PyTorch DDP tutorial's shape: the model class, forward_fn and a metric at the top level
# of a launcher script that starts its trainer with torch.multiprocessing.spawn (the launcher
# needs its main guard; everything else is flat). tests/e2e/test_flat_script.py runs it.
#
#   python flat_mp_spawn.py OUTPUT_DIR
#
# The spawned trainer runs this file again as __mp_main__ (multiprocessing's doing, not
# ours), so its classes live in __mp_main__: the telemetry worker, started from the trainer,
# has no such module and must get them by value.
import json
import sys

import torch
import torch.multiprocessing as mp
from torch import nn

from train_telemetry import Metric, SnapshotData, Telemetry, TelemetryConfig
from train_telemetry.config import Tuning

print("flat script: starting", flush=True)  # in the launcher, then in the trainer: twice


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))  # [B, 6] -> [B, 3]


def forward_fn(model, batch):
    return model(batch[0])


class AbsWeightSum(Metric):
    key = "abs_weight_sum"
    needs = frozenset({"weights"})

    def compute(self, snap: SnapshotData):
        assert snap.params is not None
        return {"total": float(sum(p.abs().sum() for p in snap.params))}


def train(rank, out_dir):
    steps, every = 30, 2
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = TelemetryConfig(output_dir=out_dir, collect_every_n=every, holdout_size=8, on_full="block",
                             mode="async", tuning=Tuning(worker_nice=0))
    telemetry = Telemetry(config, forward_fn=forward_fn, metrics=[AbsWeightSum()])
    telemetry.set_holdout_data([(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))])
    telemetry.start(model, opt)
    for step in range(steps):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss, outputs=logits)
    summary = telemetry.stop()
    print("summary " + json.dumps({"mode": summary.mode, "records_written": summary.records_written,
                                   "clean": summary.clean, "expected": steps // every}), flush=True)


if __name__ == "__main__":
    mp.spawn(train, args=(sys.argv[1],), nprocs=1)
