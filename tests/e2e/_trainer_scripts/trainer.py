"""A tiny training run with telemetry on, for tests that signal or kill the trainer process.

Usage: ``python trainer.py OUTPUT_DIR SCENARIO``. It prints ``worker_pid <pid>`` once the
collector runs, then trains. Scenarios (none of them calls ``stop()``):

* ``loop``: train until killed or interrupted (Ctrl-C arrives as KeyboardInterrupt);
* ``normal``: train ``STEPS`` steps, print ``done``, fall off the end of the script;
* ``raise``: train ``STEPS`` steps, print ``done``, raise an uncaught ValueError;
* ``kill_worker``: like ``normal``, but SIGKILL the telemetry worker at step 10.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.demo import SiameseNet

STEPS = 40
EVERY = 2


def batch(g: torch.Generator, n: int = 8) -> dict[str, torch.Tensor]:
    return {
        "img1": torch.randn(n, 1, 8, 8, generator=g),
        "img2": torch.randn(n, 1, 8, 8, generator=g),
        "winner": torch.randint(0, 2, (n,), generator=g),
    }


def main(output_dir: str, scenario: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SiameseNet(width=4, embed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # on_full: block, so that every collection is taken and the tests can count them all;
    # worker_nice: 0, so that a worker starved by other jobs on a loaded CI machine still
    # drains within the at-exit deadline (10 s).
    telemetry = Telemetry(TelemetryConfig(output_dir=output_dir, collect_every_n=EVERY,
                                          on_full="block", stop_timeout_s=20.0, worker_nice=0))
    telemetry.set_holdout_data(batch(g, 16))
    telemetry.start(model, opt)
    print(f"worker_pid {telemetry.worker_pid}", flush=True)
    step = 0
    while scenario == "loop" or step < STEPS:
        data = batch(g)
        loss = torch.nn.functional.cross_entropy(model(data["img1"], data["img2"]), data["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, data, loss=loss)
        step += 1
        if scenario == "kill_worker" and step == 10:
            os.kill(telemetry.worker_pid, signal.SIGKILL)
        if scenario == "loop":
            time.sleep(0.01)
    print("done", flush=True)
    if scenario == "raise":
        raise ValueError("the training script failed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
