"""Where a filled slot goes: built inline (``mode: sync``) or handed to the worker (``async``);
``mode: auto`` picks one of the two at start (``resolve_mode``).

Runs in: the training process. Two classes behind one interface, :class:`Sink` (the
DataLoader's single-process / multi-process iterator split), so the facade has no
``if mode`` branch and never looks behind it:

- ``slot_pool(layout)``: the snapshot slots, in memory the records' builder can read;
- ``setup(setup, on_cuda)``: once, before the first snapshot (raises what start() should raise);
- ``acquire()``: a free slot or None; ``wait_for_slot(deadline)``: one, waiting for it
  (``on_full: block``); ``release(slot)``: give back a slot the hook took and will not submit;
- ``submit(slot, seq)``: the hook filled ``slot`` and wrote its header;
- ``send_groups(groups)``: the param -> group map changed (before the snapshot naming it);
- ``exited``: the worker is gone for good (a plain attribute: the hook reads it);
  ``worker_pid`` / ``worker_exitcode``: the current worker's, None inline;
- ``close(deadline) -> Finished``: write everything submitted, end, report; ``abort()``:
  end without writing (start() failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .budget import usable_cores
from .config import TelemetryConfig
from .messages import Done, Groups, Setup, SetupDone, read_header
from .metrics.holdout import plain_numerics
from .mirrors import attach_active_runs, close_mirrors
from .processor import SnapshotProcessor
from .records import repair_torn_tail
from .sending import dumps_for_worker
from .snapshot import Channel, Layout, SlotPool
from .worker_handle import TelemetryStartError, WorkerHandle, describe_exit
from .writer import OnceLog, RecordWriter, count_records, last_seq


@dataclass
class Finished:
    """What a sink reports when it is closed."""

    done: Done | None  # None: the worker ended without reporting
    terminated: bool = False  # the worker had to be killed
    exitcode: int | None = None
    pid: int | None = None
    restarts: int = 0


class InlineSink:
    """``mode: sync`` (or auto on a CPU trainer without a spare core): the training thread
    builds and writes each record itself (the seed's design), with the worker's code."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.channel = Channel(None, 1)
        self.log = OnceLog("telemetry")
        self.writer = RecordWriter(records_file, config.fsync, self.log, config.io_buffer_bytes)
        self.processor: SnapshotProcessor | None = None
        self.on_cuda = False
        self.exited = False  # there is no worker to die
        self.restarts = 0

    worker_pid: int | None = None  # no worker: the training thread builds the records
    worker_exitcode: int | None = None

    def slot_pool(self, layout: Layout, replicas: int = 0) -> SlotPool:
        return SlotPool(layout, self.channel, shared=False, replicas=replicas)  # read by this process only

    def setup(self, setup: Setup, on_cuda: bool) -> None:
        self.on_cuda = on_cuda
        self.processor = SnapshotProcessor(self.config, self.run_dir, setup, self.writer, self.log)
        self.processor.built_by = "trainer"
        if setup.init_slot is not None:
            self.channel.release(setup.init_slot)
        with plain_numerics():
            error = self.processor.check_holdout()
        if error:
            raise TelemetryStartError(error)

    def acquire(self) -> int | None:
        return self.channel.acquire()

    def wait_for_slot(self, deadline: float) -> int | None:
        # Inline, the slot is free again when submit returns: nothing to wait for.
        return self.channel.acquire()

    def release(self, slot: int) -> None:
        self.channel.release(slot)

    def submit(self, slot: int, seq: int) -> None:
        assert self.processor is not None
        if self.on_cuda:  # the copies into the slot are asynchronous: wait for them here
            torch.cuda.current_stream().synchronize()
        with plain_numerics():  # the same record as the worker's, whatever the caller's autocast
            self.processor.handle(read_header(self.channel.headers_view, slot), self.channel.release)

    def send_groups(self, groups: Groups) -> None:
        if self.processor is not None:
            self.processor.add_groups(groups)

    def close(self, deadline: float) -> Finished:
        with contextlib.suppress(OSError):  # counted in io_errors; stop() never raises
            self.writer.close()
        p = self.processor
        if p is not None:  # the records are on disk: now the trackers, abandoned at the deadline
            p.finish()
            close_mirrors(p.mirrors, self.config, deadline)
        done = Done(self.writer.records_written, dict(p.errors) if p else {}, list(p.last_errors) if p else [],
                    self.writer.io_errors)
        done.last_errors += self.writer.problems.values()
        return Finished(done)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()


class WorkerSink:
    """``mode: async``: slots are published to the worker process through shared memory.

    A worker that dies (a signal, the OOM killer, an exception in its loop) is replaced
    off the training thread, at most ``max_worker_restarts`` times, after a growing delay.
    The new worker first replays every slot that was published and not released (a slot
    is released only after its line is written, processor.py), skipping what is on disk
    already; snapshots the hook takes meanwhile wait in their slots. A snapshot that was
    being processed when two workers died is written as a record with a ``WorkerCrash``
    error instead of being replayed a third time.
    """

    RESTART_DELAY_S = 0.5  # then doubled for each restart

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.records_file = records_file
        self.worker = WorkerHandle(config, run_dir, records_file)
        self.channel = self.worker.channel
        self.waiting = self.worker.waiting  # shared with every replacement worker
        self.handoff: _HandOff | None = None
        self.setup_obj: Setup | None = None
        self.restarts = 0
        self.gave_up = False  # restarts exhausted (or impossible): the run goes on without telemetry
        self.exited = False  # the same, as the hook reads it (a plain attribute: the hot path)
        self._lock = threading.Lock()
        self._restarting = False
        self._records_before = count_records(records_file)
        self._crashes: dict[int, int] = {}  # seq -> workers that died while it was the oldest unreleased
        self._dead_workers = 0  # replaced or given up on
        self._closing = False
        self._restart_thread: threading.Thread | None = None
        self.worker.start(config.start_timeout_s, on_exit=self._on_worker_exit)


    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid

    @property
    def worker_exitcode(self) -> int | None:
        return self.worker.exitcode

    def slot_pool(self, layout: Layout, replicas: int = 0) -> SlotPool:
        return SlotPool(layout, self.channel, shared=True, replicas=replicas)  # mapped by every worker of the run

    def setup(self, setup: Setup, on_cuda: bool) -> None:
        self.setup_obj = setup
        self._send_setup(self.worker, setup)
        if on_cuda:
            self.handoff = _HandOff(self)

    def _send_setup(self, worker: WorkerHandle, setup: Setup) -> None:
        try:
            payload = dumps_for_worker(setup)
        except Exception as exc:
            raise TelemetryStartError(
                f"the model or forward_fn cannot be sent to the telemetry worker ({type(exc).__name__}: {exc}). "
                "Remove what cannot be pickled from the model (open files, locks, sockets), "
                "or set track_holdout_logits: false, or mode: sync"
            ) from exc
        worker.send(payload)
        done = worker.await_reply(SetupDone, self.config.start_timeout_s, "setup")
        if done.error:
            raise TelemetryStartError(done.error)

    def submit(self, slot: int, seq: int) -> None:
        if self.handoff is not None:
            # CUDA: the copies are still in flight; the hand-off thread waits on this event
            # (off the training thread) before it publishes the slot.
            event = torch.cuda.Event()
            event.record()
            self.handoff.submit(event, slot, seq)
        else:
            self.publish(slot, seq)

    def acquire(self) -> int | None:
        """A free slot for the hook (Channel.acquire)."""
        return self.channel.acquire()

    def release(self, slot: int) -> None:
        """A slot the hook took and will not submit (it failed filling it): free again."""
        self.channel.release(slot)

    def wait_for_slot(self, deadline: float) -> int | None:
        """A free slot, waiting until ``deadline`` (``on_full: block``); None past it or if
        the worker is gone for good.

        While we wait, training's cores are idle, so the waiting flag tells the worker to
        use all of them (worker._Threads), and it wakes us through ``waiting.freed`` when it
        frees a slot. This makes blocking cost about what building the record inline costs
        (``mode: sync``), not what a niced one-thread worker takes (docs/benchmarks.md).
        """
        flag, freed = self.waiting.flag, self.waiting.freed
        flag[0] = 1
        try:
            while True:
                slot = self.channel.acquire()  # after raising the flag: a slot freed before it is seen here
                if slot is not None or self.exited:
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                # The timeout bounds how late we see a worker death or a restart's replay.
                freed.acquire(timeout=min(left, 0.05))
        finally:
            flag[0] = 0

    def publish(self, slot: int, seq: int) -> None:
        """Hand ``slot`` to the worker, or, while a new one starts, leave it for the replay."""
        with self._lock:  # uncontended except while a restart swaps the ring
            if self._restarting:
                self.channel.mark_published(slot)
            else:
                self.channel.publish(slot)

    def send_groups(self, groups: Groups) -> None:
        if self.setup_obj is not None:
            self.setup_obj.groups = groups  # a new worker starts with the current map
            with contextlib.suppress(Exception):
                self.worker.send(groups)  # before the snapshot that names this version is published

    # -- a worker died ---------------------------------------------------------------
    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        """Called by the watcher thread when ``worker`` ended (not on the training thread)."""
        if self._closing or worker is not self.worker:
            return
        with contextlib.suppress(Exception):
            worker.proc.join(1.0)  # its exit code, for the messages
        if self.restarts >= self.config.max_worker_restarts or self.setup_obj is None:
            self._dead_workers += 1
            self._give_up(f"the telemetry worker (pid {worker.pid}) died with {describe_exit(worker.exitcode)}; "
                          f"{self.restarts} restart(s) allowed and made: the run goes on without telemetry")
            return
        with self._lock:
            self._restarting = True
        self._restart_thread = threading.Thread(target=self._restart, name="train-telemetry-restart", daemon=True)
        self._restart_thread.start()

    def _restart(self) -> None:
        dead = self.worker
        with contextlib.suppress(Exception):
            dead.proc.join(1.0)
        self._dead_workers += 1
        pending = self._pending()
        if pending:
            self._crashes[pending[0][0]] = self._crashes.get(pending[0][0], 0) + 1
        if self.restarts >= self.config.max_worker_restarts or self.setup_obj is None or self._closing:
            self._give_up(f"the telemetry worker (pid {dead.pid}) died with {describe_exit(dead.exitcode)}; "
                          f"{self.restarts} restart(s) already: the run goes on without telemetry")
            return
        time.sleep(self.RESTART_DELAY_S * 2**self.restarts)
        self.restarts += 1
        repair_torn_tail(self.records_file)  # the dead worker may have been cut off mid-line
        setup = dataclasses.replace(
            self.setup_obj, init_slot=None, restart=self.restarts, written_through_seq=last_seq(self.records_file),
            skip={seq: f"this snapshot was being processed when {n} workers died (last: "
                       f"{describe_exit(dead.exitcode)}); skipped so it cannot kill more"
                  for seq, n in self._crashes.items() if n >= 2})
        try:
            worker = WorkerHandle(self.config, self.run_dir, self.records_file, channel=self.channel,
                                  waiting=self.waiting)
            worker.start(self.config.start_timeout_s, on_exit=self._on_worker_exit)
            self.worker = worker
            self._send_setup(worker, setup)
        except Exception as exc:
            self._give_up(f"could not restart the telemetry worker: {type(exc).__name__}: {exc}")
            return
        warnings.warn(f"train-telemetry: the telemetry worker (pid {dead.pid}) died with "
                      f"{describe_exit(dead.exitcode)}; restarted it (pid {worker.pid}, restart "
                      f"{self.restarts} of {self.config.max_worker_restarts}), replaying {len(pending)} "
                      "snapshot(s) it held", RuntimeWarning, stacklevel=1)
        with self._lock:  # what the dead worker held, and what the hook published since, in order
            for _, slot in self._pending():
                self.channel.publish(slot)
            self._restarting = False

    def _pending(self) -> list[tuple[int, int]]:
        """(seq, slot) published but not released, oldest first: the dead worker's unfinished work."""
        return sorted((read_header(self.channel.headers_view, slot).seq, slot) for slot in self.channel.published())

    def _give_up(self, message: str) -> None:
        with self._lock:
            self.gave_up = self.exited = True
            self._restarting = False
        if not self._closing:
            warnings.warn(f"train-telemetry: {message}; later collections are counted as dropped",
                          RuntimeWarning, stacklevel=1)

    # -- stop ---------------------------------------------------------------------
    def close(self, deadline: float) -> Finished:
        if self._restart_thread is not None:  # a replacement on its way finishes first
            self._restart_thread.join(max(0.0, deadline - time.monotonic()))
        self._closing = True
        if self.handoff is not None:
            self.handoff.close(deadline)
        self.waiting.flag[0] = 1  # training waits for the backlog now: the worker may use every core
        done, terminated = self.worker.stop(deadline)
        if done is None or terminated:
            repair_torn_tail(self.records_file)  # the writer did not finish: leave whole lines only
        finished = Finished(done, terminated, self.worker.exitcode, self.worker.pid)
        finished.restarts = self.restarts
        if done is not None and self._dead_workers:
            # Records the dead workers wrote are on disk too: count them from the file.
            done.records_written = count_records(self.records_file) - self._records_before
        return finished

    def abort(self) -> None:
        self._closing = True
        self.worker.terminate()


class Sink(Protocol):
    """Where filled slots go; the module docstring lists what each call means."""

    exited: bool

    @property
    def worker_pid(self) -> int | None: ...

    @property
    def worker_exitcode(self) -> int | None: ...

    def slot_pool(self, layout: Layout, replicas: int = 0) -> SlotPool: ...

    def setup(self, setup: Setup, on_cuda: bool) -> None: ...

    def acquire(self) -> int | None: ...

    def wait_for_slot(self, deadline: float) -> int | None: ...

    def release(self, slot: int) -> None: ...

    def submit(self, slot: int, seq: int) -> None: ...

    def send_groups(self, groups: Groups) -> None: ...

    def close(self, deadline: float) -> Finished: ...

    def abort(self) -> None: ...


def resolve_mode(config: TelemetryConfig, model: torch.nn.Module | None) -> tuple[str, str]:
    """``mode: auto`` made concrete, and why: ("async" | "sync", reason).

    The worker pays off only where it runs on a core training leaves idle: a model on an
    accelerator (its trainer mostly waits on the device), or a CPU trainer whose torch
    threads, times the training processes on this host (LOCAL_WORLD_SIZE under torchrun),
    are fewer than the usable cores. Where training's threads take every core, each
    millisecond the worker runs is taken from a training thread, and a torch step whose
    OpenMP threads wait for the slowest one loses more than that millisecond; building the
    record inline costs exactly its work (docs/benchmarks.md, issue 14). An explicit
    ``async`` or ``sync`` is kept as given.
    """
    if config.mode != "auto":
        return config.mode, f"mode: {config.mode} in the config"
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None) if model is not None else None
    if device is not None and device.type != "cpu":
        return "async", f"the model is on {device.type}: the worker runs on a core the trainer leaves idle"
    if device is None and torch.cuda.is_available():
        return "async", "CUDA is available (no model at start): the worker runs on a core the trainer leaves idle"
    threads = torch.get_num_threads()
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    cores = usable_cores()
    used = f"{threads} torch thread{'s' if threads != 1 else ''}" + (f" x {local} processes" if local > 1 else "")
    if threads * local >= cores:
        return "sync", (f"training on the CPU with {used} on {cores} core{'s' if cores != 1 else ''}: no core is left "
                        "for a worker, so records are built inline (mode: async forces the worker)")
    return "async", f"training on the CPU with {used} on {cores} cores: the worker has a core of its own"


