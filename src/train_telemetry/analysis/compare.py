"""Several runs side by side: the key figures of each report in columns, then each run's diagnoses.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from train_telemetry.analysis.load import format_number
from train_telemetry.analysis.report import render_diagnoses

__all__ = ["render_comparison"]

# Column width bounds: names longer than this are cut so that 3-4 runs fit a terminal.
_MIN_COLUMN = 12
_MAX_COLUMN = 28


def _get(data: dict[str, Any], *path: str) -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _stat(*path: str, field: str) -> Callable[[dict[str, Any]], str]:
    def cell(data: dict[str, Any]) -> str:
        stats = _get(data["summary"], *path)
        return format_number(stats.get(field)) if isinstance(stats, dict) else "-"

    return cell


def _first_last(*path: str) -> Callable[[dict[str, Any]], str]:
    def cell(data: dict[str, Any]) -> str:
        stats = _get(data["summary"], *path)
        if not isinstance(stats, dict):
            return "-"
        return f"{format_number(stats.get('first'))} -> {format_number(stats.get('last'))}"

    return cell


def _rows(reports: Sequence[dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    def steps(d: dict[str, Any]) -> str:
        run = d["summary"]["run"]
        return f"{run['first_step']}..{run['last_step']}" if run["records"] else "-"

    def best(d: dict[str, Any]) -> str:
        h = d["summary"]["holdout"]
        return (
            f"{format_number(h['best_accuracy'])} @ {h['best_step']}"
            if h and h["best_step"] is not None
            else "-"
        )

    def chance(d: dict[str, Any]) -> str:
        h = d["summary"]["holdout"]
        return format_number(h["chance"]) if h else "-"

    def lr_ratio(group: str) -> Callable[[dict[str, Any]], str]:
        def cell(d: dict[str, Any]) -> str:
            ratios = d["summary"]["lr_ratios"]
            if not ratios or group not in ratios["observed"]:
                return "-"
            exp = (ratios["expected"] or {}).get(group)
            return f"{format_number(ratios['observed'][group])}x" + (
                f" (want {format_number(exp)}x)" if exp else ""
            )

        return cell

    def resumed(d: dict[str, Any]) -> str:
        return ", ".join(str(step) for step in d["summary"]["run"].get("resumes") or []) or "-"

    def dropped(d: dict[str, Any]) -> str:
        return str(d["summary"]["telemetry"]["dropped"])

    def codes(severity: str) -> Callable[[dict[str, Any]], str]:
        def cell(d: dict[str, Any]) -> str:
            found = [x["code"] for x in d["diagnoses"] if x["severity"] == severity]
            return ", ".join(dict.fromkeys(found)) or "-"

        return cell

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("records", lambda d: str(d["summary"]["run"]["records"])),
        ("steps", steps),
    ]
    if any(d["summary"]["run"].get("resumes") for d in reports):
        rows.append(("resumed at", resumed))
    rows += [
        ("holdout acc", _first_last("holdout", "accuracy")),
        ("holdout best", best),
        ("chance", chance),
        ("holdout loss", _first_last("holdout", "loss")),
    ]
    if any(_get(d["summary"], "holdout", "perplexity") for d in reports):  # token holdouts
        rows.append(("holdout perplexity", _first_last("holdout", "perplexity")))
    rows += [
        ("train loss", _first_last("train", "loss")),
        ("train acc", _first_last("train", "accuracy")),
    ]
    groups = list(dict.fromkeys(g for d in reports for g in d["summary"]["groups"]))
    for family, label in (
        ("gradient_norm", "grad norm"),
        ("weight_delta", "weight delta"),
        ("update_ratio", "update ratio"),
        ("lr", "lr"),
    ):
        for group in groups:
            if any(_get(d["summary"], "groups", group, family) for d in reports):
                rows.append(
                    (f"{label} {group} (median)", _stat("groups", group, family, field="median"))
                )
    ratio_groups = list(
        dict.fromkeys(
            g
            for d in reports
            if d["summary"]["lr_ratios"]
            for g in d["summary"]["lr_ratios"]["observed"]
            if g != d["summary"]["lr_ratios"]["reference"]
        )
    )
    rows.extend((f"lr ratio {g}", lr_ratio(g)) for g in ratio_groups)
    rows.extend(
        [
            ("hook ms (median)", _stat("telemetry", "hook_ms", field="median")),
            ("dropped", dropped),
            ("serious", codes("serious")),
            ("warnings", codes("warning")),
        ]
    )
    return rows


def render_comparison(reports: Sequence[dict[str, Any]]) -> str:
    """Text table of :func:`~train_telemetry.analysis.report.report_data` dicts, one column per run."""
    names = [d["summary"]["run"]["name"] for d in reports]
    rows = [(label, [cell(d) for d in reports]) for label, cell in _rows(reports)]
    label_width = max(len(label) for label, _ in rows)
    widths = [
        min(_MAX_COLUMN, max(_MIN_COLUMN, len(name), *(len(cells[i]) for _, cells in rows)))
        for i, name in enumerate(names)
    ]

    def line(label: str, cells: Sequence[str]) -> str:
        parts = [
            c if len(c) <= w else c[: w - 3] + "..." for c, w in zip(cells, widths, strict=True)
        ]
        cells_text = "  ".join(f"{p:<{w}}" for p, w in zip(parts, widths, strict=True))
        return f"{label:<{label_width}}  {cells_text}".rstrip()

    lines = [line("", names), line("", ["-" * w for w in widths])]
    lines.extend(line(label, cells) for label, cells in rows)
    for name, data in zip(names, reports, strict=True):
        lines.append("")
        lines.append(f"{name}:")
        lines.extend(render_diagnoses(data["diagnoses"]))
    return "\n".join(lines).rstrip() + "\n"
