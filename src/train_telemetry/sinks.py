"""Where a filled slot goes: built inline (``mode: sync``) or handed to the worker (``async``).

Runs in: the training process. Two classes behind one interface (the DataLoader's
single-process / multi-process iterator split), so the facade has no ``if mode`` branch:

- ``setup(setup)``: once, before the first snapshot (raises what start() should raise);
- ``submit(slot)``: the hook filled ``slot`` and wrote its header;
- ``send_groups(groups)``: the param -> group map changed (before the snapshot naming it);
- ``close(deadline) -> Finished``: write everything submitted, end, report.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TelemetryConfig
from .messages import Done, Groups, Setup, SetupDone, read_header
from .processor import SnapshotProcessor
from .sending import dumps_for_worker
from .snapshot import Channel
from .worker_handle import TelemetryStartError, WorkerHandle
from .writer import OnceLog, RecordWriter


@dataclass
class Finished:
    """What a sink reports when it is closed."""

    done: Done | None  # None: the worker ended without reporting
    terminated: bool = False  # the worker had to be killed
    exitcode: int | None = None
    pid: int | None = None
    notes: list[str] = field(default_factory=list)


class InlineSink:
    """``mode: sync``: the training thread builds and writes each record itself (the seed's design)."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.channel = Channel(None, 1)
        self.log = OnceLog("telemetry")
        self.writer = RecordWriter(records_file, config.fsync, self.log)
        self.processor: SnapshotProcessor | None = None
        self.on_cuda = False
        self.exited = False  # there is no worker to die

    def setup(self, setup: Setup, on_cuda: bool) -> None:
        self.on_cuda = on_cuda
        self.processor = SnapshotProcessor(self.config, self.run_dir, setup, self.writer, self.log)
        if setup.init_slot is not None:
            self.channel.release(setup.init_slot)
        error = self.processor.check_holdout()
        if error:
            raise TelemetryStartError(error)

    def submit(self, slot: int) -> None:
        assert self.processor is not None
        if self.on_cuda:  # the copies into the slot are asynchronous: wait for them here
            torch.cuda.current_stream().synchronize()
        self.processor.write(self.processor.process(read_header(self.channel.headers_view, slot), self.channel.release))

    def send_groups(self, groups: Groups) -> None:
        if self.processor is not None:
            self.processor.add_groups(groups)

    def close(self, deadline: float) -> Finished:
        with contextlib.suppress(OSError):  # counted in io_errors; stop() never raises
            self.writer.close()
        p = self.processor
        done = Done(self.writer.records_written, dict(p.errors) if p else {}, list(p.last_errors) if p else [],
                    self.writer.io_errors)
        done.last_errors += self.writer.problems.values()
        return Finished(done)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()


class WorkerSink:
    """``mode: async``: slots are published to the worker process through shared memory."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, records_file: Path) -> None:
        self.config = config
        self.worker = WorkerHandle(config, run_dir, records_file)
        self.channel = self.worker.channel
        self.handoff: _HandOff | None = None
        self.setup_sent = False
        self.worker.start(config.start_timeout_s)

    @property
    def exited(self) -> bool:
        return self.worker.exited

    def setup(self, setup: Setup, on_cuda: bool) -> None:
        try:
            payload = dumps_for_worker(setup)
        except Exception as exc:
            raise TelemetryStartError(
                f"the model or forward_fn cannot be sent to the telemetry worker ({type(exc).__name__}: {exc}). "
                "Remove what cannot be pickled from the model (open files, locks, sockets), "
                "or set track_holdout_logits: false, or mode: sync"
            ) from exc
        self.worker.send(payload)
        self.setup_sent = True
        done = self.worker.await_reply(SetupDone, self.config.start_timeout_s, "setup")
        if done.error:
            raise TelemetryStartError(done.error)
        if on_cuda:
            self.handoff = _HandOff(self.channel)

    def submit(self, slot: int) -> None:
        if self.handoff is not None:
            # CUDA: the copies are still in flight; the hand-off thread waits on this event
            # (off the training thread) before it publishes the slot.
            event = torch.cuda.Event()
            event.record()
            self.handoff.submit(event, slot)
        else:
            self.channel.publish(slot)

    def send_groups(self, groups: Groups) -> None:
        if self.setup_sent:
            self.worker.send(groups)  # before the snapshot that names this version is published

    def close(self, deadline: float) -> Finished:
        if self.handoff is not None:
            self.handoff.close(deadline)
        done, terminated = self.worker.stop(deadline)
        return Finished(done, terminated, self.worker.exitcode, self.worker.pid)

    def abort(self) -> None:
        self.worker.terminate()


Sink = InlineSink | WorkerSink


def open_sink(config: TelemetryConfig, run_dir: Path, records_file: Path) -> Sink:
    if config.mode == "sync":
        return InlineSink(config, run_dir, records_file)
    return WorkerSink(config, run_dir, records_file)


class _HandOff:
    """CUDA only: a thread that waits for each snapshot's copies, then publishes its slot.

    Waiting on the event here (it releases the GIL) keeps the training thread free of
    device syncs; the hook itself only records the event.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._pending: queue.SimpleQueue[tuple[Any, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="train-telemetry-handoff", daemon=True)
        self._thread.start()

    def submit(self, event: Any, slot: int) -> None:
        self._pending.put((event, slot))

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            event, slot = item
            try:
                event.synchronize()
                self._channel.publish(slot)
            except Exception as exc:  # keep the thread alive: one failed snapshot is one record lost
                warnings.warn(f"train-telemetry: hand-off failed: {exc}", RuntimeWarning, stacklevel=1)

    def close(self, deadline: float) -> None:
        self._pending.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
