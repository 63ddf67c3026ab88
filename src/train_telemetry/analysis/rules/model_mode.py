"""The model's mode at the hook (the ``model_mode`` record key): ``eval_mode_training``,
``frozen_batchnorm_stats``.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

import math

from msgspec import UNSET

from train_telemetry.analysis.load import Run, as_float, format_number
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# model.training == 0 at the hook in this many records (and half of them, and the last one)
# is a loop that trains in eval mode; one record can be a loop that evaluated just before.
# BatchNorm statistics must stay still in as many train-mode records to count as frozen.
MIN_MODE_RECORDS = 2
# batchnorm_stat_change is relative (||running - previous|| / ||previous||): with the default
# momentum 0.1 healthy BN layers move their stats by 1e-3..1e-1 per collection; float32
# rounding alone is ~1e-7. At most 1e-6 in every record (at least 2) is frozen.
FROZEN_BN_CHANGE = 1e-6


def _mode_series(run: Run) -> list[tuple[int, dict[str, int | float | None]]]:
    return [
        (run.step(i), record.model_mode)
        for i, record in enumerate(run.records)
        if record.model_mode is not UNSET
    ]


class EvalModeTraining(Rule):
    code = "eval_mode_training"
    severity = "serious"
    summary = (
        "training steps run with `model.training` False (dropout and BatchNorm updates off; "
        "serious with BatchNorm)"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        modes = _mode_series(run)
        evals = [(s, m) for s, m in modes if m.get("training") == 0]
        if not (
            len(evals) >= MIN_MODE_RECORDS
            and len(evals) * 2 >= len(modes)
            and evals[-1][0] == modes[-1][0]
        ):
            return []
        bn = max(int(m.get("batchnorm_layers") or 0) for _, m in modes)
        since = modes[-1][0]
        for s, m in reversed(modes):
            if m.get("training") != 0:
                break
            since = s
        return [
            self.diagnosis(
                # Without BatchNorm only dropout is off: the model still trains, a warning.
                severity="serious" if bn else "warning",
                title=f"the model is in eval mode (model.training False) at {len(evals)} of "
                f"{len(modes)} collections, since step {since}"
                + (
                    f": its {bn} BatchNorm layers normalise with stale running statistics and never update them"
                    if bn
                    else ": dropout is off"
                ),
                evidence=[
                    Evidence(
                        s,
                        {
                            "training": m.get("training"),
                            "batchnorm_layers": m.get("batchnorm_layers"),
                        },
                    )
                    for s, m in pick(evals)
                ],
                hint="call model.train() before the training steps (and again after each "
                "evaluation that called model.eval())",
            )
        ]


class FrozenBatchnormStats(Rule):
    code = "frozen_batchnorm_stats"
    severity = "warning"
    summary = (
        "BatchNorm running statistics never change in train mode (momentum 0, or BN modules "
        "left in eval mode)"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        changes = [
            (s, v)
            for s, m in _mode_series(run)
            if m.get("training") == 1
            and (m.get("batchnorm_layers") or 0) > 0
            and (v := as_float(m.get("batchnorm_stat_change"))) is not None
            and math.isfinite(v)
        ]
        if len(changes) < MIN_MODE_RECORDS or not all(v <= FROZEN_BN_CHANGE for _, v in changes):
            return []
        return [
            self.diagnosis(
                title=f"BatchNorm running statistics did not change in {len(changes)} collections "
                f"in train mode (largest relative change {format_number(max(v for _, v in changes))})",
                evidence=[Evidence(s, {"batchnorm_stat_change": v}) for s, v in pick(changes)],
                hint="eval-mode outputs use the initial statistics: check BatchNorm momentum (0 "
                "freezes them) and that no BN module is left in eval mode; if frozen BN is "
                "intended (fine-tuning), ignore this",
            )
        ]
