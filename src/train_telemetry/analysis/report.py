"""The report: a run's summary and diagnoses as data, and the text rendered from that data.

Runs in: any process that reads a run (no torch).

:func:`report_data` builds one JSON-able dict (what ``train-telemetry report --json``
prints); :func:`render_report` turns that dict, and nothing else, into the text report, so
the two always say the same thing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import UNSET

from train_telemetry.analysis.load import (
    GROUP_FAMILIES,
    OVERALL,
    PRE_CLIP,
    SEQUENCE_SCORED,
    UNASSIGNED,
    Run,
    TypedRecord,
    as_float,
    format_number,
    holdout_accuracy,
    holdout_chance,
    holdout_class_count,
    holdout_is_sequence,
    holdout_perplexity,
    number,
    train_accuracy,
    train_loss,
)
from train_telemetry.analysis.rules import Diagnosis, diagnose, is_serious
from train_telemetry.records import HoldoutLogits, to_strict_json_value

__all__ = ["render_report", "report_data", "report_json", "sparkline", "summarize"]

# A trend is drawn in at most this many characters: enough to show a shape on one line.
TREND_WIDTH = 24
# The text shows at most this many values per extra metric and this many layers; --json
# carries them all.
MAX_METRIC_ROWS = 10
MAX_LAYER_ROWS = 10
# A sequence holdout's per-example section names at most this many sequences that got worse;
# a many-class batch section this many of the most common labels (--json carries them all).
MAX_WORSE_EXAMPLES = 3
MAX_TOP_LABELS = 5
# A sequence's loss within 1% of where it was counts as unchanged: the holdout is evaluated
# deterministically, so this only hides changes too small to matter, not noise.
EXAMPLE_CHANGE_TOLERANCE = 0.01
# The per-layer table's columns: (family under ``layers``, heading).
LAYER_COLUMNS = (
    ("gradient_norm", "grad norm"),
    ("weight_norm", "weight norm"),
    ("update_ratio", "update/weight"),
)
_BARS = "▁▂▃▄▅▆▇█"
_ASCII_BARS = "_.-:=+*#"

_FAMILY_TITLES = {
    "gradient_norm": "gradient norm",
    "weight_delta": "weight delta",
    "update_ratio": "update/weight",
    "weight_norm": "weight norm",
    "lr": "learning rate",
}
# Norms and ratios span decades, so their trends are drawn on a log scale.
_LOG_FAMILIES = {"gradient_norm", "weight_delta", "update_ratio", "weight_norm", "lr"}


def _trend(values: Sequence[float], width: int = TREND_WIDTH) -> list[float]:
    """``values`` averaged into at most ``width`` buckets (non-finite values kept as NaN)."""
    if len(values) <= width:
        return list(values)
    out = []
    for b in range(width):
        chunk = values[b * len(values) // width : (b + 1) * len(values) // width]
        finite = [v for v in chunk if math.isfinite(v)]
        out.append(statistics.fmean(finite) if len(finite) == len(chunk) else math.nan)
    return out


def sparkline(
    values: Sequence[float | None], *, log: bool = False, ascii_only: bool = False
) -> str:
    """``values`` as one line of bar characters; '!' marks NaN/Inf, ' ' a missing value."""
    bars = _ASCII_BARS if ascii_only else _BARS

    def scale(v: float) -> float | None:
        if not math.isfinite(v):
            return None
        if log:
            return math.log10(v) if v > 0 else None
        return v

    scaled = [scale(v) if v is not None else None for v in values]
    known = [s for s in scaled if s is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 0.0)
    chars = []
    for v, s in zip(values, scaled, strict=True):
        if v is None:
            chars.append(" ")
        elif s is None:
            chars.append("!" if not math.isfinite(v) else bars[0])
        elif hi == lo:
            chars.append(bars[len(bars) // 2])
        else:
            chars.append(bars[min(len(bars) - 1, int((s - lo) / (hi - lo) * len(bars)))])
    return "".join(chars)


def _stats(series: Sequence[tuple[int, float]]) -> dict[str, Any] | None:
    if not series:
        return None
    values = [v for _, v in series]
    finite = [v for v in values if math.isfinite(v)]
    return {
        "n": len(values),
        "first": values[0],
        "last": values[-1],
        "first_step": series[0][0],
        "last_step": series[-1][0],
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
        "median": statistics.median(finite) if finite else None,
        "nonfinite": len(values) - len(finite),
        "trend": _trend(values),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {
        "median": statistics.median(finite),
        "p95": _percentile(finite, 0.95),
        "max": max(finite),
    }


def summarize(run: Run) -> dict[str, Any]:
    """What the run recorded, condensed: coverage, per-group trends, LRs, holdout, batches, cost."""
    meta = run.meta or {}
    steps = run.steps
    epochs = [r.epoch for r in run.records]
    groups = run.groups
    notes: list[str] = []

    per_group: dict[str, dict[str, Any]] = {}
    for group in [*groups, OVERALL]:
        entry: dict[str, dict[str, Any] | None] = {
            family: _stats(run.series(family, group)) for family in GROUP_FAMILIES
        }
        # Clipping caps the applied norm: the trend that shows spikes is the one before it.
        entry["gradient_norm"] = _stats(run.gradient_norm_series(group))
        if group != OVERALL:
            entry["lr"] = _stats(run.lr_series(group))
        per_group[group] = entry

    summary: dict[str, Any] = {
        "run": {
            "name": run.name,
            "path": str(run.path),
            "rank": run.rank,
            "records": len(run.records),
            "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None,
            "first_epoch": epochs[0] if epochs else None,
            "last_epoch": epochs[-1] if epochs else None,
            "seq_gaps": run.seq_gaps(),
            "segments": _segments(run),
            "resumes": run.resumes,
            "superseded": len(run.superseded),
            "collect_every_n": run.config.get("collect_every_n"),
            "started": meta.get("started"),
            "torch_version": meta.get("torch_version"),
            "pid": meta.get("pid"),
            "has_run_json": run.meta is not None,
            "has_summary_json": run.summary is not None,
            "torn_tail": run.torn_tail(),
            "group_sizes": meta.get("groups") if isinstance(meta.get("groups"), dict) else None,
        },
        "groups": per_group,
        "gradient_norm_source": run.gradient_norm_source(),
        "clipping": _clipping_summary(run),
        "unassigned": _unassigned_summary(run),
        "lr_ratios": _lr_ratios(run),
        "holdout": _holdout_summary(run),
        "train": {
            "loss": _stats(run.points(train_loss)),
            "accuracy": _stats(run.points(train_accuracy)),
        },
        "batches": _batch_summary(run),
        "telemetry": _telemetry_summary(run),
        "metrics": _metrics_summary(run),
        "layers": _layers_summary(run),
        "notes": notes,
    }
    if run.records and summary["train"]["loss"] is None and summary["train"]["accuracy"] is None:
        notes.append(
            "no train loss/accuracy recorded: pass loss= (and outputs=) to on_batch_end "
            "to let the report tell overfitting from no learning"
        )
    if run.records and summary["holdout"] is None:
        notes.append("no holdout recorded: call set_holdout_data() to track fixed examples")
    if run.meta is None:
        notes.append("no run.json: group sizes, config and expected LR ratios are unknown")
    return summary


def _segments(run: Run) -> list[dict[str, Any]]:
    """Each segment with records: number, first step and index, start time from run.json."""
    declared = (run.meta or {}).get("segments")
    started = {
        d.get("segment"): d.get("started")
        for d in (declared if isinstance(declared, list) else [])
        if isinstance(d, dict)
    }
    return [
        {"segment": s.segment, "first_step": s.first_step, "first_index": s.first_index,
         "started": started.get(s.segment)}
        for s in run.segments
    ]


def _leaf_stats(series: Sequence[tuple[int, float]]) -> dict[str, Any]:
    finite = [v for _, v in series if math.isfinite(v)]
    return {
        "n": len(series),
        "first": series[0][1],
        "last": series[-1][1],
        "last_step": series[-1][0],
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
        "nonfinite": len(series) - len(finite),
    }


def _metrics_summary(run: Run) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric key: {leaf path: first/last/min/max}} for every key without a section of its own."""
    out = {}
    for key in run.metric_keys():
        leaves = {path: _leaf_stats(series) for path, series in run.leaf_series(key).items()}
        if leaves:
            out[key] = leaves
    return out


