"""The dashboard and overlay images: their size, and that every panel shows data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import MissingExtraError, load_run, save_dashboard, save_overlay
from train_telemetry.testing import (
    add_metric,
    make_meta,
    make_records,
    make_resumed_records,
    write_pathology,
    write_resumed_run,
    write_run,
)

mpimg = pytest.importorskip("matplotlib.image")

# A panel "shows data" when it holds this many saturated (coloured) pixels: lines, markers,
# stacked areas and heat maps are coloured; frames, ticks and "no data" text are grey/black.
MIN_COLOURED_PIXELS = 800


def _coloured_pixels(image: Any, rows: int, cols: int, top: float = 0.04) -> list[list[int]]:
    """Count coloured pixels in each cell of a rows x cols grid below the figure title."""
    rgb = image[..., :3]
    saturated = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    height, width = saturated.shape
    y0 = int(height * top)
    counts = []
    for r in range(rows):
        row = []
        for c in range(cols):
            cell = saturated[
                y0 + (height - y0) * r // rows : y0 + (height - y0) * (r + 1) // rows,
                width * c // cols : width * (c + 1) // cols,
            ]
            row.append(int(cell.sum()))
        counts.append(row)
    return counts


@pytest.mark.parametrize("pathology", ["healthy", "frozen_backbone", "exploding"])
def test_dashboard_has_its_size_and_every_panel_drawn(tmp_path: Path, pathology: str) -> None:
    """The dashboard is 1400x1900 px and each of its ten panels holds coloured data."""
    run = load_run(write_pathology(tmp_path / "run", pathology))
    info = save_dashboard(run, tmp_path / "dash.png")
    image = mpimg.imread(info.path)
    assert image.shape[:2] == (1900, 1400) == (info.height, info.width)
    assert info.empty_panels == []
    counts = _coloured_pixels(image, rows=5, cols=2)
    data_panels = [n for row in counts for n in row][:-1]  # the last cell is the diagnoses text
    assert all(n >= MIN_COLOURED_PIXELS for n in data_panels), counts
    assert counts[4][1] > 50, counts  # diagnoses are written in colour (green when none)


def test_dashboard_names_panels_without_data(tmp_path: Path) -> None:
    """A run recorded without holdout or batch stats says which panels are empty, and they are."""
    records = make_records(n=6)
    for record in records:
        del record["holdout_logits"], record["batch_stats"]
    info = save_dashboard(
        load_run(write_run(tmp_path / "run", records, meta=make_meta())), tmp_path / "d.png"
    )
    assert set(info.empty_panels) == {"batch balance", "holdout predictions"}
    counts = _coloured_pixels(mpimg.imread(info.path), rows=5, cols=2)
    assert counts[3][0] < 50 and counts[3][1] < 50, counts


def test_overlay_draws_every_run(tmp_path: Path) -> None:
    """The compare overlay is 1400x1300 px with data in all six panels."""
    runs = [load_run(write_pathology(tmp_path / p, p)) for p in ("healthy", "head_lr_100x")]
    info = save_overlay(runs, tmp_path / "overlay.png")
    image = mpimg.imread(info.path)
    assert image.shape[:2] == (1300, 1400)
    assert info.empty_panels == []
    counts = _coloured_pixels(image, rows=3, cols=2)
    assert all(n >= MIN_COLOURED_PIXELS for row in counts for n in row), counts


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib, plotting fails with the pip command that fixes it."""
    run = load_run(write_pathology(tmp_path / "run", "healthy", n=3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'train-telemetry\[plot\]'"):
        save_dashboard(run, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_dashboard_adds_a_panel_per_extra_metric(tmp_path: Path) -> None:
    """A made-up metric and the per-layer breakdown each get panels with data, in rows added below."""
    records = add_metric(
        make_records(n=8, layers=True), "mean_abs_weight", lambda r: {"overall": 0.5, "backbone": 0.25, "head": 1.0}
    )
    info = save_dashboard(load_run(write_run(tmp_path / "run", records, meta=make_meta())), tmp_path / "d.png")
    extra = list(info.panels)[10:]
    assert extra == [
        "layers.gradient_norm", "layers.weight_norm", "layers.weight_delta", "layers.update_ratio", "mean_abs_weight",
    ]  # in the order they first hold a number: the first record's weight delta is null
    assert info.empty_panels == []
    image = mpimg.imread(info.path)
    assert image.shape[:2] == (1900 + 3 * 380, 1400) == (info.height, info.width)
    counts = _coloured_pixels(image, rows=8, cols=2, top=0.025)
    metric_cells = [*counts[5], *counts[6], counts[7][0]]
    assert all(n >= MIN_COLOURED_PIXELS for n in metric_cells), counts
    assert counts[7][1] < 50, counts  # the odd panel out leaves its neighbour blank


def test_dashboard_bounds_panels_and_lines_of_a_wide_metric(tmp_path: Path) -> None:
    """A metric of 20 modules x 3 stats gets one panel per stat (a line per module), not one per module."""
    records = add_metric(
        make_records(n=4), "activations", lambda r: {f"fc{i}": {"mean": i, "std": 1.0, "dead": 0.0} for i in range(20)}
    )
    info = save_dashboard(load_run(write_run(tmp_path / "run", records, meta=make_meta())), tmp_path / "d.png")
    assert list(info.panels)[10:] == ["activations.*.mean", "activations.*.std", "activations.*.dead"]
    assert (info.width, info.height) == (1400, 1900 + 2 * 380)


def test_every_time_series_panel_marks_the_resume_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run: each panel drawn against the step has a dashed line at step 140, in its legend once."""
    from train_telemetry.analysis import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, *a: figures.append(figure) or save(figure, *a))
    records = add_metric(
        make_resumed_records(n=10, resume_at=7, n_after=6), "mean_abs_weight", lambda r: {"overall": 0.5}
    )
    info = save_dashboard(load_run(write_run(tmp_path / "run", records, meta=make_meta())), tmp_path / "d.png")
    assert info.resumes == (140,) and info.empty_panels == []
    step_axes = [ax for ax in figures[0].axes if ax.get_xlabel() == "step"]
    assert len(step_axes) == 10  # 4 per-group, accuracy, loss, balance, heatmap, cost, the metric
    for ax in step_axes:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and list(line.get_xdata()) == [140, 140]]
        assert len(dashed) == 1, ax.get_title()
        legend = ax.get_legend()
        if legend is not None:
            assert [t.get_text() for t in legend.get_texts()].count("resume") == 1, ax.get_title()


def test_overlay_marks_each_runs_resumes(tmp_path: Path) -> None:
    """Overlaying a resumed run with a plain one reports the resumed run's step."""
    runs = [
        load_run(write_resumed_run(tmp_path / "resumed", n=10, resume_at=7, n_after=6)),
        load_run(write_pathology(tmp_path / "plain", "healthy")),
    ]
    info = save_overlay(runs, tmp_path / "overlay.png")
    assert info.resumes == (140,) and info.empty_panels == []
