"""The diagnoses on real training: each demo preset's report names its problem and nothing unrelated.

Each test trains the demo (scripts/demo.py: 96 steps of its 128-step epoch, a collection every 8;
the non_convergence preset needs 256 steps: its LR jumps at 2/3 of a run that has learned first)
in a subprocess, then reads the run with the ``train-telemetry`` command as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
# Works from a source checkout as well as from an installed package.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEMO.exists(), reason="scripts/demo.py is not there"),
]

# preset -> (codes any of which names the problem, serious codes it may cause as well).
# The allowed extras are consequences: a frozen backbone, single-class batches, shuffled
# labels or a far too high LR all leave the holdout at chance, often predicting one class.
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "frozen_backbone": ({"frozen_group"}, {"no_learning", "prediction_collapse"}),
    "head_lr_100x": ({"lr_ratio_mismatch"}, set()),
    "single_class_batches": (
        {"single_class_batches"},
        {"no_learning", "prediction_collapse", "data_imbalance"},
    ),
    "shuffled_labels": ({"no_learning", "overfitting"}, {"prediction_collapse"}),
    "exploding_lr": (
        {"exploding_gradients"},
        {"nonfinite", "no_learning", "prediction_collapse", "vanishing_gradients", "dying_relu", "lr_too_high"},
    ),
    # The silent bugs. Gradients summed over steps swamp the model, a cut embedding or an
    # optimiser swinging ever wider leaves the holdout at chance: those are consequences too.
    "no_zero_grad": ({"gradients_not_zeroed"}, {"no_learning", "prediction_collapse"}),
    "dead_relu": ({"dying_relu"}, {"no_learning", "prediction_collapse", "vanishing_gradients"}),
    "saturated_tanh": ({"saturated_activations"}, {"no_learning", "vanishing_gradients"}),
    "eval_mode": ({"eval_mode_training"}, {"no_learning"}),
    "frozen_bn": ({"frozen_batchnorm_stats"}, set()),  # a warning: frozen BN can be intended
    # Both are an LR too high for the head: its oversized steps (lr_too_high) are the cause.
    "unstable": ({"unstable_training"}, {"no_learning", "prediction_collapse", "lr_too_high"}),
    "non_convergence": ({"non_convergence"}, {"unstable_training", "lr_too_high"}),
}
# Presets that need a longer run than the default 96 steps to show their problem.
STEPS = {"non_convergence": "256"}


def train_demo(preset: str, out: Path, *extra: str) -> None:
    pytest.importorskip("sklearn")
    steps = STEPS.get(preset, "96")
    subprocess.run(
        [sys.executable, str(DEMO), "--task", "pairs", "--preset", preset, "--epochs", "2", "--max-steps", steps, "--collect-every-n", "8",
         "--output-dir", str(out), "--no-report", "--on-full", "block", *extra],
        check=True, capture_output=True, timeout=150, env=ENV,
    )  # fmt: skip


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "train_telemetry.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


def report(run_dir: Path) -> tuple[int, dict[str, Any], str]:
    """(exit status, --json data, text report) of a run, through the command line."""
    as_json = cli("report", str(run_dir), "--json")
    text = cli("report", str(run_dir))
    assert as_json.returncode in (0, 1), as_json.stderr
    return as_json.returncode, json.loads(as_json.stdout), text.stdout


@pytest.mark.timeout(180)
def test_healthy_run_gets_no_serious_diagnosis_and_a_full_dashboard(tmp_path: Path) -> None:
    """The healthy preset exits 0 with no serious diagnosis, and its dashboard has data in every panel."""
    run_dir = tmp_path / "healthy"
    train_demo("healthy", run_dir)
    status, data, text = report(run_dir)
    serious = [d["title"] for d in data["diagnoses"] if d["severity"] == "serious"]
    assert status == 0 and not serious, text
    holdout = data["summary"]["holdout"]
    assert holdout["accuracy"]["last"] > holdout["chance"] + 0.2, text  # it did learn
    assert "LR relative to 'backbone': head 10x (expected 10x)" in text

    mpimg = pytest.importorskip("matplotlib.image")
    image_path = tmp_path / "dash.png"
    plotted = cli("plot", str(run_dir), "-o", str(image_path))
    assert plotted.returncode == 0, plotted.stderr
    assert "panels without data" not in plotted.stdout
    image = mpimg.imread(image_path)
    # 5 rows of the fixed panels in 1900 px, then 380 px per row of two panels for the other
    # metrics (layers, activations, model_mode), as many rows as the run's metrics need.
    height, width = image.shape[:2]
    extra_rows, rest = divmod(height - 1900, 380)
    assert width == 1400 and extra_rows >= 1 and rest == 0, image.shape
    assert f"(1400x{height} px)" in plotted.stdout, plotted.stdout
    rows = 5 + extra_rows
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    top = 1900 * 4 // 100  # the title's band: a fixed height, whatever the rows below
    cells = [
        coloured[
            top + (height - top) * r // rows : top + (height - top) * (r + 1) // rows,
            700 * c : 700 * (c + 1),
        ].sum()
        for r in range(rows)
        for c in range(2)
    ]
    assert all(n > 800 for n in cells[:9]), cells  # cell 10 is the diagnoses text
    assert all(n > 800 for n in cells[10:-1]), cells  # the very last one may be left blank


@pytest.mark.timeout(180)
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_report_names_its_problem(tmp_path: Path, preset: str) -> None:
    """The report of each pathological preset names that problem, with no unrelated serious one."""
    run_dir = tmp_path / preset
    train_demo(preset, run_dir)
    status, data, text = report(run_dir)
    names, consequences = EXPECTED[preset]
    found = {d["code"]: d["severity"] for d in data["diagnoses"]}
    serious = {code for code, severity in found.items() if severity == "serious"}
    assert names & set(found), text
    assert not serious - names - consequences, text
    assert status == (1 if serious else 0), text
    first = next(d for d in data["diagnoses"] if d["code"] in names)
    assert first["evidence"] and first["hint"], first
    assert all(f"{found[code].upper()}  {code}:" in text for code in names & set(found)), text


@pytest.mark.timeout(180)
def test_watch_follows_a_live_run_to_its_end(tmp_path: Path) -> None:
    """watch started next to a training run prints its records as they come and the frozen backbone, then ends."""
    pytest.importorskip("sklearn")
    run_dir = tmp_path / "live"
    trainer = subprocess.Popen(
        [sys.executable, str(DEMO), "--preset", "frozen_backbone", "--epochs", "2", "--max-steps", "160", "--collect-every-n", "8",
         "--output-dir", str(run_dir), "--no-report", "--on-full", "block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    try:
        watched = cli(
            "watch", str(run_dir), "--interval", "0.2", "--max-seconds", "150", timeout=170
        )
    finally:
        _, err = trainer.communicate(timeout=150)
    assert trainer.returncode == 0, err
    out = watched.stdout
    assert "run finished:" in out, out
    assert out.count("frozen_group") == 1, out
    assert watched.returncode == 1
    record_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(record_lines) >= 5, out
    # Steps count on across the two epochs although the demo's batch_idx restarts each epoch.
    assert "(epoch 1, batch" in out, out
