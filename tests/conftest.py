"""Shared test set-up: the order the suite runs in.

Unit tests first (under a minute: what to run while working, ``pytest tests/unit``), then
the end-to-end runs, then the ones marked ``slow`` (real training subprocesses:
``pytest -m "not slow"`` leaves them out): a failure in the fast layers shows first, and
the suite stops early on ``-x`` before the long runs start.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if "tests/unit/" in item.nodeid or item.nodeid.startswith("unit/"):
            return 0
        return 2 if item.get_closest_marker("slow") else 1

    items.sort(key=rank)  # stable: the files' own order within each layer
