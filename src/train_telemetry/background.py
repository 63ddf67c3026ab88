"""Set-up the training thread must not wait for, on a daemon thread of its own.

Runs in: the training process, on threads the hook starts (never the hook's own work).
Apart from the facade (telemetry.py) so that its state machine reads as one: these are the
two ways telemetry gets ready after the first ``on_batch_end`` instead of in ``start()``.

- The seed's integration example never calls ``start()``: the first hook starts telemetry
  with the model and optimizer it is given (``start_from_hook``).
- ``start()`` without a model: the first hook's model is set up (``set_up_from_hook``).

Either way training does not wait (collections due meanwhile are counted as dropped, unless
``on_full: block`` asked to wait, bounded), and a failure is one warning, never an
exception in the training loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .config import TelemetryConfigError
from .shards import has_dtensor_params

__all__ = ["Background", "set_up_from_hook", "start_from_hook"]

Warn = Callable[[str, str], None]  # (key, message): warn once per key


class Background:
    """``work`` on a daemon thread; an exception it raises goes to ``on_error``."""

    def __init__(self, name: str, work: Callable[[], object], on_error: Callable[[Exception], None]) -> None:
        self._work, self._on_error = work, on_error
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except Exception as exc:
            self._on_error(exc)

    def join(self, timeout: float | None = None) -> None:
        """Wait for it (at most ``timeout``); returns at once on its own thread."""
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def elsewhere(self) -> bool:
        """Whether the caller runs on another thread than this one."""
        return self.thread is not threading.current_thread()


def start_from_hook(model: object, optimizers: list[torch.optim.Optimizer],
                    start: Callable[[torch.nn.Module, list[torch.optim.Optimizer]], object],
                    stopped: Callable[[], bool], warn: Warn) -> Background | None:
    """``start(model, optimizers)`` on a thread, or None (with a warning) where it cannot be."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # start() agrees with the other ranks through a collective: from a thread it could
        # interleave with training's own collectives.
        warn("before_start", "on_batch_end() before start() under torch.distributed: nothing "
             "is collected; call telemetry.start(model, optimizer) on every rank before training")
        return None
    if not isinstance(model, torch.nn.Module):
        warn("before_start", "on_batch_end() before start() without a model: nothing is "
             "collected; call telemetry.start(model, optimizer) before training")
        return None
    warn("before_start", "on_batch_end() before start(): telemetry starts now with the model and "
         "optimizer given here, set up on a background thread (training does not wait; collections "
         "due until it is ready are counted as dropped). Call telemetry.start(model, optimizer) "
         "before training to collect from the first step and to see set-up errors there")

    def failed(exc: Exception) -> None:
        if not stopped():
            warn("auto_start", f"telemetry could not start ({type(exc).__name__}: {exc}); nothing is collected")

    return Background("train-telemetry-start", lambda: start(model, optimizers), failed)


def set_up_from_hook(model: torch.nn.Module, set_up: Callable[[], None], warn: Warn) -> Background:
    """``set_up()`` (the model the first hook brought) on a thread, so the hook never waits
    for pickling or the worker."""

    def work() -> None:
        if has_dtensor_params(model):
            raise TelemetryConfigError("a sharded (FSDP2) model must be passed to start() on every rank")
        set_up()

    def failed(exc: Exception) -> None:
        # Nothing more is collected, but the hook goes on: under torch.distributed this rank
        # must still join the collection steps' collective; its collections count as dropped.
        warn("late_setup", f"telemetry could not set up the model given to the first on_batch_end "
             f"({type(exc).__name__}: {exc}); nothing more is collected. "
             "Pass the model to start() to get this error there")

    return Background("train-telemetry-setup", work, failed)
