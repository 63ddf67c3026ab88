"""SIGTERM: the drain runs once and chains to the handler that was there before, also when a
framework's handler (Lightning's signal connector) wraps ours and a later start() installs
ours again on top of it: no loop."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from train_telemetry import signals


class Target:
    """A started Telemetry as the handler sees it."""

    sigterm_drain_s = 1.0

    def __init__(self) -> None:
        self.drained = 0

    def drain_for_signal(self, deadline: float) -> None:
        self.drained += 1

    def after_fork(self) -> None:
        pass


class Wrapping:
    """A framework's handler that calls the one it replaced, as Lightning's does."""

    def __init__(self) -> None:
        self.previous = signal.getsignal(signal.SIGTERM)
        self.calls = 0
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum: int, frame: Any) -> None:
        self.calls += 1
        if callable(self.previous):
            self.previous(signum, frame)


@pytest.fixture
def clean_sigterm(monkeypatch: pytest.MonkeyPatch) -> Any:
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(signals, "_previous", [])
    monkeypatch.setattr(signals, "_targets", list)
    signal.signal(signal.SIGTERM, lambda *a: None)  # the user's own: a handler that returns
    yield
    signal.signal(signal.SIGTERM, before)


def test_ours_then_a_framework_wrapping_it_then_ours_again_runs_each_once(clean_sigterm: Any) -> None:
    user_calls: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: user_calls.append(signum))
    target = Target()
    signals.install_sigterm_drain(lambda: [target])
    framework = Wrapping()
    signals.install_sigterm_drain(lambda: [target])  # a second start() in the same process
    assert signal.getsignal(signal.SIGTERM) is signals._on_sigterm
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before kill returns here
    # ours (drain) -> the framework's -> ours again, which calls the user's: each once
    assert (target.drained, framework.calls) == (1, 1)
    assert user_calls == [signal.SIGTERM]


def test_the_handler_before_ours_runs_after_the_drain(clean_sigterm: Any) -> None:
    order: list[str] = []

    class Logged(Target):
        def drain_for_signal(self, deadline: float) -> None:
            order.append("drain")

    signal.signal(signal.SIGTERM, lambda signum, frame: order.append("user"))
    signals.install_sigterm_drain(lambda: [Logged()])
    os.kill(os.getpid(), signal.SIGTERM)
    assert order == ["drain", "user"]
