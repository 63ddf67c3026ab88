"""Images of runs: the one-run dashboard and the several-run overlay.

Runs in: any process that reads a run (no torch). Needs matplotlib (the ``plot`` extra),
imported when a plot is made, never at import time. Figures are drawn on the Agg canvas
directly, not through pyplot, so making a plot leaves the caller's pyplot state and
backend alone (safe from notebooks and from threads). A resumed run gets a dashed line at
each resume step on every panel drawn against the step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from train_telemetry.analysis.extras import require
from train_telemetry.analysis.load import (
    OVERALL,
    UNASSIGNED,
    KeyedFamily,
    Run,
    as_float,
    class_sort_key,
    holdout_chance,
    holdout_is_sequence,
    train_accuracy,
    train_loss,
)
from train_telemetry.analysis.rules import Diagnosis, diagnose

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PlotInfo", "save_dashboard", "save_overlay"]

# Dashboard: 5 rows x 2 panels; at 100 dpi a 14 x 19 in figure is 1400 x 1900 px, legible
# when opened at full size and each panel still ~650 px wide.
DASHBOARD_SIZE_IN = (14.0, 19.0)
# Any other metric gets panels below, two per row of this height; bounded so that a run
# with many metrics still makes a readable image (the report and export carry the rest).
METRIC_ROW_HEIGHT_IN = 3.8
MAX_METRIC_PANELS = 8
MAX_LINES_PER_PANEL = 8
OVERLAY_SIZE_IN = (14.0, 13.0)
DEFAULT_DPI = 100
_SEVERITY_COLOURS = {"serious": "tab:red", "warning": "tab:orange", "info": "tab:gray"}
_LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class PlotInfo:
    """What was written: the file, its size in pixels, and each panel with whether it had data."""

    path: Path
    width: int
    height: int
    panels: dict[str, bool]
    # The steps where the run (or any overlaid run) was resumed: a dashed line on every
    # time-series panel.
    resumes: tuple[int, ...] = ()

    @property
    def empty_panels(self) -> list[str]:
        return [title for title, has_data in self.panels.items() if not has_data]


def _new_figure(size: tuple[float, float], dpi: int) -> Figure:
    require("matplotlib", extra="plot", purpose="plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(
    figure: Figure,
    path: str | os.PathLike[str],
    dpi: int,
    panels: dict[str, bool],
    resumes: Sequence[int] = (),
) -> PlotInfo:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the image keeps the figure's exact size (tests and layouts rely on it).
    figure.savefig(path, dpi=dpi)
    width, height = (round(v * dpi) for v in figure.get_size_inches())
    return PlotInfo(path=path, width=width, height=height, panels=panels, resumes=tuple(resumes))


def _mark_resumes(
    ax: Axes, resumes: Sequence[int], colour: Any = "0.25", label: str = "resume"
) -> None:
    """A dashed vertical line at each step where the run was resumed, in the legend once."""
    for i, step in enumerate(resumes):
        ax.axvline(
            step, color=colour, linestyle="--", linewidth=1.0, alpha=0.8,
            label=label if i == 0 else None,
        )


def _empty(ax: Axes, message: str) -> bool:
    ax.text(
        0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return False


def _plot_log_series(
    ax: Axes, series: Sequence[tuple[int, float]], label: str, colour: Any, style: str = "-"
) -> bool:
    """Plot the positive finite values on a log axis; mark zeros at the bottom and NaN/Inf at the top.

    Zeros (a frozen group's delta) and non-finite values cannot be drawn on a log scale, and
    they are exactly the values a reader must see, so they get markers instead of vanishing.
    """
    good = [(s, v) for s, v in series if math.isfinite(v) and v > 0]
    zeros = [s for s, v in series if v == 0]
    bad = [s for s, v in series if not math.isfinite(v)]
    if good:
        ax.plot(
            [s for s, _ in good],
            [v for _, v in good],
            style,
            color=colour,
            label=label,
            marker="." if len(good) < 30 else None,
        )
    if zeros:
        ax.plot(
            zeros,
            [0.02] * len(zeros),
            "v",
            color=colour,
            transform=ax.get_xaxis_transform(),
            label=f"{label} = 0" if not good else None,
            clip_on=False,
        )
    if bad:
        ax.plot(
            bad,
            [0.98] * len(bad),
            "x",
            color="red",
            transform=ax.get_xaxis_transform(),
            label=f"{label} NaN/Inf",
            clip_on=False,
        )
    return bool(series)


# A dashboard panel of per-group lines: a per-group family, or the groups' LRs.
GroupPanel = KeyedFamily | Literal["lr"]


def _family_series(run: Run, family: GroupPanel, key: str) -> list[tuple[int, float]]:
    if family == "lr":
        return run.lr_series(key)
    if family == "gradient_norm":
        # Clipping caps the applied norm at max_norm: the spikes show only before it.
        return run.gradient_norm_series(key)
    return run.series(family, key)


def _group_panel(ax: Axes, run: Run, family: GroupPanel, title: str) -> bool:
    pre_clip = family == "gradient_norm" and run.gradient_norm_source() != "gradient_norm"
    ax.set_title(title + (" before clipping" if pre_clip else ""))
    colours = _colours(len(run.groups))
    drawn = False
    missing = []
    for group, colour in zip(run.groups, colours, strict=True):
        series = _family_series(run, family, group)
        if series:
            drawn |= _plot_log_series(ax, series, group, colour)
        else:
            missing.append(group)
    if family != "lr":
        overall = _family_series(run, family, OVERALL)
        if overall and len(run.groups) > 1:
            drawn |= _plot_log_series(ax, overall, OVERALL, "0.3", ":")
    if not drawn:
        return _empty(ax, f"no {title.lower()} recorded")
    max_norm = run.clip_max_norm() if pre_clip else None
    if max_norm is not None and max_norm > 0:
        ax.axhline(max_norm, color="tab:red", linestyle="--", linewidth=1.0,
                   label=f"clip max_norm {max_norm:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    frozen = [g for g in missing if g == UNASSIGNED]
    missing = [g for g in missing if g != UNASSIGNED]
    if missing:
        ax.plot([], [], " ", label="no data: " + ", ".join(missing))
    if frozen:  # no optimizer group holds them: no LR, no gradients, by design
        ax.plot([], [], " ", label=f"{UNASSIGNED}: in no optimizer group (frozen)")
    _mark_resumes(ax, run.resumes)
    ax.legend(fontsize="small", loc="best")
    ax.grid(True, which="major", alpha=0.3)
    return True


def _metric_panels(run: Run) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {line label: series}) per extra metric, at most :data:`MAX_METRIC_PANELS`.

    A metric two levels deep gets one panel per first-level key (``layers.gradient_norm``,
    a line per module), unless the second level has at most half as many distinct keys
    (``activations``: {module: {stat}}): then one per second-level key
    (``activations.*.dead_fraction``). Either way a panel holds one kind of number.
    """
    panels: list[tuple[str, dict[str, list[tuple[int, float]]]]] = []
    for key in run.metric_keys():
        leaves = run.leaf_series(key)
        split = [path.split(".", 1) for path in leaves]
        if not leaves or any(len(parts) < 2 for parts in split):
            panels += [(key, leaves)] if leaves else []
            continue
        heads = list(dict.fromkeys(h for h, _ in split))
        tails = list(dict.fromkeys(t for _, t in split))
        if 2 * len(tails) <= len(heads):  # {thing: {kind: value}}: a panel per kind
            panels += [(f"{key}.*.{t}", {h: leaves[f"{h}.{t}"] for h in heads if f"{h}.{t}" in leaves})
                       for t in tails]
        else:  # {kind: {thing: value}}
            panels += [(f"{key}.{h}", {t: leaves[f"{h}.{t}"] for t in tails if f"{h}.{t}" in leaves})
                       for h in heads]
    return panels[:MAX_METRIC_PANELS]


def _metric_panel(
    ax: Axes, title: str, lines: dict[str, list[tuple[int, float]]], resumes: Sequence[int] = ()
) -> bool:
    """Up to :data:`MAX_LINES_PER_PANEL` lines, the largest last values; log scale when all positive."""
    ax.set_title(title)
    ranked = sorted(lines, key=lambda k: -abs(lines[k][-1][1]) if math.isfinite(lines[k][-1][1]) else -math.inf)
    shown = ranked[:MAX_LINES_PER_PANEL]
    finite = [v for k in shown for _, v in lines[k] if math.isfinite(v)]
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100
    for label, colour in zip(shown, _colours(len(shown)), strict=True):
        series = lines[label]
        if log:
            _plot_log_series(ax, series, label, colour)
            continue
        good = [(s, v) for s, v in series if math.isfinite(v)]
        if good:
            ax.plot(*zip(*good, strict=True), color=colour, label=label, marker="." if len(good) < 30 else None)
        bad = [s for s, v in series if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [0.98] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(),
                    label=f"{label} NaN/Inf", clip_on=False)
    if log:
        ax.set_yscale("log")
    if len(ranked) > len(shown):
        ax.plot([], [], " ", label=f"+{len(ranked) - len(shown)} more (see the report)")
    _mark_resumes(ax, resumes)
    ax.set_xlabel("step")
    ax.legend(fontsize="x-small", loc="best")
    ax.grid(True, alpha=0.3)
    return True


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = (
        colormaps["tab10"] if n <= 10 else colormaps["tab20"] if n <= 20 else colormaps["viridis"]
    )
    return [cmap(i / max(n - 1, 1)) if n > 20 else cmap(i) for i in range(n)]


def _holdout_losses(run: Run) -> list[tuple[int, float]]:
    """(step, holdout loss) for each finite loss recorded."""
    return [(s, v) for s, _, h in run.holdout() if (v := h.loss) is not None and math.isfinite(v)]


def _holdout_accuracies(run: Run) -> list[tuple[int, float]]:
    """(step, holdout accuracy) for each finite accuracy recorded (none derived)."""
    return [(s, v) for s, _, h in run.holdout() if (v := h.accuracy) is not None and math.isfinite(v)]


def _is_sequence_run(run: Run) -> bool:
    holdout = run.holdout()
    return bool(holdout) and holdout_is_sequence(holdout[-1][2])


def _accuracy_panel(ax: Axes, run: Run) -> bool:
    sequence = _is_sequence_run(run)
    ax.set_title("per-token accuracy" if sequence else "accuracy")
    holdout = run.holdout()
    drawn = False
    acc = [(s, a) for s, _, h in holdout if (a := h.accuracy) is not None]
    if acc:
        ax.plot(*zip(*acc, strict=True), color="tab:blue", marker=".", label="holdout")
        if not sequence:  # a vocabulary has no chance level the records could tell
            chance, _ = holdout_chance(holdout[-1][2])
            ax.axhline(chance, color="0.5", linestyle="--", label=f"chance {chance:.2f}")
        drawn = True
    train = run.points(train_accuracy, finite=True)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:orange", alpha=0.8, label="train batch")
        drawn = True
    if not drawn:
        return _empty(ax, "no accuracy recorded (holdout or train outputs)")
    ax.set_ylim(-0.02, 1.02)
    _mark_resumes(ax, run.resumes)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return True


def _loss_panel(ax: Axes, run: Run) -> bool:
    sequence = _is_sequence_run(run)
    ax.set_title("loss per token (right axis: perplexity)" if sequence else "loss")
    drawn = False
    for series, label, colour in (
        (_holdout_losses(run), "holdout", "tab:blue"),
        (run.points(train_loss, finite=True), "train batch", "tab:orange"),
    ):
        if series:
            ax.plot(
                *zip(*series, strict=True),
                color=colour,
                marker="." if len(series) < 30 else None,
                label=label,
            )
            drawn = True
    if not drawn:
        return _empty(ax, "no loss recorded")
    if sequence:
        import numpy as np

        # Perplexity is exp(loss): a second scale on the same line, not another line.
        def to_ppl(x: Any) -> Any:
            return np.exp(np.clip(x, -50.0, 50.0))

        def to_loss(x: Any) -> Any:
            return np.log(np.clip(x, 1e-300, None))

        ax.secondary_yaxis("right", functions=(to_ppl, to_loss)).set_ylabel("perplexity")
        ax.set_ylabel("cross-entropy per token")
    _mark_resumes(ax, run.resumes)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return True


def _balance_panel(ax: Axes, run: Run) -> bool:
    label_key = run.config.get("label_key")
    ax.set_title("batch balance" + (f" ('{label_key}')" if label_key else ""))
    batches = run.batch_classes()
    if not batches:
        return _empty(ax, "no batch stats recorded")
    classes = sorted({c for _, cs, _ in batches for c in cs}, key=class_sort_key)
    steps = [s for s, _, _ in batches]
    stacks = [[cs.get(c, 0.0) for _, cs, _ in batches] for c in classes]
    colours = _colours(len(classes))
    if len(steps) == 1:  # a stack plot needs two x values; widen the single batch into a bar
        bottom = 0.0
        for c, values, colour in zip(classes, stacks, colours, strict=True):
            ax.bar(steps, values, bottom=bottom, color=colour, label=f"class {c}")
            bottom += values[0]
    else:
        ax.stackplot(
            steps, stacks, colors=colours, labels=[f"class {c}" for c in classes], step="mid"
        )
    ax.set_ylim(0, 100)
    _mark_resumes(ax, run.resumes)
    ax.set_ylabel("% of batch")
    ax.set_xlabel("step")
    ax.legend(fontsize="x-small", ncol=min(len(classes), 5), loc="upper right")
    return True


def _token_batch_panel(ax: Axes, run: Run) -> bool:
    """Many-class labels: labelled tokens and distinct labels per batch, and the ignored share
    (a vocabulary's thousands of class shares would be unreadable)."""
    label = run.batch_label()
    ax.set_title("batch tokens" + (f" ('{label}')" if label else ""))
    batches = run.token_batches()
    lines: list[Any] = []
    for key, name, colour in (
        ("tokens", "labelled tokens", "tab:blue"),
        ("distinct_labels", "distinct labels", "tab:green"),
    ):
        points = [(s, v) for s, stats, _ in batches if (v := as_float(stats.get(key))) is not None]
        if points:
            lines += ax.plot(*zip(*points, strict=True), color=colour, label=name,
                             marker="." if len(points) < 30 else None)
    ignored = [(s, v) for s, stats, _ in batches if (v := as_float(stats.get("ignored_pct"))) is not None]
    if ignored:
        right = ax.twinx()
        lines += right.plot(*zip(*ignored, strict=True), color="tab:red", linestyle="--",
                            label="ignored labels (%)")
        right.set_ylim(0, 100)
        right.set_ylabel("% of label elements < 0")
    if not lines:
        return _empty(ax, "no batch token counts recorded")
    _mark_resumes(ax, run.resumes)
    ax.set_ylabel("per batch")
    ax.set_xlabel("step")
    ax.legend(handles=lines, fontsize="x-small", loc="best")
    ax.grid(True, alpha=0.3)
    return True


def _sequence_heatmap_panel(ax: Axes, run: Run) -> bool:
    """Each holdout sequence's mean loss at each record: the same examples followed over time."""
    ax.set_title("holdout loss per sequence (rows sorted by first loss)")
    holdout = [(s, h.example_loss) for s, _, h in run.holdout() if h.example_loss]
    if not holdout:
        return _empty(ax, "no per-sequence holdout loss recorded")
    import numpy as np

    size = len(holdout[-1][1])
    holdout = [(s, v) for s, v in holdout if len(v) == size]
    grid = np.array(
        [[v[i] if v[i] is not None else np.nan for _, v in holdout] for i in range(size)],
        dtype=float,
    )
    first = np.nan_to_num(grid[:, 0], nan=np.inf)
    grid = grid[np.argsort(first, kind="stable")]
    mesh = ax.pcolormesh(_column_edges([s for s, _ in holdout]), np.arange(size + 1) - 0.5,
                         np.ma.masked_invalid(grid), cmap="viridis")
    ax.figure.colorbar(mesh, ax=ax, label="loss per token")
    ax.set_ylim(size - 0.5, -0.5)
    _mark_resumes(ax, run.resumes, colour="white")
    ax.set_xlabel("step")
    ax.set_ylabel("sequence")
    ax.set_yticks([])
    return True


def _column_edges(steps_list: Sequence[int]) -> Any:
    """Column edges halfway between collections, so that a dropped snapshot (a longer gap)
    shows as a wider column at the right steps rather than shifting every later column."""
    import numpy as np

    steps = np.array(steps_list, dtype=float)
    if len(steps) > 1:
        mids = (steps[1:] + steps[:-1]) / 2
        return np.concatenate(
            [[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]]
        )
    return np.array([steps[0] - 0.5, steps[0] + 0.5])


def _heatmap_panel(ax: Axes, run: Run) -> bool:
    ax.set_title("holdout predictions per example (rows sorted by label; left strip: label)")
    holdout = [(s, h.predictions, h.labels) for s, _, h in run.holdout() if h.predictions]
    if not holdout:
        return _empty(ax, "no holdout predictions recorded")
    size = len(holdout[-1][1])
    holdout = [(s, p, t) for s, p, t in holdout if len(p) == size]
    labels = holdout[-1][2] or [0] * size
    order = sorted(range(size), key=lambda i: (labels[i], i))
    classes = max(max(labels, default=0), max(max(p) for _, p, _ in holdout)) + 1
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    colours = _colours(classes)
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-0.5, classes + 0.5), cmap.N)
    grid = np.array([[p[i] for _, p, _ in holdout] for i in order], dtype=float)
    x_edges = _column_edges([s for s, _, _ in holdout])
    ax.pcolormesh(x_edges, np.arange(size + 1) - 0.5, grid, cmap=cmap, norm=norm)
    ax.set_ylim(size - 0.5, -0.5)
    strip = ax.inset_axes((-0.035, 0.0, 0.02, 1.0))
    strip.imshow(
        np.array([[labels[i]] for i in order], dtype=float),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=norm,
    )
    strip.set_xticks([])
    strip.set_yticks([])
    _mark_resumes(ax, run.resumes, colour="white")
    ax.set_xlabel("step")
    ax.set_ylabel("example")
    ax.set_yticks([])
    return True


