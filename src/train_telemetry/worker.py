"""The telemetry worker process: its loop, from published slots to written records.

Runs in: the worker process (``worker_loop``). What it does with one snapshot is
processor.py's, which ``mode: sync`` (and ``auto`` where training's threads take every
core: sinks.resolve_mode) runs inline in the training process instead.

NOTE [worker lifecycle]
=======================

Data flow (one collection)::

    trainer: on_batch_end                      worker: worker_loop (polls every PUBLISH_POLL_S)
    ---------------------                      -------------------
    slot = channel.acquire()  (none: drop/block)
    norms = _foreach_norm(grads)
    one _foreach_copy_ into the slot: weights,
      buffers, norms, loss, labels, outputs
    write_header(slot): step, LRs, counters
    channel.publish(slot)  ------------------> channel.take_published() -> read_header
      (ring + semaphore: no pipe write,          processor.read_slot: SnapshotData (views
       so no wake-up cost in the hook)             of the slot; label counts, accuracy)
                                                 build.build_record: each metric's compute
                                                   (weight deltas vs reference.py's checkpoint
                                                   and the holdout forward on first use)
                                                 reference.save: slot -> last_checkpoint.pt
                                 slot FREE <---- channel.release(slot)
                                                 writer: encode, append one whole line

Files by role: telemetry.py (the facade: state machine and routing), distributed.py (the
ranks' collective, one strategy per layout, before a slot is taken), collect.py (the
hook's work), sinks.py (where a filled slot goes:
inline or to this worker), worker_handle.py (the trainer's side of this process),
snapshot.py + messages.py (the shared slots and headers), processor.py, build.py,
reference.py, writer.py (the worker's side, also run inline in sync mode), metrics/
(what a record holds: one Metric per key).

Protocol per role:

* start (trainer): spawn the worker (daemon, so multiprocessing terminates it if our
  atexit hook is skipped); wait for ``Ready`` within ``start_timeout_s``; send ``Setup``
  (pre-pickled, so a pickling error is raised in ``start()``, not lost in a queue
  feeder thread); wait for ``SetupDone``, whose error (e.g. the holdout forward failed)
  ``start()`` raises.
* worker start: ignore SIGINT (Ctrl-C is the trainer's to handle; the trainer's stop()
  decides when we end); SIGTERM sets a flag that ends the loop after the current record;
  ask the kernel to SIGTERM us if the trainer dies (PR_SET_PDEATHSIG; only when started
  from the trainer's main thread, since it fires when the starting *thread* exits), lower
  our CPU priority and thread count so training keeps its cores; repair a torn last line.
* loop: process every published slot in publish order, then ``get(timeout=PUBLISH_POLL_S)``
  on the control queue (``Setup``, ``Groups``, ``Stop``); every POLL_S check that the
  trainer still lives (multiprocessing's parent sentinel, else ``os.getppid()``). Each
  snapshot is processed in a try/except per metric, so one failing metric costs that
  field, not the record; an error that escapes anyway costs that record and is counted.
* groups: a snapshot names the version of the param -> group map it was taken under; a
  new map is put on the queue before the first snapshot naming it is published, and the
  worker reads the queue until it has it.
* stop (trainer): send ``Stop`` after the last publish; the worker drains every published
  slot before it answers ``Done``; the trainer waits for ``Done`` and the exit until the
  deadline; then SIGTERM, then SIGKILL; never waits without a timeout.
* trainer death (SIGKILL, OOM): the worker notices within POLL_S (or at once through
  PDEATHSIG), writes every slot already published (a slot is published only once
  filled; one the trainer died filling is not), and exits; its shared memory goes with
  the last process that maps it.
* trainer waits (``on_full: block`` with no free slot, or ``stop()`` draining): it raises
  ``Waiting.flag`` (worker_handle.py); we then use one torch thread per core (checked per
  snapshot, before its delta pass and before each weighted module of its holdout forward;
  never in a forked worker, where OpenMP would deadlock), poll every WAITED_POLL_S, and
  release ``Waiting.freed`` each time we free a slot, which wakes the trainer. Records are
  still all ours.
* worker death: the trainer's watcher thread starts a replacement (sinks.WorkerSink),
  which replays every slot published and not yet released (released only after the
  line is written), skipping seqs already on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .budget import usable_cores
from .config import TelemetryConfig
from .messages import Done, Groups, Ready, Setup, SetupDone, Stop, read_header
from .metrics.api import set_before_input
from .mirrors import close_mirrors
from .processor import SnapshotProcessor
from .snapshot import Channel
from .writer import OnceLog, RecordWriter

POLL_S = 0.5  # how often an idle worker checks that the trainer is alive
# How often the worker looks for published slots. Publishing never wakes us (that would
# cost the trainer a wake-up in its hook), so this bounds a snapshot's wait before its
# record is started; 100 checks a second cost ~0.3% of a core.
PUBLISH_POLL_S = 0.01
# While the trainer waits for us (on_full: block, stop()), its cores are idle and every
# millisecond we sleep is one it waits: look for published slots this often instead.
WAITED_POLL_S = 0.0005
GROUPS_WAIT_S = 10.0  # a snapshot names a group map not received yet: wait this long for it


class _Termination:
    """Set by SIGTERM: the loop ends after the record in progress."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def _prepare_process(config: TelemetryConfig, parent_death_signal: bool, termination: _Termination) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, termination)
    # PDEATHSIG fires when the *thread* that started us exits, not the process: only safe
    # when the trainer started us from its main thread. Otherwise getppid polling covers it.
    if parent_death_signal and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.nice(config.worker_nice)
    if config.worker_sched_idle and hasattr(os, "SCHED_IDLE"):
        # nice alone (even +19) still gives us time slices on a trainer's busy cores, each
        # stalling one of its threads (docs/benchmarks.md). Under SCHED_IDLE we get only
        # time nobody else wants, so on a saturated machine most snapshots are dropped:
        # opt-in, for runs where training speed matters more than records. Set before
        # torch starts its thread pool, so its threads inherit it.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    torch.set_num_threads(config.worker_threads)


