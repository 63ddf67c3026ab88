"""The diagnoses on real training: each demo preset's report names its problem and nothing unrelated.

Each test trains the demo (scripts/demo.py: 96 steps of its 128-step epoch, a collection every 8)
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
        {"nonfinite", "no_learning", "prediction_collapse", "vanishing_gradients", "dying_relu"},
    ),
}


def train_demo(preset: str, out: Path, *extra: str) -> None:
    pytest.importorskip("sklearn")
    subprocess.run(
        [sys.executable, str(DEMO), "--preset", preset, "--max-steps", "96", "--collect-every-n", "8",
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
    assert image.shape[:2] == (1900, 1400)
    rgb = image[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    top = 1900 * 4 // 100
    cells = [
        coloured[
            top + (1900 - top) * r // 5 : top + (1900 - top) * (r + 1) // 5, 700 * c : 700 * (c + 1)
        ].sum()
        for r in range(5)
        for c in range(2)
    ]
    assert all(n > 800 for n in cells[:-1]), cells  # the last cell is the diagnoses text


@pytest.mark.timeout(180)
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_report_names_its_problem(tmp_path: Path, preset: str) -> None:
    """The report of each pathological preset exits 1 and names that problem, with no unrelated serious one."""
    run_dir = tmp_path / preset
    train_demo(preset, run_dir)
    status, data, text = report(run_dir)
    names, consequences = EXPECTED[preset]
    serious = {d["code"] for d in data["diagnoses"] if d["severity"] == "serious"}
    assert status == 1, text
    assert names & serious, text
    assert not serious - names - consequences, text
    first = next(d for d in data["diagnoses"] if d["code"] in names)
    assert first["evidence"] and first["hint"], first
    assert all(f"SERIOUS  {code}:" in text for code in names & serious), text


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
