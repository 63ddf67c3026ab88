"""Which runs the harness trains, and what the diagnosis must name in each.

Runs in: the harness's main process (the list) and its training processes (:func:`train`).
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
import traceback
from pathlib import Path

from .common import Case

# program -> (module, steps of a full run, steps of a --quick run)
PROGRAMS: dict[str, tuple[str, int, int]] = {
    "mlp": ("classifiers", 200, 120),
    "cnn": ("classifiers", 200, 120),
    "chargpt": ("chargpt", 240, 140),
    "hf_trainer": ("hf", 200, 100),
    "lightning": ("lit", 200, 120),
}

# bug -> the code that must be named; the codes the bug may bring along as its consequences
EXPECT: dict[str, tuple[str, frozenset[str]]] = {
    "no_zero_grad": ("gradients_not_zeroed", frozenset({"unstable_training", "non_convergence", "exploding_gradients", "loss_spike", "gradient_spike", "no_learning", "training_stalled"})),
    # Clipping rescales the never-zeroed sum in place: it is held at max_norm instead of growing.
    "no_zero_grad_clip": ("gradients_not_zeroed", frozenset({"unstable_training", "non_convergence", "exploding_gradients", "loss_spike", "gradient_spike", "no_learning", "training_stalled"})),
    "eval_mode": ("eval_mode_training", frozenset({"frozen_batchnorm_stats"})),
    "frozen_bn": ("frozen_batchnorm_stats", frozenset()),
    "dead_relu": ("dying_relu", frozenset({"loss_spike", "gradient_spike", "vanishing_gradients", "frozen_group", "no_learning", "prediction_collapse", "non_convergence", "params_not_updated", "training_stalled", "poor_initial_scale"})),
    "saturated_tanh": ("saturated_activations", frozenset({"vanishing_gradients", "no_learning", "unstable_training", "non_convergence", "poor_initial_scale", "loss_spike", "gradient_spike", "training_stalled"})),
    # Both are an LR 100x too high; what that does to these small programs (ReLUs killed, or
    # an easy problem converging anyway) varies, the oversized steps do not: lr_too_high.
    "unstable": ("lr_too_high", frozenset({"unstable_training", "non_convergence", "loss_spike", "gradient_spike", "exploding_gradients", "dying_relu", "no_learning", "prediction_collapse", "training_stalled"})),
    "adam_lr_high": ("lr_too_high", frozenset({"unstable_training", "non_convergence", "dying_relu", "loss_spike", "gradient_spike", "exploding_gradients"})),
    # Momentum 0.99 for 0.9: the loss swings ever wider (the demo's unstable preset); the steps
    # are 10x the intended ones, so lr_too_high may name them, dead ReLUs or a stalled holdout follow.
    "momentum_high": ("unstable_training", frozenset({"non_convergence", "lr_too_high", "loss_spike", "gradient_spike", "exploding_gradients", "dying_relu", "no_learning", "prediction_collapse", "training_stalled"})),
    # The LR raised 40x once the model has learned: the loss bounces far above where it got (the
    # demo's non_convergence preset); the steps are too large for lr_too_high, the swings unstable.
    "lr_raised": ("non_convergence", frozenset({"unstable_training", "lr_too_high", "loss_spike", "gradient_spike", "exploding_gradients", "dying_relu", "no_learning", "prediction_collapse", "training_stalled", "vanishing_gradients"})),
    "stale_optimizer": ("params_not_updated", frozenset({"gradients_not_zeroed", "frozen_group", "no_learning", "non_convergence", "prediction_collapse", "overfitting", "training_stalled"})),
    "softmax_ce": ("probabilities_as_logits", frozenset({"non_convergence", "no_learning", "training_stalled"})),
    "unnormalised": ("poor_initial_scale", frozenset({"unstable_training", "non_convergence", "dying_relu", "loss_spike", "gradient_spike", "exploding_gradients", "saturated_activations", "no_learning"})),
    "poor_init": ("poor_initial_scale", frozenset({"unstable_training", "non_convergence", "dying_relu", "loss_spike", "gradient_spike", "exploding_gradients", "saturated_activations", "no_learning"})),
    "lr_tiny": ("training_stalled", frozenset({"no_learning", "non_convergence"})),
    "lr_zero_early": ("lr_schedule_ends_early", frozenset({"training_stalled", "non_convergence", "no_learning", "frozen_group"})),
    "warmup_unfinished": ("lr_warmup_unfinished", frozenset({"training_stalled", "no_learning", "non_convergence"})),
    "lr_bump": ("loss_spike", frozenset({"gradient_spike", "unstable_training", "exploding_gradients", "lr_too_high"})),
    "lr_jump": ("loss_spike", frozenset({"gradient_spike", "unstable_training", "exploding_gradients", "non_convergence", "no_learning", "overfitting", "training_stalled", "dying_relu", "lr_too_high"})),
    "corrupt_batch": ("loss_spike", frozenset({"gradient_spike", "unstable_training", "exploding_gradients"})),
}
SPIKE_KIND = {"lr_bump": "recover", "lr_jump": "diverge", "corrupt_batch": "recover"}

# The seeds of each program's healthy runs (each seed a different configuration: see BUGS).
HEALTHY_SEEDS = {"mlp": (0, 1, 2), "cnn": (0, 1), "chargpt": (0, 1, 2), "hf_trainer": (0, 1), "lightning": (0, 1)}
QUICK = {"mlp": ("healthy", "softmax_ce"), "chargpt": ("healthy", "lr_bump")}


def bugs_of(program: str) -> list[str]:
    module = importlib.import_module(f"eval_diag.{PROGRAMS[program][0]}")
    return [b for b in module.BUGS if b != "healthy"]


def all_cases(quick: bool = False) -> list[Case]:
    cases: list[Case] = []
    for program in PROGRAMS:
        if quick and program not in QUICK:
            continue
        for seed in HEALTHY_SEEDS[program][: 1 if quick else None]:
            cases.append(Case(program, "healthy", seed))
        for bug in bugs_of(program):
            if quick and bug not in QUICK[program]:
                continue
            code, consequences = EXPECT[bug]
            spikes = ((_spike_step(program, quick), SPIKE_KIND[bug]),) if bug in SPIKE_KIND else ()
            # Spikes are events: two seeds each (each seed a different configuration).
            for seed in (0, 1) if spikes and not quick else (0,):
                cases.append(Case(program, bug, seed, code, consequences, spikes))
    return cases


def _spike_step(program: str, quick: bool) -> int:
    _, full, short = PROGRAMS[program]
    steps = short if quick else full
    return int(0.6 * steps)  # chargpt.spike_step / hf.spike_step


def train(case: Case, root: Path, quick: bool) -> dict[str, object]:
    """Train one case into ``root/<program>/<bug>[-s<seed>]``; what happened, as a dict."""
    import torch

    torch.set_num_threads(1)  # the harness runs cases side by side, one core each
    out = root / case.name
    # A run directory that holds records gets a resumed segment appended: start afresh.
    shutil.rmtree(out, ignore_errors=True)
    module_name, steps, quick_steps = PROGRAMS[case.program]
    module = importlib.import_module(f"eval_diag.{module_name}")
    began = time.perf_counter()
    error = None
    try:
        module.run(case, out, quick_steps if quick else steps)
    except Exception:  # a program that fails is reported, the others still run
        error = traceback.format_exc(limit=5)
    result = {"case": case.name, "seconds": time.perf_counter() - began, "error": error}
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps(result))
    return result
