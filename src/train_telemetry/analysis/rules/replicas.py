"""Replicas that drift apart: ``replica_divergence``.

Runs in: any process that reads a run (no torch).

Under DDP every rank should hold the same weights, and under HSDP each shard's replicas
should; the collector compares them at every collection (``replicas`` in the records,
metrics/replicas.py). Ranks whose weights differ train on from different models while
rank 0's records (and its loss) describe its own replica only: the run's result then
depends on which rank's checkpoint is saved, and gradients are averaged over models that
are not the same one. A difference never heals by itself (DDP does not re-broadcast the
weights after its start), so one record that shows it is enough.
"""

from __future__ import annotations

from msgspec import UNSET

from train_telemetry.analysis.load import Run, format_number
from train_telemetry.analysis.rules._common import pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule


class ReplicaDivergence(Rule):
    code = "replica_divergence"
    severity = "serious"
    summary = "ranks that should hold the same weights (DDP; HSDP's replicas) hold different ones"
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        checked = [(i, r.replicas) for i, r in enumerate(run.records) if r.replicas is not UNSET]
        hits = [(i, c) for i, c in checked if c.diverged]
        if not hits:
            return []
        first, _ = hits[0]
        last_equal = next((run.step(i) for i, c in reversed(checked) if i < first and c.compared and not c.diverged),
                          None)
        ranks = sorted({r for _, c in hits for r in c.diverged})
        since = (f"between step {last_equal} and step {run.step(first)}" if last_equal is not None
                 else f"from the first check (step {run.step(first)})")
        spread = max(c.max_rel_spread for _, c in hits)
        return [
            self.diagnosis(
                title=f"ranks {ranks} should hold the same weights and do not ({len(hits)} of {len(checked)} "
                f"checked records; they diverged {since}; the relative difference of their weights' sums of "
                f"squares reached {format_number(spread)})",
                evidence=[Evidence(run.step(i), {"diverged": c.diverged, "max_rel_spread": c.max_rel_spread})
                          for i, c in pick(hits)],
                hint="from there each replica trains its own model, and rank 0's records describe rank 0's only: "
                "look for code that depends on the rank (a checkpoint or a random init on one rank, an optimizer "
                "step, LR or gradient clip taken on some ranks) or for gradients that were not all-reduced "
                "(no_sync left on, a parameter DDP does not see, a find_unused_parameters mismatch)",
            )
        ]
