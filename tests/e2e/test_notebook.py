"""A notebook trains with telemetry: its cell-defined model class and lambda reach the spawned worker.

A real Jupyter kernel (nbclient + ipykernel) runs on this interpreter; in a notebook
``__main__`` has no file, so the spawned worker cannot import the notebook's classes by
name: they must be sent by value (sending.py). The records are checked against numbers
the notebook computes itself at the last step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from train_telemetry import read_records

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6

CELLS = [
    # 1: set-up; RUN_DIR is filled in by the test
    """
import copy, json
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_telemetry import Telemetry, TelemetryConfig

torch.set_num_threads(1)
torch.manual_seed(0)
RUN_DIR = {run_dir!r}
STEPS = {steps}
""",
    # 2: the model class and forward_fn, defined in the notebook (not importable by the worker)
    """
class NotebookNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

forward_fn = lambda model, batch: model(batch[0])
""",
    # 3: (x, y) tuple batches from a DataLoader, a holdout of the same shape
    """
g = torch.Generator().manual_seed(1)
x, y = torch.randn(12 * STEPS, 6, generator=g), torch.randint(0, 3, (12 * STEPS,), generator=g)
train = list(DataLoader(TensorDataset(x, y), batch_size=12))
holdout = list(DataLoader(TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=8))
model = NotebookNet()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
""",
    # 4: train with telemetry (default start method: spawn), noting what the hook should see
    """
config = TelemetryConfig(output_dir=RUN_DIR, collect_every_n=1, holdout_size=12, on_full="block")
telemetry = Telemetry(config, forward_fn=forward_fn)
telemetry.set_holdout_data(holdout)
telemetry.start(model, opt)
expected = {}
for step, batch in enumerate(train, 1):
    out = model(batch[0])
    loss = nn.functional.cross_entropy(out, batch[1])
    opt.zero_grad()
    loss.backward()
    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    opt.step()
    telemetry.on_batch_end(model, opt, step, 0, None, batch, loss=loss, outputs=out)
    with torch.no_grad():  # the weights the hook copied: the holdout as the worker should see it
        twin = copy.deepcopy(model).eval()
        hx = torch.cat([b[0] for b in holdout])[:12]
        hy = torch.cat([b[1] for b in holdout])[:12]
        expected[step] = {"gradient_norm": grad_norm, "logits": twin(hx).tolist(), "labels": hy.tolist()}
summary = telemetry.stop()
with open(RUN_DIR + "/expected.json", "w") as f:
    json.dump({"expected": expected, "clean": summary.clean}, f)
""",
]


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel on this test's own interpreter (not whatever `python3` a stock kernelspec finds)."""
    spec_dir = tmp_path / "kernels" / "train-telemetry-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "train-telemetry test",
        "language": "python",
        # the checkout's src first: the kernel and its spawned worker import this tree
        "env": {"PYTHONPATH": str(ROOT / "src")},
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="train-telemetry-test", kernel_spec_manager=specs)


@pytest.mark.timeout(180)
def test_notebook_model_class_and_lambda_forward_fn_give_exact_records(tmp_path: Path) -> None:
    """A notebook's own class and lambda train under spawn; the last record matches its own numbers."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(CELLS[0].format(run_dir=str(run_dir), steps=STEPS))]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in CELLS[1:]]
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=150,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell's traceback if a cell fails

    done = json.loads((run_dir / "expected.json").read_text())
    assert done["clean"] is True
    records = read_records(run_dir)
    assert [r["batch_idx"] for r in records] == list(range(1, STEPS + 1))
    last, want = records[-1], done["expected"][str(STEPS)]
    assert math.isclose(last["gradient_norm"]["overall"], want["gradient_norm"], rel_tol=1e-5)
    holdout = last["holdout_logits"]
    assert holdout["labels"] == want["labels"]
    assert len(holdout["logits"]) == 12
    for got_row, want_row in zip(holdout["logits"], want["logits"], strict=True):
        for got, expected in zip(got_row, want_row, strict=True):
            assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)
