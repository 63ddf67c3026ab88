"""The collector's own health: ``dropped_snapshots``, ``telemetry_errors``, ``incomplete_run``.

Runs in: any process that reads a run (no torch).

These say how far the records can be trusted, not how training went; they read the
records' ``telemetry`` and ``errors`` keys and ``summary.json``.
"""

from __future__ import annotations

from typing import Any

from train_telemetry.analysis.load import Run, number
from train_telemetry.analysis.rules._common import EVIDENCE_POINTS, pick
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule

# Dropping more than 10% of snapshots leaves holes in every trend: warn; fewer is bookkeeping.
DROPPED_WARNING_FRACTION = 0.10


class DroppedSnapshots(Rule):
    code = "dropped_snapshots"
    severity = "warning"
    summary = (
        "snapshots the collector dropped (worker behind, or skipped for `overhead_budget`); "
        f"under {DROPPED_WARNING_FRACTION:.0%} of them, or every one a budget skip: info"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        # summary.json has no schema: its values are checked as read.
        summary = run.summary or {}
        gaps = run.seq_gaps()  # records a resume superseded are not lost
        dropped_records = max((cost.dropped_total for _, cost in run.costs()), default=0)
        dropped = int(max(number(summary.get("snapshots_dropped")) or 0, dropped_records, gaps))
        if not dropped:
            return []
        taken = number(summary.get("snapshots_taken")) or (len(run.records) + dropped)
        frac = dropped / max(taken + dropped if "snapshots_taken" in summary else taken, 1)
        skipped = int(number(summary.get("snapshots_skipped")) or 0)
        # Every drop a skip of the overhead budget: telemetry kept to the share it was given,
        # as configured; that is information, and the lever is the budget, not the worker.
        budget_only = 0 < dropped <= skipped
        hint = (
            "the overhead budget kept telemetry within its share of training time: raise "
            "overhead_budget (e.g. 0.2), set it to null for every record, or make records cheaper "
            "(raise collect_every_n, shrink holdout_size)"
            if budget_only
            else "raise collect_every_n or num_slots, shrink holdout_size, or set on_full: block"
        )
        return [
            self.diagnosis(
                severity="warning" if frac >= DROPPED_WARNING_FRACTION and not budget_only else "info",
                title=f"{dropped} snapshots dropped ({frac:.0%}): "
                + (
                    f"{skipped} skipped to stay within overhead_budget"
                    if skipped
                    else "the worker could not keep up"
                ),
                evidence=[
                    Evidence(s, {"dropped_before": cost.dropped_before})
                    for s, cost in run.costs()
                    if cost.dropped_before > 0
                ][:EVIDENCE_POINTS],
                hint=hint,
            )
        ]


class TelemetryErrors(Rule):
    code = "telemetry_errors"
    severity = "warning"
    summary = "metrics that failed while collecting (missing from the affected records), and where"

    def check(self, run: Run) -> list[Diagnosis]:
        summary = run.summary or {}
        errors = [
            Evidence(run.step(i), {"where": e.where, "type": e.type, "message": e.message})
            for i, r in enumerate(run.records)
            for e in r.errors or []
        ]
        summary_errors = summary.get("errors")
        counted = (
            sum(int(v) for v in summary_errors.values() if number(v))
            if isinstance(summary_errors, dict)
            else 0
        )
        if not (errors or counted):
            return []
        where = sorted({str(e.values.get("where")) for e in errors}) or sorted(summary_errors or {})
        return [
            self.diagnosis(
                title=f"{max(counted, len(errors))} metric errors while collecting ({', '.join(where)})",
                evidence=pick(errors) or [Evidence(None, dict(summary_errors or {}))],
                hint="those metrics are missing from the affected records; the messages say why",
            )
        ]


def _last_errors(summary: dict[str, Any]) -> dict[str, Any]:
    last = summary.get("last_errors")
    return {"last_errors": "; ".join(map(str, last))} if isinstance(last, list) and last else {}


class IncompleteRun(Rule):
    code = "incomplete_run"
    severity = "warning"
    summary = (
        "the run did not finish cleanly: no summary.json, an unclean stop, a failed worker, or "
        "a torn last line"
    )
    finished_runs_only = True

    def check(self, run: Run) -> list[Diagnosis]:
        if not run.records:
            return []
        summary = run.summary or {}
        problems = []
        if run.summary is None:
            problems.append("no summary.json (stop() never ran: crashed or still running)")
        else:
            if summary.get("clean") is False:
                problems.append("summary.json says the stop was not clean")
            code = summary.get("worker_exitcode")
            if isinstance(code, int) and code != 0:
                problems.append(f"the worker exited with code {code}")
        if run.torn_tail():
            problems.append("the records file ends in a torn line (skipped)")
        if not problems:
            return []
        return [
            self.diagnosis(
                title="the run did not finish cleanly: " + "; ".join(problems),
                evidence=[
                    Evidence(run.steps[-1], {"records": len(run.records)} | _last_errors(summary))
                ],
                hint=(
                    "the records up to the last whole line are valid; call telemetry.stop() "
                    "(or use it as a context manager) so the summary is written"
                    if run.summary is None
                    else "the records written are valid; summary.json's last_errors says what "
                    "went wrong at stop (records after it may be missing)"
                ),
            )
        ]
