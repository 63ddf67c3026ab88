"""The train-telemetry command: each subcommand's output, files and exit status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from train_telemetry.cli import EXIT_ERROR, EXIT_OK, EXIT_SERIOUS, main
from train_telemetry.records import encode_record
from train_telemetry.testing import add_metric, make_meta, make_records, write_pathology, write_run


@pytest.fixture
def healthy(tmp_path: Path) -> Path:
    return write_pathology(tmp_path / "healthy", "healthy")


@pytest.fixture
def frozen(tmp_path: Path) -> Path:
    return write_pathology(tmp_path / "frozen", "frozen_backbone")


def test_report_exit_status_says_whether_something_is_serious(
    healthy: Path, frozen: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """report exits 0 for a healthy run and 1 for a run with a serious diagnosis."""
    assert main(["report", str(healthy)]) == EXIT_OK
    assert "Diagnoses: none (no problems found)" in capsys.readouterr().out
    assert main(["report", str(frozen)]) == EXIT_SERIOUS
    assert "SERIOUS  frozen_group" in capsys.readouterr().out


def test_report_json_prints_the_report_as_data(
    frozen: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """report --json prints one strict-JSON object with the diagnoses and the summary."""
    assert main(["report", str(frozen), "--json"]) == EXIT_SERIOUS
    data = json.loads(capsys.readouterr().out)
    assert data["serious"] is True
    assert data["diagnoses"][0]["code"] == "frozen_group"
    assert data["diagnoses"][0]["subject"] == "backbone"
    assert data["summary"]["run"]["records"] == 12


def test_report_on_a_missing_run_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path with no run is an error (exit 2) whose message names the path."""
    assert main(["report", str(tmp_path / "nope")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("train-telemetry: error: ") and "nope" in err


def test_report_covers_every_rank_of_a_per_rank_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory with telemetry.rank<r>.jsonl files is reported rank by rank, or one rank with --rank."""
    directory = tmp_path / "ddp"
    directory.mkdir()
    for rank in (0, 1):
        (directory / f"telemetry.rank{rank}.jsonl").write_bytes(
            b"".join(encode_record(r) for r in make_records(n=3))
        )
    main(["report", str(directory)])
    out = capsys.readouterr().out
    assert "Run ddp[rank 0]" in out and "Run ddp[rank 1]" in out
    main(["report", str(directory), "--rank", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["summary"]["run"]["rank"] == 1
    assert main(["report", str(directory), "--rank", "5"]) == EXIT_ERROR
    assert "ranks present: 0, 1" in capsys.readouterr().err


def test_plot_writes_the_dashboard(
    healthy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plot -o writes the image and prints its size."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "dash.png"
    assert main(["plot", str(healthy), "-o", str(out), "--dpi", "50"]) == EXIT_OK
    assert out.stat().st_size > 10_000
    assert f"wrote {out} (700x950 px)" in capsys.readouterr().out


def test_plot_without_matplotlib_exits_2_with_the_fix(
    healthy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without matplotlib, plot exits 2 and says which pip extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(healthy), "-o", str(tmp_path / "x.png")]) == EXIT_ERROR
    assert "pip install 'train-telemetry[plot]'" in capsys.readouterr().err


def test_compare_puts_runs_side_by_side(
    healthy: Path, frozen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare prints one column per run with their diagnoses, writes the overlay, and exits 1 if any is serious."""
    pytest.importorskip("matplotlib")
    overlay = tmp_path / "overlay.png"
    assert main(["compare", str(healthy), str(frozen), "-o", str(overlay)]) == EXIT_SERIOUS
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "healthy" in header and "frozen" in header
    serious_row = next(line for line in out.splitlines() if line.startswith("serious"))
    assert serious_row.split()[1:] == ["-", "frozen_group"]
    assert any(line.startswith("grad norm backbone (median)") for line in out.splitlines())
    assert overlay.exists() and f"wrote {overlay}" in out


def test_compare_json_and_needs_two_runs(
    healthy: Path, frozen: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare --json lists each run's report; a single run is a usage error."""
    assert main(["compare", str(healthy), str(frozen), "--json"]) == EXIT_SERIOUS
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["serious"] for r in runs] == [False, True]
    assert main(["compare", str(healthy)]) == EXIT_ERROR
    assert "at least two" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_a_table_next_to_the_records(
    healthy: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """export --format writes RUN_DIR/telemetry.<fmt> (and the per-example table when asked)."""
    pd = pytest.importorskip("pandas")
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    assert main(["export", str(healthy), "--format", fmt, "--per-example"]) == EXIT_OK
    table = healthy / f"telemetry.{fmt}"
    frame = pd.read_csv(table) if fmt == "csv" else pd.read_parquet(table)
    assert len(frame) == 12 and "gradient_norm.head" in frame.columns
    assert (healthy / f"telemetry.holdout.{fmt}").exists()
    assert f"wrote {table} (12 rows" in capsys.readouterr().out


def test_export_to_a_chosen_file_and_needs_a_target(
    healthy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export -o writes where told; export with neither --format nor --tensorboard is a usage error."""
    pytest.importorskip("pandas")
    out = tmp_path / "t.csv"
    assert main(["export", str(healthy), "--format", "csv", "-o", str(out)]) == EXIT_OK
    assert out.read_text().startswith("batch_idx,epoch,seq,timestamp,")
    assert main(["export", str(healthy)]) == EXIT_ERROR
    assert "--format csv|parquet, --tensorboard DIR" in capsys.readouterr().err


def test_export_tensorboard(
    healthy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """export --tensorboard DIR writes an event file and says how many scalars."""
    assert main(["export", str(healthy), "--tensorboard", str(tmp_path / "tb")]) == EXIT_OK
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "TensorBoard scalars to" in capsys.readouterr().out


def test_watch_once(frozen: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """watch --once prints the last records and the diagnoses of a run, then exits."""
    assert main(["watch", str(frozen), "--once", "--tail", "2"]) == EXIT_SERIOUS
    out = capsys.readouterr().out
    assert "step 220 |" in out and "frozen_group" in out


def test_bad_option_values_are_usage_errors(
    healthy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative --max-seconds is rejected by the parser with exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(["watch", str(healthy), "--max-seconds", "-1"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


def test_report_and_export_show_a_metric_without_code_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user metric and the per-layer breakdown appear in report, report --json and the CSV export."""
    records = add_metric(make_records(n=5, layers=True), "mean_abs_weight", lambda r: {"overall": 0.5, "head": 2.0})
    run_dir = write_run(tmp_path / "run", records, meta=make_meta())
    assert main(["report", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "  mean_abs_weight\n" in out and "per layer at step 80 (by gradient norm)" in out
    assert main(["report", str(run_dir), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["metrics"]["mean_abs_weight"]["head"]["last"] == 2.0
    assert [row["layer"] for row in data["summary"]["layers"]["rows"]] == ["backbone.0", "backbone.2", "head"]
    assert main(["export", str(run_dir), "--format", "csv"]) == EXIT_OK
    header = next(run_dir.glob("*.csv")).read_text().splitlines()[0].split(",")
    assert {"mean_abs_weight.overall", "mean_abs_weight.head", "layers.gradient_norm.backbone.0"} <= set(header)


def test_export_tensorboard_leaves_the_bookkeeping_out(tmp_path: Path) -> None:
    """Records with their step (and batch_idx, seq, time) become training series only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = make_records("healthy", n=4)
    for i, record in enumerate(records):
        record["step"] = 100 + i
    run = write_run(tmp_path / "run", records)
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb")]) == EXIT_OK
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "gradient_norm/overall" in tags
    assert not tags & {"step", "batch_idx", "seq", "time", "schema"}, sorted(tags)
    assert [e.step for e in events.Scalars("gradient_norm/overall")] == [100, 101, 102, 103]
