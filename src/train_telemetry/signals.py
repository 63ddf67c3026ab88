"""SIGTERM (preemption: SLURM, Kubernetes, spot instances): drain, then let it act as before.

Runs in: the training process's main thread (where Python runs signal handlers). The
default action of SIGTERM kills the process without atexit, losing what is queued. A
signal handler is one per process, so this state is the module's, not an instance's: the
handler drains every running Telemetry, for at most the largest ``sigterm_drain_s``, then
calls the handler that was there before (the user's), or dies by SIGTERM as it would have.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Drainable(Protocol):
    def drain_for_signal(self, deadline: float) -> None: ...

    @property
    def sigterm_drain_s(self) -> float: ...


_previous: Any = None
_targets: Callable[[], Iterable[Drainable]] = list


def install_sigterm_drain(targets: Callable[[], Iterable[Drainable]]) -> None:
    """Drain ``targets()`` on SIGTERM, then let it act as before (default: die by it; the user's: chain)."""
    global _previous, _targets
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the at-exit hook still covers normal exits
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current == signal.SIG_IGN:
        return  # installed already, or the user ignores SIGTERM: nothing to drain for
    _previous, _targets = current, targets
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    live = list(_targets())
    bound = max([t.sigterm_drain_s for t in live], default=0.0)
    deadline = time.monotonic() + bound  # the user's handler runs no later than this (plus kill grace)
    for t in live:
        with contextlib.suppress(Exception):  # never keep the signal from acting
            t.drain_for_signal(deadline)
    if callable(_previous):
        _previous(signum, frame)
        return
    # The default action, exactly as without us: die by SIGTERM (exit status -15 / 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
