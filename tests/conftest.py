"""Shared test set-up: the order the suite runs in, and the tiny run most tests train.

Unit tests first (under a minute: what to run while working, ``pytest tests/unit``), then
the end-to-end runs, then the ones marked ``slow`` (real training subprocesses:
``pytest -m "not slow"`` leaves them out): a failure in the fast layers shows first, and
the suite stops early on ``-x`` before the long runs start. The whole suite runs on two
workers (``-n 2 --dist loadgroup``, pytest-xdist), with the torchrun files first on one.

Fixtures (from ``tests/tiny.py``, which test files may also import directly):

- ``tiny_config(mode="sync", **keys)``: a config under ``tmp_path / "run"`` that records
  every collection (every step, ``on_full: block``, no overhead budget).
- ``tiny_run(mode="sync", **keys)``: a started :class:`tiny.TinyRun` (TinyNet, SGD, its
  holdout set, the telemetry); ``.train(range(n))`` then ``.finish()`` gives the records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny import TinyRun
from tiny import tiny_config as _tiny_config
from tiny import tiny_run as _tiny_run

from train_telemetry import TelemetryConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under pytest-xdist (the README's `-n 2 --dist loadgroup`) the tests that must share one
    # worker (xdist_group: the torchrun files) go first: that worker runs them while the other
    # takes the rest, instead of the whole group running alone at the end.
    parallel = bool(os.environ.get("PYTEST_XDIST_WORKER")) or bool(getattr(config.option, "numprocesses", None))

    def rank(item: pytest.Item) -> int:
        if parallel and item.get_closest_marker("xdist_group"):
            return -1
        if "tests/unit/" in item.nodeid or item.nodeid.startswith("unit/"):
            return 0
        return 2 if item.get_closest_marker("slow") else 1

    items.sort(key=rank)  # stable: the files' own order within each layer


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., TelemetryConfig]:
    """``tiny_config(mode="sync", **keys)``: see tiny.tiny_config; the output under tmp_path/run."""
    return lambda mode="sync", **keys: _tiny_config(tmp_path / "run", mode, **keys)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Iterator[Callable[..., TinyRun]]:
    """``tiny_run(mode="sync", **keys)``: a started TinyRun under tmp_path/run; stopped at teardown."""
    runs: list[TinyRun] = []

    def start(mode: str = "sync", **keys: Any) -> TinyRun:
        runs.append(_tiny_run(tmp_path / "run", mode, **keys))
        return runs[-1]

    yield start
    for run in runs:
        run.telemetry.stop()  # a test that failed mid-run must not leave its worker behind
