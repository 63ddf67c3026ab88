"""The ``train-telemetry`` command: report on, plot, compare, export, watch and mirror run directories.

Runs in: a shell, on any machine that can read the run directory. Needs no torch (the rule
is written in :mod:`train_telemetry.analysis`); plotting and exporting import their
optional libraries only when asked to.

Exit status: 0 when nothing serious was found (or the files were written), 1 when
``report``, ``compare`` or ``watch`` found a serious diagnosis, 2 when the command could
not do its job (bad arguments, no run at the path, an optional dependency missing, a file
that cannot be written, a tracker ``mirror`` could not send every record to), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from train_telemetry.analysis.extras import MissingExtraError
from train_telemetry.analysis.load import Run, RunNotFoundError, load_runs
from train_telemetry.analysis.report import render_report, report_data, report_json
from train_telemetry.analysis.rules import CODES
from train_telemetry.config import MIRROR_NAMES, TelemetryConfigError

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_SERIOUS", "build_parser", "main"]

EXIT_OK = 0
EXIT_SERIOUS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

PROG = "train-telemetry"


class CommandError(Exception):
    """A user-facing failure: printed as ``train-telemetry: error: <message>``, exit status 2."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("train-telemetry")
    except Exception:  # not installed (run from a source tree): the version is not known
        return "unknown"


def _ascii_only(stream: TextIO) -> bool:
    """Whether ``stream`` cannot show the trend bar characters (e.g. a cp1252 console)."""
    try:
        "▁█".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def _runs(path: str, rank: int | None) -> list[Run]:
    runs = load_runs(path)
    if rank is None:
        return runs
    chosen = [r for r in runs if r.rank == rank or (r.rank is None and rank == 0)]
    if not chosen:
        present = ", ".join(str(r.rank if r.rank is not None else 0) for r in runs)
        raise CommandError(f"{path}: no records for rank {rank} (ranks present: {present})")
    return chosen


def _one_run(path: str, rank: int | None) -> Run:
    runs = _runs(path, rank)
    if len(runs) > 1:
        print(
            f"{PROG}: {path} has {len(runs)} ranks; using rank {runs[0].rank} (choose with --rank)",
            file=sys.stderr,
        )
    return runs[0]


# --- commands ------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    runs = _runs(args.run_dir, args.rank)
    reports = [report_data(run) for run in runs]
    if args.json:
        print(report_json(reports[0] if len(reports) == 1 else reports))
    else:
        ascii_only = args.ascii or _ascii_only(sys.stdout)
        print("\n".join(render_report(data, ascii_only=ascii_only) for data in reports), end="")
    return EXIT_SERIOUS if any(d["serious"] for d in reports) else EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from train_telemetry.analysis.plots import save_dashboard

    run = _one_run(args.run_dir, args.rank)
    info = save_dashboard(run, args.output, dpi=args.dpi)
    print(f"wrote {info.path} ({info.width}x{info.height} px)")
    if info.empty_panels:
        print(f"panels without data: {', '.join(info.empty_panels)}")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from train_telemetry.analysis.compare import render_comparison

    if len(args.run_dirs) < 2:
        raise CommandError("compare needs at least two run directories")
    runs = [_one_run(path, None) for path in args.run_dirs]
    reports = [report_data(run) for run in runs]
    if args.json:
        print(report_json({"runs": reports}))
    else:
        print(render_comparison(reports), end="")
    if args.output:
        from train_telemetry.analysis.plots import save_overlay

        info = save_overlay(runs, args.output, dpi=args.dpi)
        print(
            f"wrote {info.path} ({info.width}x{info.height} px)",
            file=sys.stderr if args.json else sys.stdout,
        )
    return EXIT_SERIOUS if any(d["serious"] for d in reports) else EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from train_telemetry.analysis.export import (
        export_tensorboard,
        holdout_dataframe,
        to_dataframe,
        write_table,
    )

    if args.format is None and args.tensorboard is None:
        raise CommandError("export: give --format csv|parquet, --tensorboard DIR, or both")
    run = _one_run(args.run_dir, args.rank)
    if args.format is not None:
        base = run.records_file or (run.path / "telemetry.jsonl")
        output = Path(args.output) if args.output else base.with_suffix(f".{args.format}")
        frame = to_dataframe(run)
        write_table(frame, output, args.format)
        print(f"wrote {output} ({len(frame)} rows, {len(frame.columns)} columns)")
        if args.per_example:
            examples = holdout_dataframe(run)
            per_example = output.with_name(f"{output.stem}.holdout{output.suffix}")
            write_table(examples, per_example, args.format)
            print(f"wrote {per_example} ({len(examples)} rows)")
    if args.tensorboard is not None:
        count = export_tensorboard(run, args.tensorboard)
        print(
            f"wrote {count} TensorBoard scalars to {args.tensorboard} (tensorboard --logdir {args.tensorboard})"
        )
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace) -> int:
    from train_telemetry.analysis.watch import watch

    return watch(
        args.run_dir,
        out=sys.stdout,
        interval_s=args.interval,
        max_seconds=args.max_seconds,
        once=args.once,
        tail=args.tail,
        rank=args.rank,
    )


# Shortcuts for the options most replays need: (flag, option, the trackers that take it).
_MIRROR_SHORTCUTS = (
    ("log_dir", "log_dir", ("tensorboard",)),
    ("tracking_uri", "tracking_uri", ("mlflow",)),
    ("experiment", "experiment", ("mlflow",)),
    ("project", "project", ("wandb", "trackio")),
)


