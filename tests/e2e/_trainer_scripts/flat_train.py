# A flat research script, nanoGPT's train.py style: no functions of its own to call, no
# `if __name__ == "__main__":` guard; everything runs at the top level, model class,
# forward_fn and a metric of its own included. tests/e2e/test_flat_script.py runs it.
#
#   python flat_train.py OUTPUT_DIR MODE [START_METHOD] [TORCH_THREADS]
#
# If the telemetry worker ran this file again (as multiprocessing does with a spawned
# child's __main__), the start-up line would be printed twice and start() would fail.
import json
import sys

import torch
from torch import nn

from train_telemetry import Metric, SnapshotData, Telemetry, TelemetryConfig
from train_telemetry.config import Tuning

print("flat script: starting", flush=True)

out_dir, mode = sys.argv[1], sys.argv[2]
start_method = sys.argv[3] if len(sys.argv) > 3 else "spawn"
if len(sys.argv) > 4:
    torch.set_num_threads(int(sys.argv[4]))  # 1 thread on 2 cores: mode auto keeps the worker
steps, every = 30, 2
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)


class FlatNet(nn.Module):
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


model = FlatNet()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
# on_full: block, so that every collection is written and the test can count them.
config = TelemetryConfig(output_dir=out_dir, collect_every_n=every, holdout_size=8, on_full="block",
                         mode=mode, tuning=Tuning(start_method=start_method, worker_nice=0))
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
