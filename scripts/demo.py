#!/usr/bin/env python3
"""The main job: train the seed's Siamese pair model with telemetry on, then report on it.

    python scripts/demo.py                          # healthy run -> runs/demo-healthy
    python scripts/demo.py --preset head_lr_100x    # inject a known pathology
    python scripts/demo.py --list-presets
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.demo import PRESETS, train

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="healthy", choices=sorted(PRESETS))
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="telemetry YAML")
    parser.add_argument("--output-dir", default=None, help="run directory (default runs/demo-<preset>)")
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
    out = Path(args.output_dir or f"runs/demo-{args.preset}")
    if out.exists():
        shutil.rmtree(out)  # a demo run starts fresh; records are append-only otherwise
    out.parent.mkdir(parents=True, exist_ok=True)
    changes: dict[str, object] = {"output_dir": str(out)}
    if args.collect_every_n:
        changes["collect_every_n"] = args.collect_every_n
    if args.mode:
        changes["mode"] = args.mode
    if args.on_full:
        changes["on_full"] = args.on_full
    config = config.replace(**changes)

    print(f"training preset {args.preset!r}: {PRESETS[args.preset]}")
    result = train(Telemetry(config), args.preset, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed)
    records = read_records(out)
    print(f"\n{result['steps']} steps, final val accuracy {result['val_accuracy']:.3f}; "
          f"{len(records)} telemetry records in {out}/telemetry.jsonl")
    print_brief(records)
    if args.no_report:
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
        print(f"  holdout accuracy {fmt(first['holdout_logits']['accuracy'])} -> {fmt(last['holdout_logits']['accuracy'])}")
    if "train" in last:
        print(f"  train loss       {fmt(first['train']['loss'])} -> {fmt(last['train']['loss'])}")
    dropped = last.get("telemetry", {}).get("dropped_total", 0)
    hook = [r["telemetry"]["hook_ms"] for r in records if "telemetry" in r]
    built = "/".join(sorted({str(r.get("telemetry", {}).get("built_by")) for r in records}))
    print(f"  telemetry        hook {sum(hook) / len(hook):.2f} ms per collection, {dropped} snapshots dropped, "
          f"records built by the {built}")


if __name__ == "__main__":
    sys.exit(main())
