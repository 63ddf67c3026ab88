"""What the holdout shows about learning: ``overfitting``, ``no_learning``,
``non_convergence``, ``prediction_collapse``.

Runs in: any process that reads a run (no torch).

A classifier's holdout is judged on its accuracy against chance; a token (language-model)
holdout on its per-token loss, since token labels have no chance accuracy to compare with.
``overfitting`` and ``no_learning`` are two outcomes of one judgement: at most one holds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from train_telemetry.analysis.load import (
    Run,
    format_number,
    holdout_accuracy,
    holdout_chance,
    holdout_class_count,
    holdout_is_sequence,
    train_loss,
)
from train_telemetry.analysis.rules._common import (
    MIN_TREND_RECORDS,
    TRAIN_LOSS_DROP,
    per_run,
    pick,
    thirds,
    train_trend,
)
from train_telemetry.analysis.rules.base import Diagnosis, Evidence, Rule
from train_telemetry.records import TrainMetrics

# --- a classifier's holdout ----------------------------------------------------------------
# "At chance" allows two standard errors of a binomial accuracy on the holdout (0.14 for 50
# examples at 50%), and never less than 5 points.
CHANCE_MARGIN_MIN = 0.05
CHANCE_MARGIN_SE = 2.0
# A holdout accuracy this far (and beyond the chance margin) below its smoothed peak is falling.
OVERFIT_DROP_MIN = 0.05
# Overfitting also needs the train batches' accuracy (late third) 20 points above the holdout's:
# a gap beyond the noise of both (+-0.09 for a batch of 32, +-0.07 for 50 holdout examples).
# The demo's frozen backbone (head slowly fitting random features: train 0.53 -> 0.67,
# holdout 0.52) stays below it.
OVERFIT_TRAIN_GAP = 0.20

# --- a sequence (language-model) holdout ---------------------------------------------------
# Token labels have no chance accuracy to compare with (a vocabulary whose token frequencies
# the records do not hold), so learning is judged on the holdout's per-token loss. It is
# deterministic (the same sequences, eval mode) and moves only when the weights do, so small
# margins are real: a late-third mean less than 1% below the early third's (and per-token
# accuracy up less than 1 point) is a holdout that did not move; a fine-tune at a low LR
# still moves it a few percent over a run.
SEQ_LOSS_FALL = 0.01
SEQ_ACC_RISE = 0.01
# A late-third mean 5% above the smoothed minimum (reached before the end) is a holdout loss
# that rose again: what overfitting looks like for an LM (eval loss up while train loss falls).
SEQ_LOSS_RISE = 0.05


def _chance_margin(p: float, n: int) -> float:
    se = math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.5
    return max(CHANCE_MARGIN_MIN, CHANCE_MARGIN_SE * se)


def _is_sequence(run: Run) -> bool:
    holdout = run.holdout()
    return bool(holdout) and holdout_is_sequence(holdout[-1][2])


def _train_text(train: dict[str, Any]) -> str:
    parts = []
    if "loss_early" in train:
        parts.append(f"train loss went {train['loss_early']:.3g} -> {train['loss_late']:.3g}")
    if "acc_early" in train:
        parts.append(f"train accuracy {train['acc_early']:.2f} -> {train['acc_late']:.2f}")
    return ", ".join(parts) if parts else "no train metrics"


def _train_at(run: Run) -> dict[int, TrainMetrics]:
    """{step: the record's ``train``} for the records that have one."""
    return {run.step(i): r.train for i, r in enumerate(run.records) if r.train}


@dataclass(frozen=True)
class _ClassifierTrend:
    """A classifier holdout's accuracy over the run, beside the train batches' trend."""

    chance: float
    n: int  # holdout examples
    late: float  # mean accuracy of the last third
    peak: float  # best accuracy, smoothed over windows as long as the last third
    at_chance: bool
    falling: bool
    train: dict[str, Any]
    evidence: list[Evidence]
    # The train batches improve, clearly ahead of a holdout at chance or falling.
    overfitting: bool


@per_run
def _classifier_trend(run: Run) -> _ClassifierTrend | None:
    """None with fewer than MIN_TREND_RECORDS holdout accuracies."""
    holdout = run.holdout()
    accs = [
        (s, a) for s, _, h in holdout if (a := holdout_accuracy(h)) is not None and math.isfinite(a)
    ]
    if len(accs) < MIN_TREND_RECORDS:
        return None
    chance, n = holdout_chance(holdout[-1][2])
    train = train_trend(run, chance)
    values = [a for _, a in accs]
    _, late_vals = thirds(values)
    late = statistics.fmean(late_vals)
    w = len(late_vals)
    smoothed = [statistics.fmean(values[i : i + w]) for i in range(len(values) - w + 1)]
    peak_i = max(range(len(smoothed)), key=smoothed.__getitem__)
    peak = smoothed[peak_i]
    at_chance = late <= chance + _chance_margin(chance, n)
    falling = peak_i < len(smoothed) - 1 and peak - late >= max(
        OVERFIT_DROP_MIN, _chance_margin(peak, n)
    )
    evidence = []
    train_by_step = _train_at(run)
    for s, a in pick(accs):
        values_at: dict[str, Any] = {"holdout_accuracy": a}
        if t := train_by_step.get(s):
            values_at["train_loss"] = t.loss
            values_at["train_accuracy"] = t.accuracy
        evidence.append(Evidence(s, values_at))
    # Overfitting needs the train batches clearly ahead of the holdout; a slowly learning run
    # whose small holdout has not yet left chance is "no learning" (yet), not overfitting.
    gap_ok = "acc_late" not in train or train["acc_late"] - late >= OVERFIT_TRAIN_GAP
    return _ClassifierTrend(
        chance=chance,
        n=n,
        late=late,
        peak=peak,
        at_chance=at_chance,
        falling=falling,
        train=train,
        evidence=evidence,
        overfitting=train["improving"] and gap_ok and (at_chance or falling),
    )


@per_run
def _sequence_holdout_trend(run: Run) -> dict[str, Any] | None:
    """A sequence holdout's per-token loss over the run: early/late third means, the smoothed
    minimum and where, and the verdicts ``flat`` and ``rising``; None without enough records
    (or for a classifier's holdout)."""
    holdout = run.holdout()
    if not holdout or not holdout_is_sequence(holdout[-1][2]):
        return None
    losses = [(s, v) for s, _, h in holdout if (v := h.loss) is not None and math.isfinite(v)]
    if len(losses) < MIN_TREND_RECORDS:
        return None
    values = [v for _, v in losses]
    early_vals, late_vals = thirds(values)
    early, late = statistics.fmean(early_vals), statistics.fmean(late_vals)
    w = len(late_vals)
    smoothed = [statistics.fmean(values[i : i + w]) for i in range(len(values) - w + 1)]
    low_i = min(range(len(smoothed)), key=smoothed.__getitem__)
    low = smoothed[low_i]
    accs = [a for _, _, h in holdout if (a := holdout_accuracy(h)) is not None and math.isfinite(a)]
    acc_rise = (
        statistics.fmean(thirds(accs)[1]) - statistics.fmean(thirds(accs)[0])
        if len(accs) >= MIN_TREND_RECORDS
        else None
    )
    return {
        "losses": losses,
        "early": early,
        "late": late,
        "low": low,
        # the step of the window's middle record
        "low_step": losses[low_i + w // 2][0],
        "flat": late > early * (1 - SEQ_LOSS_FALL)
        and (acc_rise is None or acc_rise < SEQ_ACC_RISE),
        "rising": low_i < len(smoothed) - 1 and late >= low * (1 + SEQ_LOSS_RISE),
    }


def _sequence_overfits(train: dict[str, Any], trend: dict[str, Any]) -> bool:
    """The train batches improve while the holdout's per-token loss does not fall, or rises."""
    return bool(train["improving"] and (trend["flat"] or trend["rising"]))


def _sequence_evidence(run: Run, trend: dict[str, Any]) -> list[Evidence]:
    train_by_step = _train_at(run)
    acc_by_step = {s: holdout_accuracy(h) for s, _, h in run.holdout()}
    evidence = []
    for s, v in pick(trend["losses"]):
        values_at: dict[str, Any] = {"holdout_loss": v, "holdout_accuracy": acc_by_step.get(s)}
        if t := train_by_step.get(s):
            values_at["train_loss"] = t.loss
        evidence.append(Evidence(s, values_at))
    return evidence


def _perplexity_text(a: float, b: float) -> str:
    """Per-token losses a -> b as perplexities (what LM users compare)."""

    def ppl(x: float) -> str:
        return format_number(math.exp(x)) if x < 700 else "Inf"

    return f"perplexity {ppl(a)} -> {ppl(b)}"


# --- overfitting ---------------------------------------------------------------------------


class Overfitting(Rule):
    code = "overfitting"
    severity = "serious"
    summary = (
        "the train batches improve while the holdout stays at chance or falls from its peak "
        "(a token holdout: its per-token loss does not fall, or rises again)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        if _is_sequence(run):
            trend = _sequence_holdout_trend(run)
            train = train_trend(run)
            if trend is None or not _sequence_overfits(train, trend):
                return []
            early, late, low = trend["early"], trend["late"], trend["low"]
            what = (
                f"holdout per-token loss rose from {low:.4g} (step {trend['low_step']}) to {late:.4g} "
                f"({_perplexity_text(low, late)})"
                if trend["rising"]
                else f"holdout per-token loss did not fall ({early:.4g} -> {late:.4g}, "
                f"{_perplexity_text(early, late)})"
            )
            return [
                self.diagnosis(
                    title=f"{what} while {_train_text(train)}",
                    evidence=_sequence_evidence(run, trend),
                    hint="the model fits the training text but not the holdout: stop earlier (the "
                    "holdout's best step), lower the LR or the number of epochs, add data or "
                    "regularisation; check that train and holdout come from the same distribution",
                )
            ]
        found = _classifier_trend(run)
        if found is None or not found.overfitting:
            return []
        what = (
            f"holdout accuracy stays at chance ({found.late:.2f}, chance {found.chance:.2f})"
            if found.at_chance
            else f"holdout accuracy fell from {found.peak:.2f} to {found.late:.2f}"
        )
        return [
            self.diagnosis(
                title=f"{what} while {_train_text(found.train)}",
                evidence=found.evidence,
                hint="the model fits the training batches but not the holdout: check that train "
                "and holdout labels mean the same thing (shuffled/mismatched labels), add "
                "regularisation or data, or stop earlier",
            )
        ]


# --- no_learning ---------------------------------------------------------------------------


class NoLearning(Rule):
    code = "no_learning"
    severity = "serious"
    summary = (
        "nothing is learned: the holdout stays at chance (a token holdout: its per-token loss "
        "does not fall); without a holdout, a train loss that does not fall (a warning)"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        if _is_sequence(run):
            trend = _sequence_holdout_trend(run)
            train = train_trend(run)
            if trend is None:
                return self._from_train(run, train)
            if _sequence_overfits(train, trend) or not trend["flat"]:
                return []
            train_text = _train_text(train)
            return [
                self.diagnosis(
                    title=f"holdout per-token loss does not fall ({trend['early']:.4g} -> {trend['late']:.4g}, "
                    f"{_perplexity_text(trend['early'], trend['late'])})"
                    + (f" and {train_text}" if train["known"] else "; no train loss recorded"),
                    evidence=_sequence_evidence(run, trend),
                    hint="nothing is being learned: a serious diagnosis listed above this one is the likely "
                    "cause; else check the LR (too low, or a scheduler stuck at 0), that the trainable "
                    "parameters (e.g. LoRA adapters) are in the optimizer, and that the labels are the "
                    "tokens to predict",
                )
            ]
        found = _classifier_trend(run)
        if found is None:
            return self._from_train(run, train_trend(run))
        if found.overfitting or not found.at_chance:
            return []
        what = (
            f"holdout accuracy stays at chance ({found.late:.2f}, chance {found.chance:.2f}, "
            f"{found.n} examples)"
        )
        return [
            self.diagnosis(
                title=what
                + (
                    f" and {_train_text(found.train)}"
                    if found.train["known"]
                    else "; no train loss/accuracy recorded"
                ),
                evidence=found.evidence,
                hint="nothing is being learned: a serious diagnosis listed above this one is the likely "
                "cause; else check the LR (too low, or so high that it diverged), that the loss uses "
                "the right labels, and the input pipeline",
            )
        ]

    def _from_train(self, run: Run, train: dict[str, Any]) -> list[Diagnosis]:
        # Without a holdout, only a train loss that does not move at all says "no learning";
        # it is a warning because a flat single-batch loss can also be a hard task's plateau.
        if not train["known"] or train["improving"] or "loss_early" not in train:
            return []
        if train["loss_late"] < train["loss_early"] * (1 - TRAIN_LOSS_DROP / 2):
            return []
        points = [Evidence(s, {"train_loss": v}) for s, v in pick(run.points(train_loss))]
        return [
            self.diagnosis(
                severity="warning",
                title=f"train loss does not fall ({train['loss_early']:.3g} -> {train['loss_late']:.3g}); "
                "no holdout recorded to confirm",
                evidence=points,
                hint="check the LR, frozen groups and the labels; call set_holdout_data() to let the "
                "report judge learning on fixed examples",
            )
        ]


# --- non_convergence -----------------------------------------------------------------------
# Non-convergence (AutoTrainer): the train loss has stopped improving over the second half
# (last third's mean within 5% of the middle third's, or above it) while it is still high:
# 2x or more the best holdout loss of the run (the holdout shows that much lower is
# reachable; dropout alone makes a train loss ~1.2-1.5x the eval loss) and at least 30% of
# chance level (ln of the class count: a uniform guess), so that a near-zero loss's noise
# does not count. It is left to no_learning when the holdout stays at chance.
NONCONV_MIN_RECORDS = 6
NONCONV_STALL = 0.05
NONCONV_HOLDOUT_GAP = 2.0
NONCONV_MIN_CHANCE_SHARE = 0.3


class NonConvergence(Rule):
    code = "non_convergence"
    severity = "serious"
    summary = (
        f"the train loss stopped improving at {NONCONV_HOLDOUT_GAP:g}x or more the holdout's "
        "best loss"
    )
    silent_bug = True

    def check(self, run: Run) -> list[Diagnosis]:
        losses = run.points(train_loss, finite=True)
        holdout = run.holdout()
        if len(losses) < NONCONV_MIN_RECORDS or not holdout:
            return []
        values = [v for _, v in losses]
        k = len(values) // 3
        middle, late = statistics.fmean(values[k : len(values) - k]), statistics.fmean(values[-k:])
        if late < middle * (1 - NONCONV_STALL):
            return []  # still improving
        best = [(s, v) for s, _, h in holdout if (v := h.loss) is not None and math.isfinite(v)]
        if not best:
            return []
        if holdout_is_sequence(holdout[-1][2]):
            trend = _sequence_holdout_trend(run)
            if trend is None or trend["flat"]:
                return []  # the holdout does not move: that is no_learning
            # No chance level for tokens: the holdout's starting loss stands in for it (a train
            # loss near 0 next to it is noise, not a stall).
            chance_loss, chance_words = best[0][1], "holdout's first loss"
        else:
            chance, n = holdout_chance(holdout[-1][2])
            accs = [
                a
                for _, _, h in holdout
                if (a := holdout_accuracy(h)) is not None and math.isfinite(a)
            ]
            if accs and statistics.fmean(thirds(accs)[1]) <= chance + _chance_margin(chance, n):
                return []  # the holdout stays at chance: that is no_learning
            chance_loss = math.log(holdout_class_count(holdout[-1][2]))
            chance_words = "chance level"
        best_step, best_loss = min(best, key=lambda sv: sv[1])
        if not (
            late >= NONCONV_HOLDOUT_GAP * best_loss
            and late >= NONCONV_MIN_CHANCE_SHARE * chance_loss
        ):
            return []
        gap = f"{late / best_loss:.3g}x" if best_loss > 0 else "far above"
        holdout_loss = dict(best)
        return [
            self.diagnosis(
                title=f"train loss stopped improving at {format_number(late)} (last third; middle third "
                f"{format_number(middle)}), {gap} the holdout's best loss "
                f"{format_number(best_loss)} (step {best_step}); {chance_words} {format_number(chance_loss)}",
                evidence=[
                    Evidence(
                        s,
                        {"train_loss": v}
                        | ({"holdout_loss": holdout_loss[s]} if s in holdout_loss else {}),
                    )
                    for s, v in pick(losses)
                ],
                hint="training bounces above a loss it can reach: lower the LR or decay it, use a "
                "larger batch, check the loss is computed on the right outputs and labels",
            )
        ]


# --- prediction_collapse -------------------------------------------------------------------
# One class for >= 95% of the holdout, 20 points more than that class's true share: collapsed.
COLLAPSE_SHARE = 0.95
COLLAPSE_EXCESS = 0.20
# Fewer holdout examples cannot show a collapse convincingly.
COLLAPSE_MIN_EXAMPLES = 10
# A freshly initialised network often predicts one class for everything: a collapse counts
# only when it holds in at least 2 records of the run's second half (and in the last one).
COLLAPSE_MIN_RECORDS = 2


class PredictionCollapse(Rule):
    code = "prediction_collapse"
    severity = "serious"
    summary = (
        f"the holdout predictions are one class for >= {COLLAPSE_SHARE:.0%} of the examples late "
        f"in the run, {COLLAPSE_EXCESS * 100:.0f} points beyond that class's true share"
    )

    def check(self, run: Run) -> list[Diagnosis]:
        holdout = run.holdout()
        collapsed: list[
            tuple[int, int, float, float]
        ] = []  # (index, class, pred share, true share)
        for idx, (_, _, h) in enumerate(holdout):
            preds, labels = h.predictions or [], h.labels or []
            if len(preds) < COLLAPSE_MIN_EXAMPLES:
                continue
            if len(set(labels)) < 2:
                continue
            top = max(set(preds), key=preds.count)
            share = preds.count(top) / len(preds)
            true_share = labels.count(top) / len(labels)
            if share >= COLLAPSE_SHARE and share - true_share >= COLLAPSE_EXCESS:
                collapsed.append((idx, top, share, true_share))
        if not collapsed or collapsed[-1][0] != len(holdout) - 1:
            return []
        late_start = len(holdout) // 2
        late_hits = [c for c in collapsed if c[0] >= late_start]
        if len(late_hits) < COLLAPSE_MIN_RECORDS or len(late_hits) * 2 < len(holdout) - late_start:
            return []
        _, cls, share, true_share = collapsed[-1]
        since = holdout[late_hits[0][0]][0]
        return [
            self.diagnosis(
                subject=str(cls),
                title=f"holdout predictions collapsed to class {cls}: {share:.0%} of examples "
                f"(true share {true_share:.0%}), in {len(late_hits)} of the last "
                f"{len(holdout) - late_start} records since step {since}",
                evidence=[
                    Evidence(
                        holdout[i][0], {"predicted_class": c, "predicted_share": s, "true_share": t}
                    )
                    for i, c, s, t in pick(collapsed)
                ],
                hint="the model outputs one class whatever the input: check the label encoding and "
                "loss, class weights, batch shuffling, and an LR that is too high",
            )
        ]
