# A flat DDP script for torchrun: init_process_group at the top level, no
# `if __name__ == "__main__":` guard. tests/e2e/test_flat_script.py runs it with 2 CPU ranks.
#
#   torchrun --nproc-per-node=2 flat_ddp.py OUTPUT_DIR
#
# A telemetry worker that ran this file again would call init_process_group as a third
# process with rank 0's environment: it must not run it at all.
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.config import Tuning

dist.init_process_group(backend="gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
rank = dist.get_rank()
print(f"flat ddp: starting rank {rank}", flush=True)

out_dir = sys.argv[1]
steps, every = 20, 2
torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)


class FlatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))  # [B, 6] -> [B, 3]


model = DistributedDataParallel(FlatNet())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
telemetry = Telemetry(TelemetryConfig(output_dir=out_dir, collect_every_n=every, holdout_size=8, on_full="block",
                                      mode="async", tuning=Tuning(worker_nice=0)))
telemetry.set_holdout_data([(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))])
telemetry.start(model, opt)  # only rank 0 starts a worker
for step in range(steps):
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    telemetry.on_batch_end(model, opt, step, 0, None, (x, y), loss=loss, outputs=logits)
summary = telemetry.stop()
print(f"summary rank {rank} " + json.dumps({"mode": summary.mode, "records_written": summary.records_written,
                                            "worker_pid": telemetry.worker_pid, "expected": steps // every}),
      flush=True)
# Ranks leave together: tearing gloo down while a peer still talks to it can abort.
dist.barrier()
dist.destroy_process_group()
