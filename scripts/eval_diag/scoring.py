"""Scoring the diagnoses of the harness's runs: per-rule recall and false alarms (over all
programs and leave-one-program-out), and spike detection against three baselines.

Runs in: the harness's main process (reads the run directories; no training).

Definitions (docs/diagnosis.md repeats them beside the table):

- A rule *finds* a run when its code is among the run's diagnoses (any severity). Its
  recall: the share of the runs with its bug that it finds. Its false alarms: the healthy
  runs it names (in brackets: at serious severity), and the runs of other bugs it names
  that are not among that bug's consequences (cases.EXPECT).
- Leave-one-program-out: for each new rule, its main threshold (:data:`TUNABLE`) is chosen
  on the runs of the other four programs (the grid value with the best recall minus
  healthy-run false-alarm rate; ties keep the shipped value), then the left-out program's
  runs are judged with it; the counts are summed over the five folds. Rules with no
  threshold chosen here (the older rules) judge every program with their shipped values:
  both columns are then the same, every program being held out for them.
- Spikes are events: an injected spike at step k is found when a detection begins within
  steps [k - 1, k + 10]. Whether it recovered is what the run did, not what the injection
  meant: its last 10 losses (median) back within 1.2x the 20 before k. A detection anywhere else in a healthy run, or in a spiked run
  before its spike or after it recovered, is a false alarm; per 10,000 clean steps is the
  count over the steps of those runs outside the spike windows (a diverged run's steps
  after the spike are not clean).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train_telemetry.analysis import diagnose, load_run
from train_telemetry.analysis.load import Run, train_loss
from train_telemetry.analysis.rules import RULES
from train_telemetry.records import OVERALL

from .cases import PROGRAMS
from .common import Case

# code -> (rules module, its main threshold constant, the grid it is chosen from)
TUNABLE: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "loss_spike": ("spikes", "LOSS_SPIKE_RATIO", (1.2, 1.25, 1.3, 1.5, 2.0, 3.0)),
    "gradient_spike": ("spikes", "GRAD_SPIKE_RATIO", (2.0, 3.0, 5.0, 10.0)),
    "params_not_updated": ("updates", "NOT_UPDATED_MIN_RECORDS", (2, 3, 5, 10)),
    "probabilities_as_logits": ("outputs", "FLOOR_MARGIN", (0.5, 0.8, 0.95, 1.0)),
    "poor_initial_scale": ("scale", "RELU_RMS_HIGH", (0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)),
    "training_stalled": ("stall", "STALL_TOLERANCE", (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)),
    "lr_schedule_ends_early": ("schedule", "ENDS_EARLY_SHARE", (0.05, 0.1, 0.2, 0.3, 0.5)),
    "lr_warmup_unfinished": ("schedule", "WARMUP_TAIL_RISE", (1.02, 1.05, 1.1, 1.2, 1.5)),
    "lr_too_high": ("step_size", "TOO_LARGE_RATIO", (0.1, 0.2, 0.3, 0.5, 1.0)),
    # The older rules' thresholds that the harness's injections now measure (docs/diagnosis.md).
    "gradients_not_zeroed": ("gradients", "NOT_ZEROED_CLIPPED_SHARE", (0.7, 0.8, 0.9, 0.95)),
    "unstable_training": ("gradients", "UNSTABLE_GROWTH", (1.5, 2.0, 3.0, 5.0)),
    "non_convergence": ("holdout", "NONCONV_HOLDOUT_GAP", (1.5, 2.0, 3.0, 5.0)),
}
SPIKE_MATCH_BEFORE, SPIKE_MATCH_AFTER = 1, 10
# Consecutive detections this close (in steps) are one event.
EVENT_GAP = 5


@contextlib.contextmanager
def threshold(code: str, value: float) -> Iterator[None]:
    """The rule of ``code`` judging with its main threshold at ``value``."""
    module_name, name, _ = TUNABLE[code]
    module = importlib.import_module(f"train_telemetry.analysis.rules.{module_name}")
    old = getattr(module, name)
    setattr(module, name, type(old)(value))
    try:
        yield
    finally:
        setattr(module, name, old)


@dataclass
class Judged:
    case: Case
    run: Run | None
    codes: dict[str, str] = field(default_factory=dict)  # code -> most severe severity
    error: str | None = None


_RANK = {"info": 0, "warning": 1, "serious": 2}


def _codes(run: Run) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in diagnose(run):
        if _RANK[d.severity] >= _RANK.get(out.get(d.code, "info"), 0):
            out[d.code] = d.severity
    return out


def judge(cases: Sequence[Case], root: Path) -> list[Judged]:
    judged = []
    for case in cases:
        try:
            run = load_run(root / case.name)
        except Exception as exc:  # a run that failed to train is reported, not scored
            judged.append(Judged(case, None, error=f"{type(exc).__name__}: {exc}"))
            continue
        judged.append(Judged(case, run, _codes(run)))
    return judged


# --- per-rule recall and false alarms --------------------------------------------------------


@dataclass
class Counts:
    found: int = 0
    positives: int = 0
    healthy_flagged: int = 0
    healthy_serious: int = 0
    healthy: int = 0
    others_flagged: int = 0
    missed: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in ("found", "positives", "healthy_flagged", "healthy_serious", "healthy", "others_flagged"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.missed += other.missed
        self.alarms += other.alarms


def count(code: str, judged: Sequence[Judged], codes_of: Callable[[Judged], dict[str, str]]) -> Counts:
    c = Counts()
    for j in judged:
        if j.run is None:
            continue
        codes = codes_of(j)
        if j.case.expect == code:
            c.positives += 1
            if code in codes:
                c.found += 1
            else:
                c.missed.append(j.case.name)
        elif j.case.bug == "healthy":
            c.healthy += 1
            if code in codes:
                c.healthy_flagged += 1
                c.healthy_serious += codes[code] == "serious"
                c.alarms.append(f"{j.case.name} ({codes[code]})")
        elif code in codes and code not in j.case.consequences:
            c.others_flagged += 1
            c.alarms.append(f"{j.case.name} [other bug] ({codes[code]})")
    return c


def _objective(c: Counts) -> float:
    recall = c.found / c.positives if c.positives else 0.0
    alarms = c.healthy_flagged / c.healthy if c.healthy else 0.0
    return recall - alarms


def lopo(code: str, judged: Sequence[Judged]) -> tuple[Counts, dict[str, float]]:
    """Leave-one-program-out counts of ``code`` and the threshold each fold chose."""
    _, name, grid = TUNABLE[code]
    module = importlib.import_module(f"train_telemetry.analysis.rules.{TUNABLE[code][0]}")
    shipped = getattr(module, name)
    rule = next(r for r in RULES if r.code == code)
    by_value: dict[float, dict[str, dict[str, str]]] = {}
    for value in grid:
        with threshold(code, value):
            # Only this rule's verdict changes with its threshold: the other codes are kept.
            by_value[value] = {}
            for j in judged:
                if j.run is None:
                    continue
                own = {d.code: d.severity for d in sorted(rule.check(j.run), key=lambda d: _RANK[d.severity])}
                others = {c: sev for c, sev in j.codes.items() if c != code}
                by_value[value][j.case.name] = others | own
    total, chosen = Counts(), {}
    for program in PROGRAMS:
        train = [j for j in judged if j.case.program != program]
        test = [j for j in judged if j.case.program == program]
        if not test:
            continue

        def verdicts(value: float) -> Callable[[Judged], dict[str, str]]:
            return lambda x: by_value[value][x.case.name]

        def score_of(value: float, train: list[Judged] = train) -> tuple[float, bool, float]:
            c = count(code, train, verdicts(value))
            return (_objective(c), value == shipped, -abs(math.log(value / shipped)) if shipped else 0.0)

        best = max(grid, key=score_of)
        chosen[program] = best
        total.add(count(code, test, verdicts(best)))
    return total, chosen


def _ratio(a: int, b: int) -> str:
    return f"{a}/{b} = {a / b:.2f}" if b else "-"


def rule_table(judged: Sequence[Judged]) -> tuple[str, list[str]]:
    lines = [
        "| rule | recall, all programs | recall, leave-one-program-out | thresholds chosen (LOPO) | "
        "healthy runs flagged (serious) | other bugs' runs flagged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    for rule in RULES:
        code = rule.code
        c = count(code, judged, lambda j: j.codes)
        if not c.positives and not c.healthy_flagged and not c.others_flagged:
            continue
        if code in TUNABLE:
            held, chosen = lopo(code, judged)
            values = sorted(set(chosen.values()))
            chosen_text = ", ".join(f"{v:g}" for v in values)
        else:
            held, chosen_text = c, "(fixed)"
        lines.append(
            f"| `{code}` | {_ratio(c.found, c.positives)} | {_ratio(held.found, held.positives)} | "
            f"{chosen_text} | {c.healthy_flagged} ({c.healthy_serious}) of {c.healthy} | {c.others_flagged} |"
        )
        if c.missed:
            notes.append(f"- `{code}` missed: {', '.join(c.missed)}")
        if held.missed and code in TUNABLE and held.missed != c.missed:
            notes.append(f"- `{code}` missed leave-one-program-out: {', '.join(held.missed)}")
        if c.alarms:
            notes.append(f"- `{code}` also named: {', '.join(c.alarms)}")
    return "\n".join(lines), notes


# --- spikes: ours and the baselines ------------------------------------------------------------


def _events(steps: Sequence[int]) -> list[int]:
    """The first step of each group of detections (gaps of at most EVENT_GAP steps)."""
    out: list[int] = []
    last = None
    for s in steps:
        if last is None or s - last > EVENT_GAP:
            out.append(s)
        last = s
    return out


def llm_foundry(series: Sequence[tuple[int, float]], window: int = 100, multiplier: float = 2.0) -> list[int]:
    """llm-foundry's KillLossSpike test (without its patience): a loss above 2x the mean of
    the previous 100 losses (a full window first). NaN/Inf count as detections."""
    out: list[int] = []
    history: list[float] = []
    for s, v in series:
        if not math.isfinite(v):
            out.append(s)
            continue
        if len(history) >= window and v > multiplier * statistics.fmean(history[-window:]):
            out.append(s)
        history.append(v)
    return out


def megatron(series: Sequence[tuple[int, float]], early: int = 50, multiplier: float = 10.0) -> list[int]:
    """Megatron's rerun state machine's spiky-loss test: a loss above 10x the largest of the
    first 50 losses. NaN/Inf count as detections."""
    finite = [v for _, v in series[:early] if math.isfinite(v)]
    if not finite:
        return []
    bound = multiplier * max(finite)
    return [s for s, v in series[early:] if not math.isfinite(v) or v > bound]


def zclip(series: Sequence[tuple[int, float]], alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25) -> list[int]:
    """ZClip's z-score test on the gradient norm: EMA mean and variance (alpha 0.97) after 25
    warm-up steps; a norm more than 2.5 standard deviations above the mean is a spike, and
    the EMA is then fed the clipped norm (mean + 2.5 sd) as ZClip does."""
    out: list[int] = []
    values = [v for _, v in series[:warmup] if math.isfinite(v)]
    if len(values) < 2:
        return out
    mean, var = statistics.fmean(values), statistics.pvariance(values)
    for s, v in series[warmup:]:
        if not math.isfinite(v):
            out.append(s)
            continue
        std = math.sqrt(var) + 1e-6
        if (v - mean) / std > z_thresh:
            out.append(s)
            v = mean + z_thresh * std
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
    return out


@dataclass
class SpikeCounts:
    found: int = 0
    injected: int = 0
    kind_right: int = 0
    false_alarms: int = 0
    clean_steps: int = 0


def _recovered(run: Run, k: int) -> bool:
    """What the run did after the spike injected at step ``k``: recovered when its last 10
    losses (median) are back within 1.2x the median of the 20 before ``k`` (whatever the
    injection meant to do: an LR bump can leave a run worse for good, a jump can settle)."""
    losses = run.points(train_loss)
    before = [v for s, v in losses if k - 20 <= s < k and math.isfinite(v)]
    after = [v if math.isfinite(v) else math.inf for s, v in losses[-10:] if s > k]
    return bool(before and after) and statistics.median(after) <= 1.2 * statistics.median(before)


def _spike_score(
    judged: Sequence[Judged], detect: Callable[[Judged], list[tuple[int, bool | None]]]
) -> SpikeCounts:
    """``detect(j)`` -> [(event start, recovered or None when the detector does not say)]."""
    c = SpikeCounts()
    for j in judged:
        if j.run is None or not (j.case.bug == "healthy" or j.case.spikes):
            continue
        steps = j.run.steps
        windows = []
        for k, kind in j.case.spikes:
            end = steps[-1] if kind == "diverge" else k + SPIKE_MATCH_AFTER
            windows.append((k - SPIKE_MATCH_BEFORE, k + SPIKE_MATCH_AFTER, end, kind))
        events = detect(j)
        for lo, hi, _, _ in windows:
            c.injected += 1
            hit = next((e for e in events if lo <= e[0] <= hi), None)
            if hit is not None:
                c.found += 1
                c.kind_right += hit[1] is not None and hit[1] == _recovered(j.run, lo + SPIKE_MATCH_BEFORE)
        for start, _ in events:
            if not any(lo <= start <= end for lo, _, end, _ in windows):
                c.false_alarms += 1
        c.clean_steps += sum(1 for s in steps if not any(lo <= s <= end for lo, _, end, _ in windows))
    return c


def spike_table(judged: Sequence[Judged], lopo_loss: dict[str, float], lopo_grad: dict[str, float]) -> str:
    from train_telemetry.analysis.rules import spikes

    def ours_loss(j: Judged) -> list[tuple[int, bool | None]]:
        assert j.run is not None
        return [(s.start, s.recovered) for s in spikes.loss_spikes(j.run)]

    def ours_grad(j: Judged) -> list[tuple[int, bool | None]]:
        assert j.run is not None
        return [(s.start, s.recovered) for s in spikes.gradient_spikes(j.run)]

    def ours_lopo(code: str, chosen: dict[str, float], find: Callable[[Judged], list[tuple[int, bool | None]]]) -> Callable[[Judged], list[tuple[int, bool | None]]]:
        def detect(j: Judged) -> list[tuple[int, bool | None]]:
            with threshold(code, chosen.get(j.case.program, getattr(spikes, TUNABLE[code][1]))):
                return find(j)

        return detect

    def loss_series(j: Judged) -> list[tuple[int, float]]:
        assert j.run is not None
        return j.run.points(train_loss)

    def grad_series(j: Judged) -> list[tuple[int, float]]:
        assert j.run is not None
        return j.run.gradient_norm_series(OVERALL)

    def baseline(test: Callable[[Sequence[tuple[int, float]]], list[int]], series: Callable[[Judged], list[tuple[int, float]]]) -> Callable[[Judged], list[tuple[int, bool | None]]]:
        return lambda j: [(s, None) for s in _events(test(series(j)))]

    rows: list[tuple[str, str, Callable[[Judged], list[tuple[int, bool | None]]]]] = [
        ("ours: `loss_spike`", "train loss", ours_loss),
        ("ours: `loss_spike`, leave-one-program-out", "train loss", ours_lopo("loss_spike", lopo_loss, ours_loss)),
        ("llm-foundry: > 2x the mean of the previous 100 steps", "train loss", baseline(llm_foundry, loss_series)),
        ("Megatron: > 10x the max of the first 50 steps", "train loss", baseline(megatron, loss_series)),
        ("ours: `gradient_spike`", "gradient norm (pre-clip)", ours_grad),
        ("ours: `gradient_spike`, leave-one-program-out", "gradient norm (pre-clip)", ours_lopo("gradient_spike", lopo_grad, ours_grad)),
        ("ours: either rule", "both", lambda j: sorted(ours_loss(j) + ours_grad(j))),
        ("ZClip: z-score > 2.5 (EMA 0.97)", "gradient norm (pre-clip)", baseline(zclip, grad_series)),
        ("ZClip's z-score > 2.5 on the loss", "train loss", baseline(zclip, loss_series)),
    ]
    lines = [
        "| detector | series | spikes found (recall) | recovered / diverged told right | false alarms | per 10,000 clean steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, series_name, detect in rows:
        c = _spike_score(judged, detect)
        kind = f"{c.kind_right}/{c.found}" if name.startswith("ours") else "(not told)"
        rate = 1e4 * c.false_alarms / c.clean_steps if c.clean_steps else 0.0
        lines.append(
            f"| {name} | {series_name} | {_ratio(c.found, c.injected)} | {kind} | {c.false_alarms} | {rate:.1f} |"
        )
    c = _spike_score(judged, lambda j: [])
    lines.append(f"\n{c.injected} injected spikes; {c.clean_steps} clean steps (healthy runs, and spiked runs outside their spikes).")
    return "\n".join(lines)


def score(cases: Sequence[Case], root: Path) -> str:
    judged = judge(cases, root)
    failed = [f"- {j.case.name}: {j.error}" for j in judged if j.error]
    table, notes = rule_table(judged)
    _, lopo_loss = lopo("loss_spike", judged) if any(j.case.spikes for j in judged) else (None, {})
    _, lopo_grad = lopo("gradient_spike", judged) if any(j.case.spikes for j in judged) else (None, {})
    runs = [j for j in judged if j.run is not None]
    out = [
        f"\n## Per rule ({len(runs)} runs: {sum(j.case.bug == 'healthy' for j in runs)} healthy, "
        f"{sum(j.case.bug != 'healthy' for j in runs)} with a bug, over {len({j.case.program for j in runs})} programs)\n",
        table,
        "",
        *notes,
        "\n## Spikes\n",
        spike_table(judged, lopo_loss, lopo_grad),
    ]
    if failed:
        out += ["\n## Runs that failed to train\n", *failed]
    return "\n".join(out)


def details(judged: Sequence[Judged]) -> dict[str, Any]:
    """Every run's codes, for --json."""
    return {j.case.name: j.codes for j in judged}