def _layers_summary(run: Run) -> dict[str, Any] | None:
    """The last record's ``layers`` breakdown: one row per module, in model order."""
    for i in range(len(run.records) - 1, -1, -1):
        if layers := run.records[i].layers:
            break
    else:
        return None
    modules = list(dict.fromkeys(m for values in layers.values() for m in values))
    rows = [{"layer": m, **{f: v.get(m) for f, v in layers.items()}} for m in modules]
    return {"step": run.step(i), "layers": len(rows), "rows": rows}


def _rank_key(value: float | None) -> tuple[int, float]:
    """Sort largest first, with NaN/Inf ahead of every number and missing values last."""
    if value is None:
        return (2, 0.0)
    if not math.isfinite(value):
        return (0, 0.0)
    return (1, -value)


def _lr_ratios(run: Run) -> dict[str, Any] | None:
    lrs = run.median_lrs()
    if len(lrs) < 2:
        return None
    # run.json has no schema (a config written by any version): its values are checked here.
    expected = run.config.get("expected_lr_ratios")
    expected = expected if isinstance(expected, dict) else None
    candidates = [g for g in lrs if lrs[g] > 0]
    if expected:
        known = [g for g in candidates if number(expected.get(g))]
        candidates = known or candidates
        ref = (
            min(candidates, key=lambda g: float(expected[g]) if g in expected else math.inf)
            if candidates
            else None
        )
    else:
        ref = min(candidates, key=lambda g: lrs[g]) if candidates else None
    if ref is None:
        return None
    return {
        "reference": ref,
        "median_lr": lrs,
        "observed": {g: lrs[g] / lrs[ref] for g in lrs},
        "expected": (
            {g: float(expected[g]) / float(expected[ref]) for g in expected if number(expected[g])}
            if expected and number(expected.get(ref))
            else None
        ),
    }


