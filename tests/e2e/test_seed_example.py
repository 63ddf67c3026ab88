"""The seed's own integration example, verbatim: no start(), no stop(), a run folder not yet created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_telemetry import read_records

SCRIPT = Path(__file__).parent / "_trainer_scripts" / "seed_example.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_seed_integration_example_verbatim_records_the_run(tmp_path: Path) -> None:
    """The first on_batch_end starts telemetry with its model and optimizer (one warning), the exit flushes,
    and the records hold every family the seed's config asked for, at collect_every_n steps."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trained") == 1
    assert proc.stderr.count("on_batch_end() before start(): telemetry starts now") == 1, proc.stderr
    run = tmp_path / "run_2026" / "telemetry"
    records = read_records(run)
    summary = json.loads((run / "summary.json").read_text())
    # 2 epochs x 32 batches, every 2nd: 32 due; those due while it started are counted as dropped
    assert summary["snapshots_taken"] + summary["snapshots_dropped"] == 32
    # on_full: drop (the seed's default): on a loaded machine the worker may fall behind and
    # collections are dropped (counted above); what was taken is all written
    assert summary["records_written"] == summary["snapshots_taken"] == len(records) >= 1
    assert all(r["batch_idx"] % 2 == 0 for r in records)
    last = records[-1]
    for family in ("gradient_norm", "weight_delta", "learning_rates", "holdout_logits", "batch_stats"):
        assert family in last, family
    assert len(last["holdout_logits"]["labels"]) == 50  # holdout_size rows, not batches
    assert set(last["batch_stats"]) >= {"winner_0_pct", "winner_1_pct", "batch_size"}
