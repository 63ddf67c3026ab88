"""A tiny training run with telemetry on, for tests that signal or kill the trainer process.

Usage: ``python trainer.py OUTPUT_DIR SCENARIO``. It prints ``worker_pid <pid>`` once the
collector runs, then trains. Scenarios (none of them calls ``stop()``):

* ``loop``: train until killed or interrupted (Ctrl-C arrives as KeyboardInterrupt);
* ``normal``: train ``STEPS`` steps, print ``done``, fall off the end of the script;
* ``raise``: train ``STEPS`` steps, print ``done``, raise an uncaught ValueError;
* ``kill_worker``: like ``normal``, but SIGKILL the telemetry worker at step 10, with
  ``tuning.max_worker_restarts: 0`` (the run goes on without telemetry);
* ``kill_worker_restart``: the same with the default restarts (a new worker replays);
* ``loop_handler``: ``loop`` with the script's own SIGTERM handler (installed before
  ``start()``), which writes ``handler_ran`` in OUTPUT_DIR and exits with status 3.

After each collection step's hook it prints ``collected <step>``.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import torch

from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.config import Tuning
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
    # A test whose trainer does not exit sends SIGUSR1 first: every thread's stack goes to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # "<scenario>+inline": the records built on the training thread (mode sync, what the
    # default auto chooses on a CPU trainer whose threads take every core); else the worker.
    scenario, _, variant = scenario.partition("+")
    mode = "sync" if variant == "inline" else "async"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SiameseNet(width=4, embed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # on_full: block, so that every collection is taken and the tests can count them all;
    # worker_nice: 0, so that a worker starved by other jobs on a loaded CI machine still
    # drains within the at-exit deadline (10 s).
    if scenario == "loop_handler":
        def on_sigterm(signum: int, frame: object) -> None:
            with open(os.path.join(output_dir, "handler_ran"), "w") as f:
                f.write("yes\n")
            sys.exit(3)

        signal.signal(signal.SIGTERM, on_sigterm)
    restarts = 0 if scenario == "kill_worker" else 3
    telemetry = Telemetry(TelemetryConfig(output_dir=output_dir, collect_every_n=EVERY, on_full="block",
                                          stop_timeout_s=20.0, mode=mode,
                                          tuning=Tuning(max_worker_restarts=restarts, worker_nice=0)))
    telemetry.set_holdout_data(batch(g, 16))
    telemetry.start(model, opt)
    print(f"worker_pid {telemetry.worker_pid}", flush=True)
    step = 0
    while scenario.startswith("loop") or step < STEPS:
        data = batch(g)
        loss = torch.nn.functional.cross_entropy(model(data["img1"], data["img2"]), data["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, step, 0, None, data, loss=loss)
        if step % EVERY == 0:
            print(f"collected {step}", flush=True)
        step += 1
        if scenario.startswith("kill_worker") and step == 10:
            os.kill(telemetry.worker_pid, signal.SIGKILL)
        if scenario.startswith("loop"):
            time.sleep(0.01)
    print("done", flush=True)
    if scenario == "raise":
        raise ValueError("the training script failed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
