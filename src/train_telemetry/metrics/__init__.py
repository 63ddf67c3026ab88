"""Metrics: the public metric API (api.py) and the built-in metrics, one file per family.

Runs in: the worker process (or the training process in sync mode); ``needs`` is read in
the training process at ``start()``.

The seed's five families are on or off by their ``track_*`` keys; the others are named in
the config's ``track_<name>`` keys (``config.BUILTIN_METRICS``); the user's own come from
``Telemetry(config, metrics=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import BUILTIN_METRICS, TelemetryConfig
from .activations import Activations
from .api import (
    NEEDS,
    Metric,
    MetricResult,
    RunInfo,
    SnapshotData,
    WeightDeltas,
    all_needs,
    check_metrics,
    metric,
)
from .batch import BatchStats, TrainStats
from .gradients import GradientClipping, GradientNorm, GradientNormPreClip
from .holdout import HoldoutLogits
from .layers import Layers
from .learning_rates import LearningRates
from .mode import ModelMode
from .replicas import Replicas
from .weights import UpdateRatio, WeightDelta, WeightNorm

__all__ = ["NEEDS", "Metric", "MetricResult", "RunInfo", "SnapshotData", "WeightDeltas", "all_needs",
           "check_metrics", "metric", "resolve_metrics"]

_NAMED: dict[str, Callable[[], Metric]] = {"layers": Layers, "activations": Activations, "model_mode": ModelMode}
assert tuple(_NAMED) == BUILTIN_METRICS, "config.BUILTIN_METRICS and metrics._NAMED must list the same names"


def resolve_metrics(config: TelemetryConfig, user: Sequence[Metric] = ()) -> list[Metric]:
    """The metrics a run computes, in record order: the seed's, the other built-ins (each by its track_*), the user's."""
    out: list[Metric] = []
    if config.track_gradients:
        out += [GradientNorm(), GradientNormPreClip(), GradientClipping()]
    if config.track_weight_delta:
        out += [WeightNorm(), WeightDelta(), UpdateRatio()]
    if config.track_holdout_logits:
        out.append(HoldoutLogits())
    if config.track_learning_rates:
        out.append(LearningRates())
    if config.track_batch_stats:
        out.append(BatchStats())
    out.append(TrainStats())  # only when the hook got loss / outputs
    out.append(Replicas())  # only when the ranks' collective carried the replica check
    # activations observe the holdout forward: without holdout_logits there is none to observe.
    out += [make() for name, make in _NAMED.items()
            if getattr(config, f"track_{name}") and (name != "activations" or config.track_holdout_logits)]
    check_metrics(out, ())
    check_metrics(list(user), [m.key for m in out])
    return out + list(user)