def _clipping_summary(run: Run) -> dict[str, Any] | None:
    """How clipping acted: max_norm, and in how many records the pre-clip norm exceeded it."""
    source = run.gradient_norm_source()
    if source == "gradient_norm":
        return None
    max_norm = run.clip_max_norm()
    pre = [v for _, v in run.gradient_norm_series(OVERALL)]
    return {
        "source": source,
        "max_norm": max_norm,
        "records": len(pre),
        "clipped": sum(1 for v in pre if max_norm is not None and v > max_norm),
        "pre_clip_max": max((v for v in pre if math.isfinite(v)), default=None),
    }


def _unassigned_summary(run: Run) -> dict[str, Any] | None:
    """The parameters in no optimizer group: frozen by design unless gradients reach them."""
    if UNASSIGNED not in run.groups:
        return None
    grads = run.series("gradient_norm", UNASSIGNED, finite=True)
    sizes = (run.meta or {}).get("groups")
    size = sizes.get(UNASSIGNED) if isinstance(sizes, dict) else None
    return {
        "num_params": size.get("num_params") if isinstance(size, dict) else None,
        "gradient_records": sum(1 for _, v in grads if v != 0),
    }


def _example_changes(holdout: list[tuple[int, TypedRecord, HoldoutLogits]]) -> dict[str, Any] | None:
    """Each holdout sequence's mean loss at the first and at the last record: how many got
    better and worse, and the ones that got worse most."""
    lists = [(s, h.example_loss) for s, _, h in holdout if h.example_loss is not UNSET]
    if len(lists) < 2:
        return None
    last_step, last = lists[-1]
    # The holdout is fixed, so the lists line up; a run resumed with another holdout does not.
    first_step, first = next((s, v) for s, v in lists if len(v) == len(last))
    if first_step == last_step:
        return None
    pairs = [
        (i, a, b)
        for i, (a, b) in enumerate(zip(first, last, strict=True))
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    if not pairs:
        return None
    worse = [(i, a, b) for i, a, b in pairs if b > a + EXAMPLE_CHANGE_TOLERANCE * abs(a)]
    better = [(i, a, b) for i, a, b in pairs if b < a - EXAMPLE_CHANGE_TOLERANCE * abs(a)]
    return {
        "first_step": first_step,
        "last_step": last_step,
        "compared": len(pairs),
        "better": len(better),
        "worse": len(worse),
        "unchanged": len(pairs) - len(better) - len(worse),
        "median_change": statistics.median(b - a for _, a, b in pairs),
        "worst": [
            {"example": i, "first": a, "last": b}
            for i, a, b in sorted(worse, key=lambda e: e[1] - e[2])
        ],
    }


def _best(series: Sequence[tuple[int, float]], lowest: bool) -> tuple[int, float] | None:
    finite = [sv for sv in series if math.isfinite(sv[1])]
    if not finite:
        return None
    return min(finite, key=lambda sv: sv[1]) if lowest else max(finite, key=lambda sv: sv[1])


def _sequence_holdout_summary(holdout: list[tuple[int, TypedRecord, HoldoutLogits]]) -> dict[str, Any]:
    """A token holdout's summary: per-token loss, accuracy and perplexity, and per sequence."""
    last = holdout[-1][2]
    accs = [(s, v) for s, _, h in holdout if (v := holdout_accuracy(h)) is not None]
    losses = [(s, v) for s, _, h in holdout if (v := h.loss) is not None]
    ppl = [(s, v) for s, _, h in holdout if (v := holdout_perplexity(h)) is not None]
    best_acc, best_loss, best_ppl = _best(accs, False), _best(losses, True), _best(ppl, True)
    return {
        "kind": "sequence",
        "examples": len(last.example_loss) if last.example_loss is not UNSET else None,
        "tokens": last.tokens if last.tokens is not UNSET else None,
        "scored": last.scored if last.scored is not UNSET else None,
        "classes": None,
        "chance": None,
        "accuracy": _stats(accs),
        "best_accuracy": best_acc[1] if best_acc else None,
        "best_step": best_acc[0] if best_acc else None,
        "loss": _stats(losses),
        "best_loss": best_loss[1] if best_loss else None,
        "best_loss_step": best_loss[0] if best_loss else None,
        "perplexity": _stats(ppl),
        "best_perplexity": best_ppl[1] if best_ppl else None,
        "best_perplexity_step": best_ppl[0] if best_ppl else None,
        "per_example": _example_changes(holdout),
    }


def _holdout_summary(run: Run) -> dict[str, Any] | None:
    holdout = run.holdout()
    if not holdout:
        return None
    last = holdout[-1][2]
    if holdout_is_sequence(last):
        return _sequence_holdout_summary(holdout)
    chance, n = holdout_chance(last)
    accs = [(s, v) for s, _, h in holdout if (v := holdout_accuracy(h)) is not None]
    best = max((a for a in accs if math.isfinite(a[1])), key=lambda a: a[1], default=None)
    return {
        "kind": "classes",
        "examples": n,
        "classes": holdout_class_count(last),
        "chance": chance,
        "accuracy": _stats(accs),
        "best_accuracy": best[1] if best else None,
        "best_step": best[0] if best else None,
        "loss": _stats([(s, v) for s, _, h in holdout if (v := h.loss) is not None]),
    }


def _range(values: Sequence[float]) -> dict[str, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {"mean": statistics.fmean(finite), "min": min(finite), "max": max(finite)}


def _token_batch_summary(run: Run) -> dict[str, Any] | None:
    """Many-class labels (token ids): tokens per batch, ignored share, distinct labels, and
    the most common labels, instead of a share per class (a vocabulary has thousands)."""
    batches = run.token_batches()
    if not batches:
        return None

    def values(key: str) -> list[float]:
        return [v for _, stats, _ in batches if (v := as_float(stats.get(key))) is not None]

    sizes = values("batch_size")
    tokens = values("tokens")
    # Pooled by each batch's tokens; a label outside a batch's top 5 counts 0 there, so
    # these shares are lower bounds.
    weights = [as_float(stats.get("tokens")) or 1.0 for _, stats, _ in batches]
    pooled: dict[str, float] = {}
    for (_, _, top), w in zip(batches, weights, strict=True):
        for label, pct in top.items():
            pooled[label] = pooled.get(label, 0.0) + pct * w
    total = sum(weights) or 1.0
    top_labels = dict(
        sorted(((k, v / total) for k, v in pooled.items()), key=lambda kv: -kv[1])
    )
    return {
        "kind": "tokens",
        "label_key": run.batch_label(),
        "records": len(batches),
        "batch_size": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}
        if sizes
        else None,
        "tokens": _range(tokens),
        "ignored_pct": _range(values("ignored_pct")),
        "distinct_labels": _range(values("distinct_labels")),
        "top_label_pct": top_labels,
    }


def _batch_summary(run: Run) -> dict[str, Any] | None:
    batches = run.batch_classes()
    if not batches:
        return _token_batch_summary(run)
    sizes = [bs for _, _, bs in batches if bs]
    # A label per token (token classification) also counts tokens and ignored labels.
    token_stats = [stats for r in run.records if (stats := r.batch_stats) and "tokens" in stats]
    tokens = {
        "tokens": _range([v for st in token_stats if (v := as_float(st.get("tokens"))) is not None]),
        "ignored_pct": _range(
            [v for st in token_stats if (v := as_float(st.get("ignored_pct"))) is not None]
        ),
    } if token_stats else {}
    return tokens | {
        "kind": "classes",
        "label_key": run.batch_label(),
        "records": len(batches),
        "batch_size": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}
        if sizes
        else None,
        "class_pct": {c: 100 * share for c, share in run.class_shares().items()},
        "single_class_batches": sum(
            1 for _, cs, _ in batches if sum(1 for p in cs.values() if p > 0) == 1
        ),
    }