def _telemetry_panel(ax: Axes, run: Run) -> bool:
    ax.set_title("telemetry cost")
    drawn = False
    costs = run.costs()
    for series, label, colour in (
        ([(s, c.hook_ms) for s, c in costs if c.hook_ms is not None], "hook (ms)", "tab:purple"),
        (
            [(s, c.worker_lag_ms) for s, c in costs if c.worker_lag_ms is not None],
            "worker lag (ms)",
            "tab:brown",
        ),
    ):
        if series:
            drawn |= _plot_log_series(ax, series, label, colour)
    dropped = [(s, c.dropped_before) for s, c in costs if c.dropped_before > 0]
    if dropped:
        for s, _ in dropped:
            ax.axvline(s, color="tab:red", alpha=0.3)
        ax.plot(
            [], [], color="tab:red", alpha=0.3, label=f"snapshots dropped before ({len(dropped)})"
        )
    if not drawn:
        return _empty(ax, "no telemetry timings recorded")
    _mark_resumes(ax, run.resumes)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return True


def _diagnoses_panel(ax: Axes, diagnoses: Sequence[Diagnosis]) -> bool:
    ax.set_title("diagnoses")
    ax.set_axis_off()
    if not diagnoses:
        ax.text(
            0.02,
            0.95,
            "no problems found",
            color="tab:green",
            va="top",
            transform=ax.transAxes,
            fontsize="large",
        )
        return True
    y = 0.97
    for d in diagnoses[:12]:
        ax.text(
            0.0,
            y,
            f"{d.severity.upper()} {d.code}",
            color=_SEVERITY_COLOURS[d.severity],
            va="top",
            transform=ax.transAxes,
            fontweight="bold",
            fontsize="small",
        )
        title = d.title if len(d.title) <= 110 else d.title[:107] + "..."
        ax.text(
            0.0, y - 0.035, title, va="top", transform=ax.transAxes, fontsize="x-small", wrap=True
        )
        y -= 0.08
    if len(diagnoses) > 12:
        ax.text(
            0.0,
            y,
            f"... {len(diagnoses) - 12} more (see the report)",
            va="top",
            transform=ax.transAxes,
        )
    return True


