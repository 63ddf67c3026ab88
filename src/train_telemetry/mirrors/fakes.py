"""Fake trackers that misbehave: for scripts/mirror_bench.py, tests, and trying a setup.

Runs in: a mirror's thread (hub.py). Name one in a config as
``mirror: {"train_telemetry.mirrors.fakes:SleepingMirror": {seconds: 0.7}}``.
"""

from __future__ import annotations

import threading
import time

from .base import BaseMirror


class SleepingMirror(BaseMirror):
    """Every call takes ``seconds`` (azureml-mlflow's ~700 ms per blocking call by default)."""

    name = "sleeping"

    def __init__(self, seconds: float = 0.7) -> None:
        self.seconds = seconds

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        time.sleep(self.seconds)


class HungMirror(BaseMirror):
    """A call that never returns (a tracker server that accepts the connection, then hangs)."""

    name = "hung"

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        threading.Event().wait()


class RaisingMirror(BaseMirror):
    """Every call raises (a tracker that is down)."""

    name = "raising"

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise ConnectionError("tracker down")
