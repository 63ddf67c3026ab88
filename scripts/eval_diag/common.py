"""What every program shares: the case description, the telemetry config, the data.

Runs in: the harness's training processes.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train_telemetry import TelemetryConfig


@dataclass(frozen=True)
class Case:
    """One training run: a program, the bug injected into it ("healthy": none), and what the
    diagnosis must say about it."""

    program: str
    bug: str
    seed: int = 0
    # The code that must be named (None: a healthy run, nothing serious may be named).
    expect: str | None = None
    # Codes the bug may bring along because it causes them (not counted as false alarms).
    consequences: frozenset[str] = frozenset()
    # Injected spikes: (first step, "recover" | "diverge", "loss" | "both").
    spikes: tuple[tuple[int, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.program}/{self.bug}" + (f"-s{self.seed}" if self.seed else "")


def telemetry_config(out: Path, *, every: int = 1, holdout_size: int = 64, **extra: Any) -> TelemetryConfig:
    """The config a user would write for a small CPU run: collect every step (the runs are
    short; spikes last a few steps), built in the training process (``mode: sync``, a
    documented setting), with no overhead budget so that no collection is skipped."""
    return TelemetryConfig(
        output_dir=str(out), collect_every_n=every, mode="sync", overhead_budget=None,
        holdout_size=holdout_size, **extra,
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """~300 KB of English-ish text, offline: docstrings of standard-library modules."""
    import argparse
    import csv
    import dataclasses
    import inspect
    import logging
    import os
    import subprocess
    import unittest
    import warnings

    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in (logging, subprocess, dataclasses, inspect, unittest, argparse, csv, os):
            parts.append(module.__doc__ or "")
            for name in sorted(dir(module)):
                doc = None if name.startswith("_") else getattr(getattr(module, name), "__doc__", None)
                if isinstance(doc, str):
                    parts.append(doc)
    allowed = set(string.printable)
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    return "".join(c for c in text if c in allowed)


def char_data() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, vocabulary size) of :func:`corpus`, 90/10."""
    text = corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


def table(name: str, seed: int, *, standardise: bool = True) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_holdout, y_holdout) of a scikit-learn bundled table, 75/25."""
    from sklearn import datasets

    data = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
            "digits": datasets.load_digits}[name]()  # fmt: skip
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(100 + seed))
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    if standardise:
        mean, std = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-6)
        x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]