def save_dashboard(run: Run, path: str | os.PathLike[str], *, dpi: int = DEFAULT_DPI) -> PlotInfo:
    """Write one image of ``run``: a panel per metric family, the diagnoses, then any other metric.

    Each record key without a panel of its own (``layers``, ``activations``, a user
    metric) adds a panel (see :func:`_metric_panels`), two per extra row of the image.
    """
    extra = _metric_panels(run)
    rows = 5 + (len(extra) + 1) // 2
    width, height = DASHBOARD_SIZE_IN
    figure = _new_figure((width, height + (rows - 5) * METRIC_ROW_HEIGHT_IN), dpi)
    axes = figure.subplots(rows, 2, squeeze=False)
    diagnoses = diagnose(run)
    steps = run.steps
    serious = sum(d.severity == "serious" for d in diagnoses)
    figure.suptitle(
        f"{run.name}: steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}, "
        f"{len(run.records)} records, {serious} serious diagnoses",
        fontsize="x-large",
    )
    panels = {
        "gradient norm": _group_panel(axes[0][0], run, "gradient_norm", "Gradient norm"),
        "weight delta": _group_panel(
            axes[0][1], run, "weight_delta", "Weight delta since previous collection"
        ),
        "update/weight ratio": _group_panel(
            axes[1][0], run, "update_ratio", "Update / weight ratio"
        ),
        "learning rate": _group_panel(axes[1][1], run, "lr", "Learning rate"),
        "accuracy": _accuracy_panel(axes[2][0], run),
        "loss": _loss_panel(axes[2][1], run),
    }
    # Token labels: tokens per batch instead of a share per class, and each holdout
    # sequence's loss instead of its predicted class.
    if run.token_batches() and not run.batch_classes():
        panels["batch tokens"] = _token_batch_panel(axes[3][0], run)
    else:
        panels["batch balance"] = _balance_panel(axes[3][0], run)
    if _is_sequence_run(run):
        panels["holdout loss per sequence"] = _sequence_heatmap_panel(axes[3][1], run)
    else:
        panels["holdout predictions"] = _heatmap_panel(axes[3][1], run)
    panels |= {
        "telemetry cost": _telemetry_panel(axes[4][0], run),
        "diagnoses": _diagnoses_panel(axes[4][1], diagnoses),
    }
    for i, (title, lines) in enumerate(extra):
        panels[title] = _metric_panel(axes[5 + i // 2][i % 2], title, lines, run.resumes)
    if len(extra) % 2:
        axes[-1][1].set_axis_off()
    return _save(figure, path, dpi, panels, run.resumes)


def save_overlay(
    runs: Sequence[Run], path: str | os.PathLike[str], *, dpi: int = DEFAULT_DPI
) -> PlotInfo:
    """Write one image overlaying ``runs``: colour per run, line style per group."""
    figure = _new_figure(OVERLAY_SIZE_IN, dpi)
    axes = figure.subplots(3, 2)
    colours = _colours(len(runs))
    figure.suptitle("compare: " + ", ".join(r.name for r in runs), fontsize="x-large")
    panels: dict[str, bool] = {}
    groups = list(dict.fromkeys(g for run in runs for g in run.groups))

    def finish(ax: Axes, title: str, drawn: bool, log: bool) -> None:
        if drawn:
            for run, colour in zip(runs, colours, strict=True):
                _mark_resumes(ax, run.resumes, colour, f"{run.name} resume")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(fontsize="x-small")
            ax.grid(True, alpha=0.3)
        else:
            _empty(ax, f"no {title} recorded in any run")
        panels[title] = drawn

    # A line per run: one number of each record.
    per_run: tuple[tuple[Axes, str, Callable[[Run], list[tuple[int, float]]]], ...] = (
        (axes[0][0], "holdout accuracy", _holdout_accuracies),
        (axes[0][1], "train loss", lambda run: run.points(train_loss, finite=True)),
    )
    for ax, title, series_of in per_run:
        ax.set_title(title)
        drawn = False
        for run, colour in zip(runs, colours, strict=True):
            series = series_of(run)
            if series:
                ax.plot(*zip(*series, strict=True), color=colour, label=run.name)
                drawn = True
        finish(ax, title, drawn, log=False)
    # A line per run and group, on a log scale.
    per_group: tuple[tuple[Axes, str, GroupPanel], ...] = (
        (axes[1][0], "gradient norm", "gradient_norm"),
        (axes[1][1], "weight delta", "weight_delta"),
        (axes[2][0], "update / weight ratio", "update_ratio"),
        (axes[2][1], "learning rate", "lr"),
    )
    for ax, title, family in per_group:
        ax.set_title(title)
        drawn = False
        for run, colour in zip(runs, colours, strict=True):
            for group in run.groups:
                style = _LINESTYLES[groups.index(group) % len(_LINESTYLES)]
                series = run.lr_series(group) if family == "lr" else run.series(family, group)
                if series:
                    drawn |= _plot_log_series(ax, series, f"{run.name} {group}", colour, style)
        finish(ax, title, drawn, log=True)
    resumes = sorted({step for run in runs for step in run.resumes})
    return _save(figure, path, dpi, panels, resumes)