def take_slot(sink: Sink, config: TelemetryConfig) -> int | None:
    """A free slot for the hook, or None: ``on_full: drop`` never waits; ``block`` lets the
    sink wait (the worker uses every core meanwhile), at most ``block_timeout_s``."""
    slot = sink.acquire()
    if slot is not None or config.on_full == "drop":
        return slot
    return sink.wait_for_slot(time.monotonic() + config.block_timeout_s)


def open_sink(mode: str, config: TelemetryConfig, run_dir: Path, records_file: Path) -> Sink:
    config = attach_active_runs(config)  # mirrors log into the user's active MLflow/W&B run, not a second one
    if mode == "sync":
        return InlineSink(config, run_dir, records_file)
    return WorkerSink(config, run_dir, records_file)


class _HandOff:
    """CUDA only: a thread that waits for each snapshot's copies, then publishes its slot.

    Waiting on the event here (it releases the GIL) keeps the training thread free of
    device syncs; the hook itself only records the event.
    """

    def __init__(self, sink: WorkerSink) -> None:
        self._sink = sink
        self._pending: queue.SimpleQueue[tuple[Any, int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-handoff", daemon=True)
        self._thread.start()

    def submit(self, event: Any, slot: int, seq: int) -> None:
        self._pending.put((event, slot, seq))

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            event, slot, seq = item
            try:
                event.synchronize()
                self._sink.publish(slot, seq)
            except Exception as exc:  # keep the thread alive: one failed snapshot is one record lost
                warnings.warn(f"train-telemetry: hand-off failed: {exc}", RuntimeWarning, stacklevel=1)

    def close(self, deadline: float) -> None:
        self._pending.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
