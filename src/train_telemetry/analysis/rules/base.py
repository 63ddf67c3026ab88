"""What a diagnosis rule is and what it returns: :class:`Rule`, :class:`Diagnosis`, :class:`Evidence`.

Runs in: any process that reads a run (no torch).

``code`` is stable: tests, scripts and the ``--json`` output key on it. "serious" means the
run is not doing what it should (the CLI exits 1); "warning" deserves a look; "info" is
bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from train_telemetry.analysis.load import Run

__all__ = ["Diagnosis", "Evidence", "Rule", "Severity", "is_serious"]

Severity = Literal["info", "warning", "serious"]


@dataclass(frozen=True)
class Evidence:
    """One point of a diagnosis: where (the run's monotonic step) and the values there.

    ``epoch`` and ``batch_idx`` are the record's own counters, filled in by
    :func:`~train_telemetry.analysis.rules.diagnose` (they differ from ``step`` where the
    training loop restarts batch_idx each epoch).
    """

    step: int | None
    values: dict[str, Any]
    epoch: int | None = None
    batch_idx: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "values": dict(self.values),
        }


@dataclass(frozen=True)
class Diagnosis:
    """A finding about a run: what (``code``), how bad, the evidence, and what to try."""

    code: str
    severity: Severity
    title: str
    hint: str
    evidence: list[Evidence] = field(default_factory=list)
    subject: str | None = None  # the group or class it is about, when it is about one

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies the finding across re-diagnoses of a growing run (for ``watch``)."""
        return (self.code, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "subject": self.subject,
            "title": self.title,
            "evidence": [e.to_dict() for e in self.evidence],
            "hint": self.hint,
        }


def is_serious(diagnoses: Iterable[Diagnosis]) -> bool:
    """Whether any diagnosis is serious (the CLI's exit status 1)."""
    return any(d.severity == "serious" for d in diagnoses)


class Rule(ABC):
    """One diagnosis code: what it names, how serious it usually is, and the check that finds it.

    A rule is stateless: :meth:`check` reads the run and returns the diagnoses of this
    rule's ``code`` only (none, one, or one per group/layer it is about). Its thresholds are
    module constants beside it, each with the reason for its value, chosen so that a run of
    a handful of records can be judged and a healthy but noisy run is not flagged.
    """

    code: ClassVar[str]
    # The usual severity; where check() raises or lowers it, the reason is at that line.
    severity: ClassVar[Severity]
    # What the code names, one line of Markdown: README's text for it.
    summary: ClassVar[str]
    # A row of README's table of silent bugs (training runs and nothing crashes).
    silent_bug: ClassVar[bool] = False
    # Judges how the run ended: left out for a run still training (``watch``), whose missing
    # summary.json is not a fault yet.
    finished_runs_only: ClassVar[bool] = False

    @abstractmethod
    def check(self, run: Run) -> list[Diagnosis]:
        """This rule's diagnoses of ``run``; [] when it finds nothing."""

    def diagnosis(
        self,
        title: str,
        hint: str,
        evidence: Sequence[Evidence] = (),
        *,
        subject: str | None = None,
        severity: Severity | None = None,
    ) -> Diagnosis:
        """A :class:`Diagnosis` of this rule's code, at its usual severity unless ``severity``."""
        return Diagnosis(
            code=self.code,
            severity=severity or self.severity,
            title=title,
            hint=hint,
            evidence=list(evidence),
            subject=subject,
        )
