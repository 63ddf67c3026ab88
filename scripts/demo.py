#!/usr/bin/env python3
"""The main job: train the seed's Siamese pair model and a tiny character-level GPT with
telemetry on, then report on each.

    python scripts/demo.py                          # both: runs/demo-healthy and runs/demo-chargpt
    python scripts/demo.py --task pairs --preset head_lr_100x    # inject a known pathology
    python scripts/demo.py --task chargpt           # the language model only
    python scripts/demo.py --list-presets
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.demo import PRESETS, train
from train_telemetry.demo_lm import train_chargpt

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["all", "pairs", "chargpt"], default="all",
                        help="pairs: the seed's Siamese classifier; chargpt: a character-level GPT; all: both")
    parser.add_argument("--preset", default="healthy", choices=sorted(PRESETS), help="(pairs) a pathology to inject")
    parser.add_argument("--lm-steps", type=int, default=300, help="(chargpt) optimizer steps")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="telemetry YAML")
    parser.add_argument("--output-dir", default=None,
                        help="run directory (default runs/demo-<preset>, runs/demo-chargpt)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--collect-every-n", type=int, default=None)
    parser.add_argument("--mode", choices=["auto", "async", "sync"], default=None)
    parser.add_argument("--on-full", choices=["drop", "block"], default=None,
                        help="block: record every collection even if the worker lags (tests use it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-report", action="store_true", help="skip the diagnosis report at the end")
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, what in PRESETS.items():
            print(f"{name:22s} {what}")
        return 0

    config = TelemetryConfig.from_yaml(args.config)
    changes: dict[str, object] = {}
    if args.collect_every_n:
        changes["collect_every_n"] = args.collect_every_n
    if args.mode:
        changes["mode"] = args.mode
    if args.on_full:
        changes["on_full"] = args.on_full
    config = config.replace(**changes)
    status = 0
    if args.task in ("all", "pairs"):
        out = fresh_dir(args.output_dir or f"runs/demo-{args.preset}")
        print(f"training preset {args.preset!r}: {PRESETS[args.preset]}")
        result = train(Telemetry(config.replace(output_dir=str(out))), args.preset, epochs=args.epochs,
                       max_steps=args.max_steps, seed=args.seed)
        records = read_records(out)
        print(f"\n{result['steps']} steps, final val accuracy {result['val_accuracy']:.3f}; "
              f"{len(records)} telemetry records in {out}/telemetry.jsonl")
        status |= finish(out, records, args.no_report)
    if args.task in ("all", "chargpt"):
        out = fresh_dir(args.output_dir if args.task == "chargpt" and args.output_dir else "runs/demo-chargpt")
        if args.task == "all":
            print("\n" + "=" * 100 + "\n")
        print("training a character-level GPT (nanoGPT's loop) on standard-library docstrings")
        # expected_lr_ratios in demo.yaml names the pair model's groups; the GPT has decay / no_decay
        lm_config = config.replace(output_dir=str(out), expected_lr_ratios={"decay": 1.0, "no_decay": 1.0})
        lm = train_chargpt(Telemetry(lm_config), steps=args.max_steps or args.lm_steps,
                           seed=args.seed)
        records = read_records(out)
        print(f"\n{lm['steps']} steps, train loss {lm['train_loss']:.3f}, holdout loss {lm['val_loss']:.3f}; "
              f"{len(records)} telemetry records in {out}/telemetry.jsonl")
        status |= finish(out, records, args.no_report)
    return status


def fresh_dir(path: str) -> Path:
    out = Path(path)
    if out.exists():
        shutil.rmtree(out)  # a demo run starts fresh; records are append-only otherwise
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def finish(out: Path, records: list[dict], no_report: bool) -> int:
    print_brief(records)
    if no_report:
        return 0
    try:
        from train_telemetry.cli import main as cli_main
    except ImportError:
        return 0
    print()
    cli_main(["report", str(out)])  # its exit status is about the run, not the demo
    return 0


def print_brief(records: list[dict]) -> None:
    """A few lines of what the records show, first vs last collection."""
    if not records:
        print("no records written")
        return
    first, last = records[0], records[-1]
    def fmt(v: object) -> str:
        return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    for family in ("gradient_norm", "weight_delta", "learning_rates"):
        if family in last:
            keys = [k for k in last[family] if not k.startswith("group_")]
            row = ", ".join(f"{k} {fmt(first[family].get(k))} -> {fmt(last[family].get(k))}" for k in keys)
            print(f"  {family:15s} {row}")
    if "holdout_logits" in last:
        hold0, hold1 = first["holdout_logits"], last["holdout_logits"]
        if "perplexity" in hold1:
            print(f"  holdout perplexity {fmt(hold0['perplexity'])} -> {fmt(hold1['perplexity'])}, "
                  f"per-token accuracy {fmt(hold0['accuracy'])} -> {fmt(hold1['accuracy'])}")
        else:
            print(f"  holdout accuracy {fmt(hold0['accuracy'])} -> {fmt(hold1['accuracy'])}")
    if "train" in last:
        print(f"  train loss       {fmt(first['train']['loss'])} -> {fmt(last['train']['loss'])}")
    dropped = last.get("telemetry", {}).get("dropped_total", 0)
    hook = [r["telemetry"]["hook_ms"] for r in records if "telemetry" in r]
    built = "/".join(sorted({str(r.get("telemetry", {}).get("built_by")) for r in records}))
    print(f"  telemetry        hook {sum(hook) / len(hook):.2f} ms per collection, {dropped} snapshots dropped, "
          f"records built by the {built}")


if __name__ == "__main__":
    sys.exit(main())