def _telemetry_summary(run: Run) -> dict[str, Any]:
    summary = run.summary or {}
    costs = [cost for _, cost in run.costs()]
    errors = summary.get("errors")
    return {
        "hook_ms": _spread([c.hook_ms for c in costs if c.hook_ms is not None]),
        "worker_lag_ms": _spread([c.worker_lag_ms for c in costs if c.worker_lag_ms is not None]),
        "dropped": max((c.dropped_total for c in costs), default=0),
        "records_written": summary.get("records_written"),
        "snapshots_taken": summary.get("snapshots_taken"),
        "snapshots_dropped": summary.get("snapshots_dropped"),
        "snapshots_skipped": summary.get("snapshots_skipped"),
        "overhead": summary.get("overhead"),  # measured by the overhead budget (budget.py)
        "errors": errors if isinstance(errors, dict) else {},
        "record_errors": sum(len(r.errors or []) for r in run.records),
        "clean": summary.get("clean"),
        "worker_exitcode": summary.get("worker_exitcode"),
        "worker_restarts": run.worker_restarts,
        "records_after_restart": run.records_after_restart(),
        # who built the records: "worker", "trainer" (inline) or both (a resumed run that changed)
        "built_by": sorted({c.built_by for c in costs if c.built_by}),
        "mode_reason": (run.meta or {}).get("mode_reason"),
    }


def report_data(run: Run, *, finished: bool = True) -> dict[str, Any]:
    """The whole report as one JSON-able dict: summary, diagnoses, and whether any is serious."""
    diagnoses = diagnose(run, finished=finished)
    return _assemble(run, diagnoses)


def _assemble(run: Run, diagnoses: list[Diagnosis]) -> dict[str, Any]:
    return {
        "summary": summarize(run),
        "diagnoses": [d.to_dict() for d in diagnoses],
        "serious": is_serious(diagnoses),
    }


