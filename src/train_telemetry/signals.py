"""The process around a running Telemetry: fork, interpreter exit, SIGTERM.

Runs in: the training process. ``track`` registers a started Telemetry; from then on:

- a forked child (a DataLoader worker, say) inherits it but must never touch the parent's
  queues or slots: ``after_fork()`` makes its hook a no-op and its stop() do nothing;
- the interpreter exiting without stop() stops it (``atexit``), bounded in time;
- SIGTERM (preemption: SLURM, Kubernetes, spot instances): drain, then let it act as
  before. Its default action kills the process without atexit, losing what is queued. A
  signal handler is one per process, so this state is the module's, not an instance's:
  the handler (installed from the main thread, where Python runs signal handlers) drains
  every tracked Telemetry, for at most the largest ``sigterm_drain_s``, then calls the
  handler that was there before (the user's), or dies by SIGTERM as it would have.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Drainable(Protocol):
    def drain_for_signal(self, deadline: float) -> None: ...

    def after_fork(self) -> None: ...

    @property
    def sigterm_drain_s(self) -> float: ...


_targets: Callable[[], Iterable[Drainable]] = list
_live: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_live):
        t.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def track(target: Drainable, at_exit: Callable[[], None]) -> None:
    """``target`` has started: disable it in forked children, call ``at_exit`` at the
    interpreter's exit, drain it on SIGTERM (when its ``sigterm_drain_s`` > 0)."""
    _live.add(target)
    atexit.register(at_exit)
    if target.sigterm_drain_s > 0:
        install_sigterm_drain(lambda: list(_live))


def install_sigterm_drain(targets: Callable[[], Iterable[Drainable]]) -> None:
    """Drain ``targets()`` on SIGTERM, then let it act as before (default: die by it; the user's: chain)."""
    global _targets
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the at-exit hook still covers normal exits
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current == signal.SIG_IGN:
        return  # installed already, or the user ignores SIGTERM: nothing to drain for
    _previous.append(current)
    _targets = targets
    signal.signal(signal.SIGTERM, _on_sigterm)


# The handlers ours replaced, oldest first. Usually one. More when a handler installed after
# ours calls the one it replaced (Lightning's signal connector does) and a later start()
# installs ours on top of it again: SIGTERM then runs ours -> theirs -> ours. Each time ours
# is entered again inside that chain it calls the next older handler instead, so every
# handler runs once, the drain first, and the oldest ends it as it would have without us.
_previous: list[Any] = []
_depth = 0


def _on_sigterm(signum: int, frame: Any) -> None:
    global _depth
    depth, _depth = _depth, _depth + 1
    try:
        if depth == 0:
            _drain()
        index = len(_previous) - 1 - depth
        previous = _previous[index] if index >= 0 else signal.SIG_DFL
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        # The default action, exactly as without us: die by SIGTERM (exit status -15 / 143).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        _depth = depth


def _drain() -> None:
    live = list(_targets())
    bound = max([t.sigterm_drain_s for t in live], default=0.0)
    deadline = time.monotonic() + bound  # the user's handler runs no later than this (plus kill grace)
    for t in live:
        with contextlib.suppress(Exception):  # never keep the signal from acting
            t.drain_for_signal(deadline)
