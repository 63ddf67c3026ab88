"""The tiny model, config and training loop the end-to-end tests share.

Importable from every test file (``from tiny import TinyNet, tiny_config, train``): pytest
puts ``tests/`` on ``sys.path`` when it loads ``tests/conftest.py``, and the telemetry
worker keeps the trainer's ``sys.path``, so under spawn :class:`TinyNet` goes to the worker
by name, as a user's ``from model import Net`` does. ``tests/conftest.py`` wraps them as
fixtures (``tiny_config``, ``tiny_run``). A test whose point is a model of its own (a
tokenizer-sized vocabulary, keyword inputs, BatchNorm) keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train_telemetry import Metric, Telemetry, TelemetryConfig, read_records
from train_telemetry.config import MOVED_TO_TUNING, Tuning

Batch = tuple[torch.Tensor, torch.Tensor]


class TinyNet(nn.Module):
    """``head(relu(body(x)))``: two param-holding layers, so two named groups are possible."""

    def __init__(self, n_in: int = 6, hidden: int = 8, n_out: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(n_in, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def tiny_config(output_dir: Path, mode: str = "sync", **overrides: Any) -> TelemetryConfig:
    """A config that records every collection: every step, ``on_full: block``, no overhead
    budget, the worker at normal priority (a test on a busy machine must not starve it).

    ``overrides``: any config key, and any :class:`Tuning` knob by name.
    """
    tuning = {k: overrides.pop(k) for k in list(overrides) if k in MOVED_TO_TUNING}
    values: dict[str, Any] = {"output_dir": str(output_dir), "mode": mode, "collect_every_n": 1,
                              "on_full": "block", "overhead_budget": None}
    values.update(overrides)
    return TelemetryConfig(**values, tuning=Tuning(**{"worker_nice": 0, **tuning}))


def batches(seed: int, n_in: int = 6, n_out: int = 3, rows: int = 12) -> Iterator[Batch]:
    """An endless stream of ``(x, y)`` batches from its own generator (the same for a seed)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(rows, n_in, generator=g), torch.randint(0, n_out, (rows,), generator=g)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain step (zero_grad, cross-entropy, backward, step): the loss and the outputs."""
    outputs = model(batch[0])
    loss = nn.functional.cross_entropy(outputs, batch[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, outputs


@dataclass
class TinyRun:
    """A started run of :class:`TinyNet` under SGD; :meth:`train` runs it, :meth:`finish` stops it."""

    model: nn.Module
    opt: torch.optim.Optimizer
    telemetry: Telemetry
    data: Iterator[Batch]
    seen: list[Batch] = field(default_factory=list)  # each step's batch, for a test's own torch reference

    def train(self, steps: range, epoch: int = 0,
              on_step: Callable[[int, TinyRun], None] | None = None, **hook: Any) -> None:
        """``steps`` steps, the hook after each with ``batch_idx`` = the step (and ``hook``'s keywords)."""
        for step in steps:
            batch = next(self.data)
            self.seen.append(batch)
            loss, outputs = sgd_step(self.model, self.opt, batch)
            self.telemetry.on_batch_end(self.model, self.opt, step, epoch, None, batch, loss=loss, **hook)
            if on_step is not None:
                on_step(step, self)

    def finish(self) -> list[dict[str, Any]]:
        """stop(), then every record written."""
        self.telemetry.stop()
        out = self.telemetry.output_dir
        assert out is not None
        return read_records(out)


def tiny_run(output_dir: Path, mode: str = "sync", seed: int = 0, holdout: bool = True,
             model: nn.Module | None = None, metrics: Sequence[Metric] = (), **config: Any) -> TinyRun:
    """A started :class:`TinyRun` (weights from ``torch.manual_seed(0)``), its holdout set
    from the same data stream when ``holdout``, the user ``metrics`` given."""
    torch.manual_seed(0)
    model = model if model is not None else TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(seed)
    telemetry = Telemetry(tiny_config(output_dir, mode, **config), metrics=metrics)
    if holdout:
        telemetry.set_holdout_data(next(data))
    telemetry.start(model, opt)
    return TinyRun(model, opt, telemetry, data)