def worker_loop(
    config: TelemetryConfig,
    run_dir: str,
    records_file: str,
    to_worker: Any,
    from_worker: Any,
    channel: Channel,
    parent_pid: int,
    parent_death_signal: bool = True,
    waiting: Any = None,
) -> None:
    """Entry point of the worker process; see NOTE [worker lifecycle].

    ``waiting`` (worker_handle.Waiting): raised by the trainer while it waits for us; we
    then use ``boost_threads()`` torch threads and wake it when a slot is free.
    """
    termination = _Termination()
    _prepare_process(config, parent_death_signal, termination)
    loop = _Loop(config, Path(run_dir), Path(records_file), to_worker, from_worker, channel, waiting, termination)
    from_worker.put(Ready(os.getpid()))
    try:
        loop.run(parent_pid)
    finally:
        loop.report()
    if multiprocessing.parent_process() is not None:  # we are the worker process, not a test calling us
        # Every record is on disk and Done is in the pipe: skip the interpreter's teardown,
        # which with torch loaded takes a second or more on a busy machine, and which stop()
        # (or the trainer's exit) would otherwise wait out, or cut short with SIGTERM.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1 if loop.fatal else 0)


class _Loop:
    """The worker's state and its steps: handle a control message, process what is
    published, run until Stop / SIGTERM / the trainer's death, report ``Done``."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path, to_worker: Any, from_worker: Any,
                 channel: Channel, waiting: Any, termination: _Termination) -> None:
        self.config, self.run_dir = config, run_dir
        self.to_worker, self.from_worker = to_worker, from_worker
        self.channel = channel
        self.termination = termination
        # A forked worker must not start torch's thread pool: OpenMP in a child forked from a
        # process that used it deadlocks (libgomp). There it keeps worker_threads (1).
        self.threads = _Threads(config.worker_threads, waiting, boost=config.start_method != "fork")
        # No cancel_join_thread() here: the final join_thread() must flush Done to the trainer
        # before we exit. Our few messages are tiny, so the pipe can never fill and block us.
        self.log = OnceLog("worker")
        self.writer = RecordWriter(records_file, config.fsync, self.log, config.io_buffer_bytes)
        self.processor: SnapshotProcessor | None = None
        self.clean = True
        self.fatal: list[str] = []
        self.headers = memoryview(channel.headers).cast("B")
        self.stopping = False

    def handle(self, msg: Any) -> None:
        if isinstance(msg, Stop):
            self.stopping = True
        elif isinstance(msg, Groups):
            if self.processor is not None:
                self.processor.add_groups(msg)
        elif isinstance(msg, Setup):
            try:
                self.processor = SnapshotProcessor(self.config, self.run_dir, msg, self.writer, self.log)
                if msg.init_slot is not None:
                    self.channel.release(msg.init_slot)
                error = self.processor.check_holdout()
                if self.processor.model is not None:
                    self.threads.watch(self.processor.model)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            self.from_worker.put(SetupDone(error))

    def release(self, slot: int) -> None:
        self.channel.release(slot)
        self.threads.slot_freed()

    def process_published(self) -> None:
        for slot in self.channel.take_published():
            self.threads.update()
            processor = self.processor
            if processor is None:  # cannot happen unless the trainer misbehaves
                self.channel.release(slot)
                continue
            try:
                snap = read_header(self.headers, slot)
                # The trainer puts a new group map on the queue before it publishes the
                # first snapshot that names it: read the queue until it is here.
                deadline = time.monotonic() + GROUPS_WAIT_S
                while snap.groups_version not in processor.groups and time.monotonic() < deadline:
                    with contextlib.suppress(queue.Empty):
                        self.handle(_unpickle(self.to_worker.get(timeout=0.1)))
                processor.handle(snap, self.release)
            except Exception as exc:
                self.release(slot)
                processor.count_error("record", exc)

    def run(self, parent_pid: int) -> None:
        next_parent_check = time.monotonic() + POLL_S
        try:
            while not self.termination.requested:
                self.process_published()
                if self.stopping:  # everything published before Stop is written now
                    break
                try:
                    msg = _unpickle(self.to_worker.get(timeout=self.threads.poll_s()))
                except queue.Empty:
                    now = time.monotonic()
                    if now > next_parent_check:
                        next_parent_check = now + POLL_S
                        if not _parent_alive(parent_pid):
                            # The trainer died: what it published is whole (it publishes a slot
                            # only after filling it), so write that, then exit.
                            self.clean = False
                            self.process_published()
                            break
                    continue
                self.handle(msg)
            if self.termination.requested:  # SIGTERM (the trainer's death signal, or stop()'s): write what is published
                self.process_published()
        except BaseException as exc:  # a bug of ours: say why we die instead of vanishing
            self.clean = False
            self.fatal.append("".join(traceback.format_exception(exc)))

    def report(self) -> None:
        """Close the records file and send ``Done``: what was written and what went wrong."""
        with contextlib.suppress(OSError):  # e.g. EIO from close(): still send Done
            self.writer.close()
        if self.processor is not None:  # the records are on disk: now the trackers, bounded in time
            if self.stopping:  # a clean stop, not a death a replacement recovers from
                self.processor.finish()
            close_mirrors(self.processor.mirrors, self.config)
        processor, writer = self.processor, self.writer
        errors = dict(processor.errors) if processor else {}
        last = (list(processor.last_errors) if processor else []) + self.fatal
        last += writer.problems.values()
        with contextlib.suppress(Exception):
            self.from_worker.put(Done(writer.records_written, errors, last, writer.io_errors,
                                      self.clean and not self.termination.requested))
            self.from_worker.close()
            self.from_worker.join_thread()


def boost_threads() -> int:
    """Torch threads while the trainer waits for us: one per core we may run on."""
    return usable_cores()


class _Threads:
    """The worker's torch thread count: ``worker_threads``, or ``boost_threads()`` while the
    trainer waits for us (its cores are idle then: on_full block, or stop() draining).

    Checked (a plain byte read) before each snapshot and before each of its heavy inputs
    (the delta pass, the holdout forward: metrics.api.set_before_input), so a record
    started while the trainer was still training switches when it starts to wait, and
    back when it resumes (our extra threads, niced, would then stall its threads).
    ``torch.set_num_threads`` is called only on a change.
    """

    def __init__(self, base: int, waiting: Any, boost: bool = True) -> None:
        self.base = base
        self.boost = max(base, boost_threads()) if boost else base
        self.flag = waiting.flag if waiting is not None else None
        self.freed = waiting.freed if waiting is not None else None
        self.current = base
        if self.flag is not None and self.boost > base:
            # Start torch's extra threads now (parked again right after), not in the first
            # record the trainer waits for.
            torch.set_num_threads(self.boost)
            torch.ones(1 << 20).add_(1)
            torch.set_num_threads(base)
            set_before_input(self.update)

    def _set(self, want: int) -> None:
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want

    def update(self) -> None:
        """Every core's thread while the trainer waits, worker_threads otherwise."""
        if self.flag is not None:
            self._set(self.boost if self.flag[0] else self.base)

    def watch(self, model: torch.nn.Module) -> None:
        """Re-check the flag before each module of the eval model that holds weights runs,
        so a holdout forward begun on worker_threads while the trainer trained switches to
        every core as soon as the trainer waits (on conv, the forward is most of a record).
        A pre-hook is a byte read per module call (~1 us): nothing next to the forward."""
        if self.flag is None or self.boost <= self.base:
            return
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_pre_hook(lambda _m, _a: self.update())

    def poll_s(self) -> float:
        """How long to sleep on the control queue before looking for published slots again."""
        return WAITED_POLL_S if self.flag is not None and self.flag[0] else PUBLISH_POLL_S

    def slot_freed(self) -> None:
        if self.freed is not None and self.flag is not None and self.flag[0]:
            self.freed.release()  # wake the waiting trainer (it re-checks the slots itself)


def _parent_alive(parent_pid: int) -> bool:
    """Whether the trainer lives. Under forkserver our parent is the fork server, not the
    trainer, so getppid alone would misread it: multiprocessing's parent sentinel knows."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        return parent.is_alive()
    return os.getppid() == parent_pid


def _unpickle(raw: Any) -> Any:
    return pickle.loads(raw) if isinstance(raw, bytes) else raw
