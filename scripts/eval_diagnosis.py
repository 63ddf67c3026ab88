"""How often the diagnoses are right on programs they were not written against.

    python3 scripts/eval_diagnosis.py              # every program, healthy and with each bug (~4 min on 2 cores)
    python3 scripts/eval_diagnosis.py --quick      # smoke run: two programs, four runs
    python3 scripts/eval_diagnosis.py --out runs/eval --keep   # keep the run directories
    python3 scripts/eval_diagnosis.py --score runs/eval        # score runs trained before

Five small real programs (scripts/eval_diag/: an MLP on a table, a CNN on digits, a
character GPT in a raw loop, a Hugging Face Trainer GPT-2, a Lightning MLP) each train
healthy and with bugs injected, with the telemetry set up as the README says; then
``diagnose(load_run(dir))`` judges each run, as ``train-telemetry report`` does. Printed:
per rule, recall over the runs with its bug and false alarms on the healthy runs, over all
programs and leave-one-program-out (each new rule's main threshold re-chosen on the other
programs, then judged on the one left out); and spike detection (ours and the baselines of
llm-foundry, Megatron and ZClip on the same traces): recall and false alarms per 10,000
clean steps. docs/diagnosis.md holds the table of a full run.

Runs in: this process (scoring) and ``--jobs`` worker processes (training, one thread each).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_diag import cases as cases_mod  # noqa: E402
from eval_diag import scoring  # noqa: E402


def _train(job: tuple[cases_mod.Case, Path, bool]) -> dict[str, object]:
    case, root, quick = job
    return cases_mod.train(case, root, quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: two programs, four runs")
    parser.add_argument("--jobs", type=int, default=2, help="training processes side by side (default 2)")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--score", type=Path, help="score the runs already in this directory; train nothing")
    parser.add_argument("--only", help="train only the programs named (comma-separated)")
    parser.add_argument("--bugs", help="train only the bugs named (comma-separated; healthy included)")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    all_cases = cases_mod.all_cases(quick=args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        all_cases = [c for c in all_cases if c.program in wanted]
    if args.bugs:
        bugs = set(args.bugs.split(","))
        all_cases = [c for c in all_cases if c.bug in bugs]
    if args.score:
        root = args.score
    else:
        root = args.out or Path(tempfile.mkdtemp(prefix="eval_diagnosis_"))
        root.mkdir(parents=True, exist_ok=True)
        jobs = [(case, root, args.quick) for case in all_cases]
        # Spawned workers: each imports torch once and trains its share of the cases.
        context = multiprocessing.get_context("spawn")
        with context.Pool(max(1, args.jobs), maxtasksperchild=8) as pool:
            for result in pool.imap_unordered(_train, jobs):
                status = "FAILED" if result["error"] else "ok"
                print(f"  trained {result['case']:<34} {result['seconds']:6.1f} s  {status}", flush=True)
                if result["error"]:
                    print(result["error"], file=sys.stderr)
    trained = time.perf_counter() - began
    report = scoring.score(all_cases, root)
    print(report)
    print(f"\nwall time: {time.perf_counter() - began:.0f} s (training {trained:.0f} s), "
          f"{len(all_cases)} runs, --jobs {args.jobs}")
    if not args.score and not args.keep and not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
