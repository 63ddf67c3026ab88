"""The diagnoses: rules from a run's records (plus run.json/summary.json) to findings.

Runs in: any process that reads a run (no torch).

One file per diagnosis family, one :class:`~.base.Rule` object per code, each with its
thresholds beside it and the reason for their values; :data:`RULES` is the one table of
them, and :func:`diagnose` runs it. The README's list of codes and its table of silent bugs
are this table's (``tests/unit/test_readme_facts.py`` keeps them equal).

Adding a rule is one new file and one line in :data:`RULES`:

1. ``rules/<family>.py`` (or a family file that already shares its helpers): a subclass of
   :class:`~.base.Rule` with ``code``, ``severity`` (the usual one), ``summary`` (one line
   of Markdown: what it names), ``silent_bug = True`` if it is one of the bugs where
   training runs and nothing crashes, and ``check(run)`` returning diagnoses of its own
   code made with ``self.diagnosis(...)``; its thresholds as module constants beside it,
   each with its reason. Helpers that another family needs too go in ``_common.py``.
2. One line in :data:`RULES`, at the place where its findings should print among those of
   the same severity.
3. The code in README.md's "Reading a run": in the list of codes, or, for a silent bug,
   a row ``| `code` | summary |`` of the table in the order of :data:`RULES` (the test
   says what is missing).
"""

from __future__ import annotations

import dataclasses

from train_telemetry.analysis.load import Run
from train_telemetry.analysis.rules import (
    activations,
    batches,
    collector,
    gradients,
    groups,
    holdout,
    learning_rates,
    model_mode,
    nonfinite,
    outputs,
    replicas,
    scale,
    schedule,
    spikes,
    stall,
    step_size,
    updates,
)
from train_telemetry.analysis.rules._common import one_pass
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule, Severity, is_serious

__all__ = [
    "CODES",
    "RULES",
    "Diagnosis",
    "Evidence",
    "Rule",
    "Severity",
    "diagnose",
    "is_serious",
]

# In report order within a severity: causes first (what to fix), then the symptoms they
# produce (a frozen backbone or single-class batches also leave the holdout at chance; a
# batch that switches class makes the gradients surge; gradients never zeroed or dead ReLUs
# make gradients grow or vanish and training swing or stall); the collector's own health last.
RULES: tuple[Rule, ...] = (
    nonfinite.Nonfinite(),
    replicas.ReplicaDivergence(),
    gradients.GradientsNotZeroed(),
    updates.ParamsNotUpdated(),
    outputs.ProbabilitiesAsLogits(),
    schedule.LrScheduleEndsEarly(),
    model_mode.EvalModeTraining(),
    model_mode.FrozenBatchnormStats(),
    batches.SingleClassBatches(),
    batches.DataImbalance(),
    groups.FrozenGroup(),
    learning_rates.LrRatioMismatch(),
    step_size.LrTooHigh(),
    schedule.LrWarmupUnfinished(),
    scale.PoorInitialScale(),
    activations.DyingRelu(),
    activations.SaturatedActivations(),
    gradients.ExplodingGradients(),
    gradients.VanishingGradients(),
    gradients.UnstableTraining(),
    spikes.LossSpike(),
    spikes.GradientSpike(),
    stall.TrainingStalled(),
    learning_rates.UpdateRatioInverted(),
    holdout.Overfitting(),
    holdout.NonConvergence(),
    holdout.NoLearning(),
    holdout.PredictionCollapse(),
    collector.DroppedSnapshots(),
    collector.TelemetryErrors(),
    collector.IncompleteRun(),
)

CODES: tuple[str, ...] = tuple(rule.code for rule in RULES)

_SEVERITY_ORDER = {"serious": 0, "warning": 1, "info": 2}


def _annotate(run: Run, evidence: Evidence) -> Evidence:
    index = run.index_of(evidence.step) if evidence.step is not None else None
    if index is None:
        return evidence
    record = run.records[index]
    return dataclasses.replace(evidence, epoch=record.epoch, batch_idx=record.batch_idx)


def diagnose(run: Run, *, finished: bool = True) -> list[Diagnosis]:
    """Every diagnosis of ``run``, most severe first, then in the order of :data:`RULES`,
    then by the step of its first evidence.

    ``finished=False`` (a run still training, as ``watch`` sees it) leaves out the rules
    that judge how a run ended (a missing summary.json is not a fault yet).
    """
    found: list[tuple[int, Diagnosis]] = []
    with one_pass():
        for position, rule in enumerate(RULES):
            if rule.finished_runs_only and not finished:
                continue
            for d in rule.check(run):
                assert d.code == rule.code, f"rule {rule.code} returned a diagnosis {d.code}"
                annotated = [_annotate(run, e) for e in d.evidence]
                found.append((position, dataclasses.replace(d, evidence=annotated)))

    def order(item: tuple[int, Diagnosis]) -> tuple[int, int, int]:
        position, d = item
        first = next((e.step for e in d.evidence if e.step is not None), 1 << 62)
        return (_SEVERITY_ORDER[d.severity], position, first)

    return [d for _, d in sorted(found, key=order)]