def report_json(data: dict[str, Any] | list[dict[str, Any]]) -> str:
    """Strict JSON text of report data (NaN/Inf as the strings records.py uses)."""
    return json.dumps(to_strict_json_value(data), indent=2, allow_nan=False)


# --- text ----------------------------------------------------------------------------------


def _evidence_lines(evidence: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for e in evidence:
        values = ", ".join(
            f"{k}={'none' if v is None else format_number(v)}" for k, v in e["values"].items()
        )
        where = f"step {e['step']}" if e["step"] is not None else ""
        if e.get("batch_idx") is not None and e["batch_idx"] != e["step"]:
            where += f" (epoch {e['epoch']}, batch {e['batch_idx']})"
        lines.append(f"             {where}: {values}" if where else f"             {values}")
    return lines


def render_report(data: dict[str, Any], *, ascii_only: bool = False) -> str:
    """The text report of :func:`report_data`'s dict: summary tables, then the diagnoses."""
    s = data["summary"]
    run = s["run"]
    lines: list[str] = []
    add = lines.append
    add(f"Run {run['name']}  ({run['path']})")
    if not run["records"]:
        add("  no records yet")
    else:
        epochs = (
            f" (epochs {run['first_epoch']} .. {run['last_epoch']})"
            if run["first_epoch"] is not None
            else ""
        )
        every = (
            f", collected every {run['collect_every_n']} steps" if run["collect_every_n"] else ""
        )
        add(
            f"  steps {run['first_step']} .. {run['last_step']}{epochs}: {run['records']} records{every}"
        )
    origin = [
        f"started {run['started']}" if run["started"] else None,
        f"torch {run['torch_version']}" if run["torch_version"] else None,
        f"pid {run['pid']}" if run["pid"] else None,
    ]
    if any(origin):
        add("  " + ", ".join(o for o in origin if o))
    tel = s["telemetry"]
    if not run["has_summary_json"]:
        add("  status: no summary.json (crashed, killed, or still running)")
    else:
        add(
            "  status: "
            + ("stopped cleanly" if tel["clean"] else "stop was NOT clean")
            + (
                f", worker exit code {tel['worker_exitcode']}"
                if tel["worker_exitcode"] not in (None, 0)
                else ""
            )
        )
    if run["torn_tail"]:
        add("  the records file ends in a torn line (skipped)")
    if run.get("resumes"):
        steps = ", ".join(str(step) for step in run["resumes"])
        add(
            f"  {len(run['segments'])} segments: resumed at step{'s' if len(run['resumes']) > 1 else ''} "
            f"{steps}; {run['superseded']} earlier records superseded by the resumed run"
        )
    # A NaN/Inf outranks every table below: where it came from leads (rules/nonfinite.py).
    for d in data["diagnoses"]:
        if d["code"] == "nonfinite":
            add(f"  !! {d['title']}")

    lines.extend(_group_table(s, ascii_only=ascii_only))
    lines.extend(_holdout_lines(s, ascii_only=ascii_only))
    lines.extend(_batch_lines(s))
    lines.extend(_layer_lines(s.get("layers")))
    lines.extend(_replica_lines((s.get("metrics") or {}).get("replicas")))
    lines.extend(_metric_lines(s.get("metrics") or {}, skip={"replicas", *(["layers"] if s.get("layers") else [])}))
    lines.extend(_telemetry_lines(s))
    for note in s["notes"]:
        add(f"note: {note}")
    add("")
    lines.extend(render_diagnoses(data["diagnoses"]))
    return "\n".join(lines) + "\n"


def render_diagnoses(diagnoses: Sequence[dict[str, Any]]) -> list[str]:
    """The diagnoses section: a count line, then each with its evidence and hint."""
    if not diagnoses:
        return ["Diagnoses: none (no problems found)"]
    counts = {
        sev: sum(1 for d in diagnoses if d["severity"] == sev)
        for sev in ("serious", "warning", "info")
    }
    head = ", ".join(f"{n} {sev}" for sev, n in counts.items() if n)
    lines = [f"Diagnoses ({head}):"]
    for d in diagnoses:
        lines.append(f"  {d['severity'].upper():8} {d['code']}: {d['title']}")
        lines.append(f"           hint: {d['hint']}")
        if d["evidence"]:
            lines.append("           evidence:")
            lines.extend(_evidence_lines(d["evidence"]))
    return lines


def _row(label: str, stats: dict[str, Any] | None, family: str, ascii_only: bool) -> str:
    if stats is None:
        return f"    {label:<14} -"
    trend = sparkline(stats["trend"], log=family in _LOG_FAMILIES, ascii_only=ascii_only)
    return (
        f"    {label:<14} {format_number(stats['first']):>10} {format_number(stats['last']):>10} "
        f"{format_number(stats['median']):>10} {format_number(stats['min']):>10} "
        f"{format_number(stats['max']):>10}  {trend}"
    )


def _group_table(s: dict[str, Any], *, ascii_only: bool) -> list[str]:
    groups: dict[str, dict[str, Any]] = s["groups"]
    lines = [
        "",
        f"  {'per group':<18} {'first':>10} {'last':>10} {'median':>10} {'min':>10} {'max':>10}  trend",
    ]
    for family in (*GROUP_FAMILIES, "lr"):
        rows = [(g, stats[family]) for g, stats in groups.items() if stats.get(family) is not None]
        if not rows:
            continue
        title = _FAMILY_TITLES[family]
        if family == "gradient_norm" and s.get("gradient_norm_source", "gradient_norm") != "gradient_norm":
            title += " (pre-clip)"
        lines.append(f"  {title}")
        lines.extend(_row(g, st, family, ascii_only) for g, st in rows)
    ratios = s["lr_ratios"]
    if ratios:
        ref = ratios["reference"]
        parts = []
        for g, r in ratios["observed"].items():
            if g == ref:
                continue
            exp = (ratios["expected"] or {}).get(g)
            parts.append(
                f"{g} {format_number(r)}x" + (f" (expected {format_number(exp)}x)" if exp else "")
            )
        if parts:
            lines.append(f"  LR relative to '{ref}': " + ", ".join(parts))
    sizes = s["run"]["group_sizes"]
    if sizes:
        lines.append(
            "  parameters: "
            + ", ".join(
                f"{g} {format_number(v.get('num_params'))}"
                for g, v in sizes.items()
                if isinstance(v, dict)
            )
        )
    lines.extend(_clipping_lines(s.get("clipping")))
    unassigned = s.get("unassigned")
    if unassigned:
        lines.append(
            f"  '{UNASSIGNED}': parameters not in any optimizer group (frozen)"
            + (
                f"; yet gradients reached them in {unassigned['gradient_records']} records"
                if unassigned["gradient_records"]
                else ""
            )
        )
    return lines


def _clipping_lines(clip: Mapping[str, Any] | None) -> list[str]:
    if not clip:
        return []
    source = "gradient_norm_pre_clip" if clip["source"] == PRE_CLIP else clip["source"]
    if clip["max_norm"] is None:
        return [f"  clipping: gradient norms above are before clipping (from {source})"]
    return [
        f"  clipping at max_norm {format_number(clip['max_norm'])}: {clip['clipped']} of "
        f"{clip['records']} records clipped, pre-clip norm up to {format_number(clip['pre_clip_max'])} "
        f"(from {source}; 'gradient_norm' holds the applied norms)"
    ]


def _first_last_best(
    label: str, stats: Mapping[str, Any], best: Any, step: Any, trend: str, digits: int = 3
) -> str:
    def fmt(value: Any) -> str:
        return format_number(value, digits)

    best_text = f" (best {fmt(best)} at step {step})" if step is not None else ""
    return f"    {label:<19} {fmt(stats['first'])} -> {fmt(stats['last'])}{best_text}  {trend}"


def _sequence_holdout_lines(h: Mapping[str, Any], *, ascii_only: bool) -> list[str]:
    parts = []
    if h["examples"] is not None:
        parts.append(f"{h['examples']} sequences")
    if h["tokens"] is not None:
        parts.append(f"{h['tokens']} tokens scored")
    lines = ["", "  holdout (" + ", ".join(parts) + ")" if parts else "  holdout"]
    if h["scored"]:
        lines.append(f"    scored: {SEQUENCE_SCORED.get(h['scored'], h['scored'])}")
    if h["loss"]:
        lines.append(_first_last_best(
            "per-token loss", h["loss"], h["best_loss"], h["best_loss_step"],
            sparkline(h["loss"]["trend"], ascii_only=ascii_only),
            # An LM's loss moves in its second decimal over a fine-tune: 3 digits hide it.
            digits=4,
        ))
    if h["perplexity"]:
        lines.append(_first_last_best(
            "perplexity", h["perplexity"], h["best_perplexity"], h["best_perplexity_step"],
            sparkline(h["perplexity"]["trend"], log=True, ascii_only=ascii_only),
        ))
    if h["accuracy"]:
        lines.append(_first_last_best(
            "per-token accuracy", h["accuracy"], h["best_accuracy"], h["best_step"],
            sparkline(h["accuracy"]["trend"], ascii_only=ascii_only),
        ))
    ex = h.get("per_example")
    if ex:
        lines.append(
            f"    per sequence, step {ex['first_step']} -> {ex['last_step']}: {ex['better']} better, "
            f"{ex['worse']} worse, {ex['unchanged']} unchanged of {ex['compared']} "
            f"(median loss change {format_number(ex['median_change'])})"
        )
        worst = ex["worst"][:MAX_WORSE_EXAMPLES]
        if worst:
            lines.append(
                "      worse most: "
                + ", ".join(
                    f"#{w['example']} {format_number(w['first'])} -> {format_number(w['last'])}"
                    for w in worst
                )
            )
    return lines


def _holdout_lines(s: dict[str, Any], *, ascii_only: bool) -> list[str]:
    lines: list[str] = []
    h = s["holdout"]
    if h and h.get("kind") == "sequence":
        lines.extend(_sequence_holdout_lines(h, ascii_only=ascii_only))
    elif h:
        lines.append("")
        lines.append(
            f"  holdout ({h['examples']} examples, {h['classes']} classes, chance {format_number(h['chance'])})"
        )
        acc = h["accuracy"]
        if acc:
            best = (
                f" (best {format_number(h['best_accuracy'])} at step {h['best_step']})"
                if h["best_step"] is not None
                else ""
            )
            lines.append(
                f"    accuracy {format_number(acc['first'])} -> {format_number(acc['last'])}{best}  "
                + sparkline(acc["trend"], ascii_only=ascii_only)
            )
        if h["loss"]:
            lines.append(
                f"    loss     {format_number(h['loss']['first'])} -> {format_number(h['loss']['last'])}  "
                + sparkline(h["loss"]["trend"], ascii_only=ascii_only)
            )
    t = s["train"]
    if t["loss"] or t["accuracy"]:
        lines.append("  train batches")
        for key in ("loss", "accuracy"):
            st = t[key]
            if st:
                lines.append(
                    f"    {key:<8} {format_number(st['first'])} -> {format_number(st['last'])} "
                    f"(median {format_number(st['median'])})  "
                    + sparkline(st["trend"], ascii_only=ascii_only)
                )
    return lines


def _count_range(r: Mapping[str, float] | None, unit: str = "") -> str:
    if not r:
        return "-"
    span = f" ({r['min']:.0f}{unit}..{r['max']:.0f}{unit})" if r["min"] != r["max"] else ""
    return f"{r['mean']:.0f}{unit} mean{span}"


def _median_range(r: Mapping[str, float]) -> str:
    """``32`` or ``32 (16..32)``: a median, and the range when it varies."""
    span = f" ({format_number(r['min'])}..{format_number(r['max'])})" if r["min"] != r["max"] else ""
    return f"{format_number(r['median'])}{span}"


def _token_batch_lines(b: Mapping[str, Any]) -> list[str]:
    size = b["batch_size"]
    size_text = f"{_median_range(size)} sequences per batch" if size else "batch size unknown"
    label = f"'{b['label_key']}', " if b["label_key"] else ""
    ignored = b["ignored_pct"]
    ignored_text = (
        f"{ignored['mean']:.1f}% mean"
        + (f" ({ignored['min']:.1f}..{ignored['max']:.1f}%)" if ignored["min"] != ignored["max"] else "")
        if ignored
        else "-"
    )
    lines = [
        "",
        f"  batch tokens ({label}{size_text}, {b['records']} batches recorded)",
        f"    labelled tokens per batch {_count_range(b['tokens'])}; ignored (label < 0) {ignored_text}",
        f"    distinct labels per batch {_count_range(b['distinct_labels'])}",
    ]
    top = list(b["top_label_pct"].items())[:MAX_TOP_LABELS]
    if top:
        lines.append(
            "    most common labels (each batch's top 5, pooled): "
            + "  ".join(f"{label_id}: {pct:.1f}%" for label_id, pct in top)
        )
    return lines


def _batch_lines(s: dict[str, Any]) -> list[str]:
    b = s["batches"]
    if not b:
        return []
    if b.get("kind") == "tokens":
        return _token_batch_lines(b)
    size = b["batch_size"]
    size_text = f"batch size {_median_range(size)}" if size else "batch size unknown"
    label = f"'{b['label_key']}', " if b["label_key"] else ""
    lines = ["", f"  batch balance ({label}{size_text}, {b['records']} batches recorded)"]
    if b.get("tokens"):
        ignored = b.get("ignored_pct")
        lines.append(
            f"    labelled tokens per batch {_count_range(b['tokens'])}"
            + (f"; ignored (label < 0) {ignored['mean']:.1f}% mean" if ignored else "")
        )
    shares = [f"{c}: {v:.1f}%" for c, v in b["class_pct"].items()]
    for i in range(0, len(shares), 8):
        lines.append("    " + "  ".join(shares[i : i + 8]))
    lines.append(f"    single-class batches: {b['single_class_batches']} of {b['records']}")
    return lines


def _telemetry_lines(s: dict[str, Any]) -> list[str]:
    t = s["telemetry"]
    parts = []
    # inline, the "lag" from snapshot to record is the record's building on the training thread
    lag = "build on the training thread" if t.get("built_by") == ["trainer"] else "worker lag"
    for key, label in (("hook_ms", "hook"), ("worker_lag_ms", lag)):
        v = t[key]
        if v:
            parts.append(
                f"{label} {format_number(v['median'])} ms median, {format_number(v['p95'])} p95, "
                f"{format_number(v['max'])} max"
            )
    counts = []
    if t["snapshots_taken"] is not None:
        counts.append(f"{t['snapshots_taken']} snapshots taken")
    if t["records_written"] is not None:
        counts.append(f"{t['records_written']} records written")
    # The counts from summary.json (no schema) may be missing or of any type.
    dropped = max(t["dropped"], number(t["snapshots_dropped"]) or 0)
    counts.append(f"{int(dropped)} dropped")
    errors = sum(int(v) for v in t["errors"].values() if number(v)) or t["record_errors"]
    counts.append(f"{errors} metric errors")
    lines = ["", "  telemetry: " + ", ".join(counts)]
    built = t.get("built_by") or []
    if built:
        where = " and ".join("the worker process" if b == "worker" else "the training thread (inline)" for b in built)
        reason = t.get("mode_reason")
        lines.append(f"    records built by {where}" + (f": {reason}" if reason and built == ["trainer"] else ""))
    if parts:
        lines.append("    " + "; ".join(parts))
    lines += _cost_lines(t)
    restarts = t.get("worker_restarts") or 0
    if restarts:
        after = t.get("records_after_restart") or 0
        taken, written = t["snapshots_taken"], t["records_written"]
        lost = (
            "; nothing lost"
            if taken is not None and taken == written
            else f"; {int(number(taken) or 0) - int(number(written) or 0)} snapshots not written"
            if number(taken) is not None and number(written) is not None
            else ""
        )
        lines.append(
            f"    worker restarted {restarts} time{'s' if restarts != 1 else ''}"
            f" ({after} records written after a restart){lost}"
        )
    return lines


def _cost_lines(t: Mapping[str, Any]) -> list[str]:
    """What telemetry cost the run (the budget's measurement) and the share of due collections kept."""
    overhead, taken, dropped = number(t.get("overhead")), number(t.get("snapshots_taken")), number(t.get("snapshots_dropped"))
    out = []
    if overhead is not None:  # below 0.5% (or below 0: step times drifting) it is not told from noise
        slower = f"{100 * overhead:.1f}% slower" if overhead >= 0.005 else "not measurably slower"
        out.append(f"training steps {slower} than without telemetry (measured from step times)")
    if taken is not None and dropped is not None and taken + dropped > 0:
        skipped = int(number(t.get("snapshots_skipped")) or 0)
        why = f", {skipped} skipped to stay within overhead_budget" if skipped else ""
        out.append(f"{100 * taken / (taken + dropped):.0f}% of due collections recorded{why}")
    return ["    cost: " + "; ".join(out)] if out else []


def _layer_lines(layers: Mapping[str, Any] | None) -> list[str]:
    if not layers:
        return []
    rows = sorted(layers["rows"], key=lambda r: _rank_key(r.get("gradient_norm")))
    shown = rows[:MAX_LAYER_ROWS]
    width = max(14, min(40, max(len(r["layer"]) for r in shown)))
    scope = f"top {len(shown)} of {len(rows)} by gradient norm" if len(rows) > len(shown) else "by gradient norm"
    lines = [
        "",
        f"  per layer at step {layers['step']} ({scope})",
        f"    {'layer':<{width}} " + " ".join(f"{head:>13}" for _, head in LAYER_COLUMNS),
    ]
    for row in shown:
        values = " ".join(f"{format_number(row.get(family)):>13}" for family, _ in LAYER_COLUMNS)
        lines.append(f"    {row['layer']:<{width}} {values}")
    return lines


def _replica_lines(leaves: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """The replica check (DDP, HSDP) in one line: how many ranks, and whether they stayed equal."""
    if not leaves or "compared" not in leaves:
        return []
    ranks = format_number(leaves["compared"]["max"])
    spread = number(leaves.get("max_rel_spread", {}).get("max"))
    missing = number(leaves.get("not_compared", {}).get("max")) or 0
    verdict = ("their weights equal at every collection" if not spread
               else f"their weights differ (relative spread up to {format_number(spread)}: replica_divergence below)")
    extra = f"; up to {format_number(missing)} ranks could not be compared" if missing else ""
    return ["", f"  replicas: {ranks} ranks that should hold the same weights compared, {verdict}{extra}"]


def _metric_lines(metrics: Mapping[str, Mapping[str, Any]], skip: set[str]) -> list[str]:
    """Each extra metric's values: first, last, min, max; the largest last values when many."""
    shown = {k: v for k, v in metrics.items() if k not in skip}
    if not shown:
        return []
    lines = ["", f"  {'other metrics':<32} {'first':>10} {'last':>10} {'min':>10} {'max':>10}"]
    for key, leaves in shown.items():
        paths = list(leaves)
        if len(paths) > MAX_METRIC_ROWS:
            paths = sorted(paths, key=lambda p: _rank_key(leaves[p]["last"]))[:MAX_METRIC_ROWS]
            lines.append(f"  {key} ({len(leaves)} values; the {len(paths)} largest last values, all in --json)")
        else:
            lines.append(f"  {key}")
        for path in paths:
            st = leaves[path]
            label = path if len(path) <= 30 else "..." + path[-27:]
            lines.append(
                f"    {label:<30} {format_number(st['first']):>10} {format_number(st['last']):>10} "
                f"{format_number(st['min']):>10} {format_number(st['max']):>10}"
            )
    return lines
