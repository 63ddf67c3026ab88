"""Offline analysis of telemetry runs: load, report, diagnose, plot, compare, export, watch.

Runs in: any process that reads a run directory, on any machine: finished, crashed or still
training.

The rule: reading a run needs no torch. Nothing under ``analysis/`` (nor ``cli.py``) may
import torch, or any module of this package that does; of ours only ``records`` and
``config`` are torch-free. Optional libraries (matplotlib, pandas, pyarrow, tensorboard)
are imported inside the functions that need them (see :mod:`.extras`).
``tests/unit/test_analysis_no_torch.py`` keeps this true by importing this package and
``train_telemetry.cli`` and running a report with torch made unimportable.

Records are read once, into typed records (``records.TypedRecord``, checked against the
schema by :mod:`.load`); nothing here re-checks a type the schema fixes.

Modules: :mod:`.load` (reading a run), :mod:`.rules` (the diagnoses, one file per family),
:mod:`.report` (summary + text), :mod:`.compare`, :mod:`.plots`, :mod:`.export`, :mod:`.watch`.
"""

from __future__ import annotations

from train_telemetry.analysis.compare import render_comparison
from train_telemetry.analysis.export import (
    export_tensorboard,
    holdout_dataframe,
    to_dataframe,
    write_table,
)
from train_telemetry.analysis.extras import MissingExtraError
from train_telemetry.analysis.load import Run, RunNotFoundError, load_run, load_runs
from train_telemetry.analysis.plots import PlotInfo, save_dashboard, save_overlay
from train_telemetry.analysis.report import render_report, report_data, report_json, summarize
from train_telemetry.analysis.rules import CODES, Diagnosis, Evidence, diagnose, is_serious
from train_telemetry.analysis.watch import watch

__all__ = [
    "CODES",
    "Diagnosis",
    "Evidence",
    "MissingExtraError",
    "PlotInfo",
    "Run",
    "RunNotFoundError",
    "diagnose",
    "export_tensorboard",
    "holdout_dataframe",
    "is_serious",
    "load_run",
    "load_runs",
    "render_comparison",
    "render_report",
    "report_data",
    "report_json",
    "save_dashboard",
    "save_overlay",
    "summarize",
    "to_dataframe",
    "watch",
    "write_table",
]