def _mirror_specs(args: argparse.Namespace) -> list[tuple[str, dict[str, object]]]:
    options: dict[str, dict[str, object]] = {name: {} for name in args.to}
    for attr, key, trackers in _MIRROR_SHORTCUTS:
        value = getattr(args, attr)
        if value is not None:
            targets = [t for t in trackers if t in options]
            if not targets:
                raise CommandError(f"--{attr.replace('_', '-')} is an option of {' or '.join(trackers)}, "
                                   f"not of --to {', '.join(args.to)}")
            for t in targets:
                options[t][key] = value
    for item in args.set or []:
        target, _, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not eq or not key or target not in options:
            raise CommandError(f"--set {item!r}: expected TRACKER.KEY=VALUE with TRACKER one of --to "
                               f"({', '.join(args.to)})")
        options[target][key] = value
    return list(options.items())


def _cmd_mirror(args: argparse.Namespace) -> int:
    from train_telemetry.mirrors import mirror_run

    try:
        stats = mirror_run(args.run_dir, _mirror_specs(args), follow=args.follow, rank=args.rank,
                           interval_s=args.interval, max_seconds=args.max_seconds, out=sys.stdout)
    except TelemetryConfigError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK if all(s.state == "ok" and not s.dropped for s in stats.values()) else EXIT_ERROR


# --- parser --------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``train-telemetry`` command (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read a train-telemetry run directory: what happened and what is wrong.",
        epilog="exit status: 0 nothing serious, 1 a serious diagnosis (report/compare/watch), "
        "2 the command could not run",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def rank_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--rank",
            type=_non_negative_int,
            default=None,
            help="for per-rank runs (telemetry.rank<r>.jsonl): the rank to read",
        )

    report = sub.add_parser(
        "report",
        help="summary and diagnoses of a run",
        description="Summarise a run and diagnose it. Diagnosis codes: " + ", ".join(CODES),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or its .jsonl file)")
    report.add_argument("--json", action="store_true", help="print the same report as JSON")
    report.add_argument(
        "--ascii", action="store_true", help="draw trends with ASCII characters only"
    )
    rank_option(report)
    report.set_defaults(func=_cmd_report)

    plot = sub.add_parser("plot", help="dashboard image of a run (needs matplotlib)")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument(
        "-o", "--output", required=True, metavar="FILE.png", help="image file to write"
    )
    plot.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    rank_option(plot)
    plot.set_defaults(func=_cmd_plot)

    compare = sub.add_parser("compare", help="several runs side by side (and an overlay plot)")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("-o", "--output", metavar="FILE.png", help="also write an overlay image")
    compare.add_argument("--json", action="store_true", help="print the reports as JSON")
    compare.add_argument("--dpi", type=int, default=100)
    compare.set_defaults(func=_cmd_compare)

    export = sub.add_parser(
        "export", help="a run as CSV/Parquet (needs pandas) or TensorBoard scalars"
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=("csv", "parquet"), help="table format")
    export.add_argument(
        "-o", "--output", metavar="FILE", help="table file (default: RUN_DIR/telemetry.<format>)"
    )
    export.add_argument(
        "--per-example",
        action="store_true",
        help="also write the holdout's per-example predictions, or per-sequence loss and "
        "accuracy for token labels (<output>.holdout.<format>)",
    )
    export.add_argument(
        "--tensorboard", metavar="DIR", help="write TensorBoard scalars to DIR (needs tensorboard)"
    )
    rank_option(export)
    export.set_defaults(func=_cmd_export)

    watch = sub.add_parser("watch", help="follow a run that is still training")
    watch.add_argument("run_dir", metavar="RUN_DIR")
    watch.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between reads (default 1)",
    )
    watch.add_argument(
        "--max-seconds",
        type=_positive_float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: until the run writes summary.json)",
    )
    watch.add_argument("--once", action="store_true", help="read once, print, and exit")
    watch.add_argument(
        "--tail",
        type=_non_negative_int,
        default=5,
        metavar="N",
        help="of the records already written, print the last N (default 5)",
    )
    rank_option(watch)
    watch.set_defaults(func=_cmd_watch)

    mirror = sub.add_parser(
        "mirror",
        help="send a run to trackers (TensorBoard, MLflow, W&B, trackio), or follow a live one",
        description="Send every record of a run to trackers, as a live run's `mirror:` does; "
        "with --follow, also what a run still training appends, until it stops. Exit 2 if a "
        "tracker could not take every record.",
    )
    mirror.add_argument("run_dir", metavar="RUN_DIR")
    mirror.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="TRACKER",
        help=f"a tracker ({', '.join(MIRROR_NAMES)}, or package.module:Class); repeat for several",
    )
    mirror.add_argument("--log-dir", metavar="DIR", help="tensorboard: event file directory (default RUN_DIR/tensorboard)")
    mirror.add_argument("--tracking-uri", metavar="URI", help="mlflow: tracking URI (e.g. sqlite:///mlflow.db)")
    mirror.add_argument("--experiment", metavar="NAME", help="mlflow: experiment name")
    mirror.add_argument("--project", metavar="NAME", help="wandb / trackio: project")
    mirror.add_argument(
        "--set",
        action="append",
        metavar="TRACKER.KEY=VALUE",
        help="any other option of a tracker (e.g. wandb.mode=offline, mlflow.run_id=...)",
    )
    mirror.add_argument("--follow", action="store_true", help="keep sending what the run appends until it stops")
    mirror.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                        help="--follow: seconds between reads (default 1)")
    mirror.add_argument("--max-seconds", type=_positive_float, default=None, metavar="S",
                        help="--follow: stop after S seconds (default: until the run writes summary.json)")
    rank_option(mirror)
    mirror.set_defaults(func=_cmd_mirror)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CommandError, RunNotFoundError, MissingExtraError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep the interpreter's final
        # flush from raising again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
