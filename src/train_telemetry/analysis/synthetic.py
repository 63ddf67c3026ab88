"""Moved to :mod:`train_telemetry.testing`; this re-export keeps old imports working.

Runs in: tests (no torch). Kept only until ``tests/unit/test_analysis_diagnose.py``
(helper D's) imports ``train_telemetry.testing``; new code imports that module.
"""

from __future__ import annotations

from train_telemetry.testing import (
    GROUPS,
    LABEL_KEY,
    PATHOLOGIES,
    make_meta,
    make_records,
    make_summary,
    write_pathology,
    write_run,
)

__all__ = [
    "GROUPS",
    "LABEL_KEY",
    "PATHOLOGIES",
    "make_meta",
    "make_records",
    "make_summary",
    "write_pathology",
    "write_run",
]
