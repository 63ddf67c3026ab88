"""train-telemetry: see inside a PyTorch training run at almost no cost, then learn what is wrong.

The public API. The training-side classes import torch, so they load lazily (PEP 562):
``import train_telemetry.analysis`` or the ``train-telemetry`` command read runs where
torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TelemetryConfig, TelemetryConfigError
from .records import read_records

__all__ = [
    "Telemetry",
    "TrainingTelemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TelemetryStartError",
    "TelemetrySummary",
    "Metric",
    "SnapshotData",
    "RunInfo",
    "metric",
    "read_records",
    "__version__",
]

__version__ = "0.1.0"

_LAZY = {"Telemetry", "TrainingTelemetry", "TelemetryStartError", "TelemetrySummary"}
_LAZY_METRICS = {"Metric", "SnapshotData", "RunInfo", "metric"}

if TYPE_CHECKING:
    from .metrics import Metric, RunInfo, SnapshotData, metric
    from .telemetry import Telemetry, TelemetryStartError, TelemetrySummary, TrainingTelemetry


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import telemetry

        return getattr(telemetry, name)
    if name in _LAZY_METRICS:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'train_telemetry' has no attribute {name!r}")
