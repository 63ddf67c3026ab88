"""The rule of analysis/ and cli.py: reading a run needs no torch (and no plotting or pandas)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from train_telemetry.testing import write_pathology

SRC = Path(__file__).resolve().parents[2] / "src"


def test_report_runs_with_torch_unimportable(tmp_path: Path) -> None:
    """With torch made unimportable, the analysis package, testing and the CLI import and report a run."""
    run_dir = write_pathology(tmp_path / "run", "frozen_backbone", n=5, layers=True)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import train_telemetry.analysis
        import train_telemetry.testing
        from train_telemetry.cli import main
        status = main(["report", {str(run_dir)!r}])
        heavy = sorted(m for m in ("torch", "matplotlib", "pandas", "tensorboard") if sys.modules.get(m) is not None)
        print("HEAVY", heavy)
        sys.exit(status)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1, result.stderr  # the frozen backbone is serious: the report ran
    assert "SERIOUS  frozen_group" in result.stdout
    assert "per layer at step 80" in result.stdout
    assert "HEAVY []" in result.stdout
