"""The seed design's integration example, verbatim but for the import and the data.

The seed (training-telemetry-architecture.md, "Integration Example") never calls start()
or stop(): the first on_batch_end starts telemetry, and the interpreter's exit flushes.
Argument: the run folder (its 'telemetry' subfolder does not exist yet).
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from train_telemetry import TelemetryConfig, TrainingTelemetry
from train_telemetry.demo import SiameseNet


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.img1 = torch.randn(n, 1, 8, 8, generator=g)
        self.img2 = torch.randn(n, 1, 8, 8, generator=g)
        self.winner = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.winner)

    def __getitem__(self, i):
        return {"img1": self.img1[i], "img2": self.img2[i], "winner": self.winner[i]}


def compute_loss(outputs, labels):
    return torch.nn.functional.cross_entropy(outputs, labels)


output_dir = Path(sys.argv[1]) / "run_2026"  # not created: the seed's TelemetryConfig creates parents
device = torch.device("cpu")
torch.manual_seed(0)
model = SiameseNet(width=4, embed=8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
train_loader = DataLoader(PairDataset(256, 0), batch_size=8, shuffle=False)
val_loader = DataLoader(PairDataset(64, 1), batch_size=8)

# --- verbatim from the seed -------------------------------------------------------------
# Create config
telemetry_config = TelemetryConfig(
    enabled=True,
    collect_every_n=2,
    output_dir=output_dir / 'telemetry',
    track_gradients=True,
    track_weight_delta=True,
    track_learning_rates=True,
    track_holdout_logits=True,
    track_batch_stats=True,
    holdout_size=50
)

# Create telemetry
telemetry = TrainingTelemetry(telemetry_config)

# Setup holdout data (first 50 validation pairs)
holdout_data = []
for i, batch in enumerate(val_loader):
    holdout_data.append(batch)
    if i >= telemetry_config.holdout_size:
        break
telemetry.set_holdout_data(holdout_data)


def train_epoch(model, optimizer, loader, device, telemetry=None, epoch=0):
    for batch_idx, batch in enumerate(loader, 1):
        # Forward pass
        outputs = model(batch['img1'], batch['img2'])
        loss = compute_loss(outputs, batch['winner'])

        # Backward pass
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # TELEMETRY HOOK - Simple one-liner
        if telemetry:
            telemetry.on_batch_end(model, optimizer, batch_idx, epoch, device, batch)
# --- end of the seed's code --------------------------------------------------------------


for epoch in range(2):
    train_epoch(model, optimizer, train_loader, device, telemetry, epoch)
print("trained", flush=True)
