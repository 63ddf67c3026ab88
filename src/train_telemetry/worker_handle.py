"""The training process's handle on the worker process: start, watch, stop, terminate, reap.

Runs in: the training process. The protocol is NOTE [worker lifecycle] in worker.py.
Every wait here has a deadline; none runs in the hook (the hook reads one flag,
``exited``, set by a watcher thread that sleeps until the worker ends).

The worker is started without re-running the trainer's main script
(:func:`without_main_rerun`): under ``spawn`` and ``forkserver`` multiprocessing would
otherwise execute that script again in the worker, as ``__mp_main__``.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import multiprocessing.spawn
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as tmp

from .config import TelemetryConfig, TelemetryConfigError
from .messages import Done, Ready, Stop
from .snapshot import Channel
from .worker import worker_loop

TERM_GRACE_S = 2.0  # after the stop deadline: SIGTERM, this long, then SIGKILL

# What multiprocessing.spawn.prepare() reads to run the parent's __main__ in a new process:
# by module name (``python -m pkg.train``) or by file (``python train.py``).
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")
_PREPARATION_LOCK = threading.Lock()  # one start at a time swaps get_preparation_data


class TelemetryStartError(RuntimeError):
    """``start()`` could not get the collector running; the message says why and the fix."""


class Waiting:
    """The trainer waits for a slot (``on_full: block``) or for the backlog (``stop()``).

    ``flag[0]``: 1 while it waits; the worker then runs with every core's thread
    (``worker.boost_threads``) instead of ``worker_threads``, since the cores it would
    take from training are idle. ``freed``: a semaphore the worker releases each time it
    frees a slot while the flag is up, so the waiting trainer wakes at once instead of
    polling. Shared by every worker of a run (a replacement inherits them).
    """

    def __init__(self, ctx: Any) -> None:
        self.flag = ctx.RawArray("b", 1)
        self.freed = ctx.Semaphore(0)


class WorkerHandle:
    """One worker process and its two queues; ``channel`` is the slots' shared state."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path, channel: Channel | None = None,
                 waiting: Waiting | None = None) -> None:
        if config.start_method == "fork" and torch.cuda.is_initialized():
            raise TelemetryConfigError(
                "start_method: fork after CUDA was initialised would crash the worker; use spawn (the default)"
            )
        ctx: Any = tmp.get_context(config.start_method)
        self.to_worker = ctx.Queue()
        # If the worker dies, our exit must not hang flushing this queue (DataLoader does the same).
        self.to_worker.cancel_join_thread()
        self.from_worker = ctx.Queue()
        if channel is None:
            channel = Channel(ctx, config.num_slots)
        else:
            channel.renew(ctx)  # the slots stay; the ring and semaphore are the new worker's
        self.channel = channel
        self.waiting = waiting if waiting is not None else Waiting(ctx)
        self.exited = False  # set by the watcher thread when the process ends
        self.proc = ctx.Process(
            target=worker_loop,
            args=(config, str(run_dir), str(records_file), self.to_worker, self.from_worker, self.channel,
                  os.getpid(),
                  # PDEATHSIG follows the starting thread: from any other, rely on polling.
                  threading.current_thread() is threading.main_thread(), self.waiting),
            name="train-telemetry-worker",
            daemon=True,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def start(self, timeout: float, on_exit: Callable[[WorkerHandle], None] | None = None) -> None:
        """Start the process and wait for its Ready (raises TelemetryStartError).

        ``on_exit(self)`` is called from the watcher thread when the process ends.
        """
        try:
            with without_main_rerun():
                self.proc.start()
        except Exception as exc:
            raise TelemetryStartError(f"could not start the telemetry worker: {type(exc).__name__}: {exc}") from exc
        self.await_reply(Ready, timeout, "start")
        sentinel = self.proc.sentinel

        def watch() -> None:
            # The hook tests this flag instead of asking the OS (Process.is_alive is a
            # waitpid system call: ~25 us of a collection step).
            with contextlib.suppress(Exception):
                multiprocessing.connection.wait([sentinel])
            self.exited = True
            if on_exit is not None:
                with contextlib.suppress(Exception):
                    on_exit(self)

        threading.Thread(target=watch, name="train-telemetry-watch", daemon=True).start()

    def await_reply(self, kind: type, timeout: float, what: str) -> Any:
        """The next message of type ``kind`` from the worker, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.from_worker.get(timeout=0.2)
            except queue.Empty:
                msg = None
            if isinstance(msg, kind):
                return msg
            if msg is None and not self.proc.is_alive():
                raise TelemetryStartError(
                    f"the telemetry worker (pid {self.proc.pid}) exited during {what} "
                    f"with {describe_exit(self.proc.exitcode)}; see its output above"
                )
            if time.monotonic() > deadline:
                raise TelemetryStartError(
                    f"the telemetry worker did not answer within start_timeout_s={timeout:g}s during {what}: "
                    "raise start_timeout_s on a slow or loaded machine"
                )

    def send(self, message: Any) -> None:
        self.to_worker.put(message)

    def stop(self, deadline: float) -> tuple[Done | None, bool]:
        """Ask the worker to drain and exit; (its Done or None, whether it had to be killed)."""
        with contextlib.suppress(Exception):
            if self.proc.is_alive():
                self.to_worker.put(Stop())
        done: Done | None = None
        seen_dead = False
        while time.monotonic() < deadline and done is None:
            try:
                msg = self.from_worker.get(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if not self.proc.is_alive():
                    # Done may have reached the pipe between our timeout and its exit:
                    # read once more before concluding it ended without reporting.
                    if seen_dead:
                        break
                    seen_dead = True
                continue
            except Exception:
                break
            if isinstance(msg, Done):
                done = msg
        self.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        terminated = self.proc.is_alive()
        if terminated:
            self.terminate()
        return done, terminated

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL, each with a short grace; reaps the process."""
        if self.proc.pid is None or not self.proc.is_alive():
            return
        self.proc.terminate()
        self.proc.join(TERM_GRACE_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(TERM_GRACE_S)


@contextlib.contextmanager
def without_main_rerun() -> Iterator[None]:
    """Processes started by this thread inside the block do not run the parent's ``__main__``.

    Why: under ``spawn`` (and ``forkserver``) a child first runs ``spawn.prepare()`` on the
    parent's preparation data, and that data names the main script, which the child then
    executes from the top as ``__mp_main__``. A script without an
    ``if __name__ == "__main__":`` guard (nanoGPT's train.py, most research scripts) would
    run its whole training again in our worker: its start-up output printed twice, its
    ``init_process_group`` called by a process that is no rank, and ``Telemetry.start()``
    inside it refused by multiprocessing. The worker needs nothing from that script:
    ``worker_loop`` is ours, and whatever the script defines (its model class, forward_fn,
    metrics) sending.py sends by value. So the main-script keys are dropped from the
    preparation data; ``sys_path``, ``dir``, ``sys_argv`` and the rest stay, so the worker
    still imports the script's sibling modules (``from model import GPT``) by name.

    How: popen_spawn_posix, popen_forkserver and popen_spawn_win32 (CPython 3.10 to 3.14)
    all call ``spawn.get_preparation_data`` through the module attribute, from
    ``Process.start()`` on the starting thread; so does ``forkserver.ensure_running`` when
    that start launches the fork server, which on CPython releases with the fix of
    gh-126631 would otherwise preload (run) the script there. The attribute is swapped for
    the block's duration under a lock, and the replacement drops the keys only for calls
    from this thread: a DataLoader starting its own workers from another thread meanwhile
    gets the usual data. ``fork`` never calls it: a forked worker has the parent's memory
    and re-runs nothing.
    """
    with _PREPARATION_LOCK:
        original = multiprocessing.spawn.get_preparation_data
        starter = threading.get_ident()
        active = True

        def get_preparation_data(name: str) -> dict[str, Any]:
            data: dict[str, Any] = original(name)
            if active and threading.get_ident() == starter:
                data = {key: value for key, value in data.items() if key not in _MAIN_KEYS}
            return data

        multiprocessing.spawn.get_preparation_data = get_preparation_data
        try:
            yield
        finally:
            active = False  # if someone wrapped ours meanwhile and keeps it, it is a no-op now
            if multiprocessing.spawn.get_preparation_data is get_preparation_data:
                multiprocessing.spawn.get_preparation_data = original


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        return f"signal {signal_name(code)}"
    return f"exit code {code}"


def signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
