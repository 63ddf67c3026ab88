"""Weight numbers of a sharded model whose counted shards lie on several hosts.

Runs in: rank 0's worker (``CrossHost``; inline on rank 0 in ``mode: sync``), one *host
worker* per other host that holds counted shards (``host_loop``), and the training
process of that host's lowest rank, which starts and restarts it (``HostWorker``).

NOTE [hosts] (docs/distributed.md, "Across machines"):

- Shared memory does not cross hosts, and the weights must not cross the network at
  each collection (they would share the links FSDP's all-gathers use). What does cross
  is three numbers per parameter: each host sums, over the blocks it counts
  (``ShardPlan.blocks``: each element exactly once), ||w||², ||w - w_ref||² and
  ||w_ref||²; the sums of every host give the global weight norm, delta and update
  ratio of each parameter exactly (square roots of sums of squares), hence per group,
  per layer and overall.
- Each host keeps its own delta reference: its counted blocks of the last collection
  rank 0 recorded, in its worker's memory. A host updates it only for collections
  rank 0 asks for, so every host measures the delta over the same interval. A host
  whose reference is missing (its worker was replaced, a rank had no free slot) says
  so, and that record's deltas are null, never measured over another interval.
- The channel is the job's own c10d store (the TCPStore every rank already connects
  to at ``init_process_group``), under a prefix of this run: rank 0's worker pushes
  each ordinal it builds onto each host's ``ask`` queue, the host worker pushes its
  answer onto its ``answer`` queue. No collective and no new port: the training ranks'
  path is unchanged (each rank copies its shards into its own host's shared memory).
- The holdout, activations and user metrics that need the whole model are not built
  when the counted shards span hosts (that would move the weights): each record says
  so. HSDP with the replicate dimension across hosts keeps every counted block on rank
  0's host, so it records everything, holdout included, with nothing crossing hosts.
- A host worker that dies is restarted by its rank (``tuning.max_worker_restarts``);
  rank 0's worker waits ``WAIT_FOR_HOST_S`` for an answer once, then records that
  host's numbers as missing without waiting, until it answers again.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .metrics.api import WeightDeltas
from .shards import ShardFiles

__all__ = ["CrossHost", "Numbers", "HostBlocks", "HostWorker", "host_loop", "serve"]

WAIT_FOR_HOST_S = 30.0  # rank 0's worker waits this long for a host's answer before recording it missing
LATE_WAIT_S = 0.5  # ... and this long once a host has missed one, until it answers again
ASK_AGAIN_S = 2.0  # an unanswered ask is repeated this often (a replaced host worker never saw it)
ASK_POLL_S = 0.005  # how often a host worker looks for rank 0's next ask
PARENT_POLL_S = 0.5
_CACHE = 8  # answers a host worker keeps, for a replaced rank-0 worker that asks again


NO_STORE = ("the job's c10d store is not a TCPStore (init_process_group with init_method='file://...'?): the "
            "other hosts' weight numbers cannot reach rank 0's worker, so they are missing; initialise with "
            "env:// (torchrun's default) or tcp://")


def connect(address: tuple[str, int], token: str, timeout_s: float = 60.0) -> Any:
    """A client of the job's store, under this run's prefix."""
    dist = torch.distributed
    client = dist.TCPStore(address[0], address[1], is_master=False, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"train-telemetry/{token}/", client)


def _pop(store: Any, key: str) -> bytes | None:
    """The next item of queue ``key``, or None when it is empty (never blocks)."""
    try:
        if store.queue_len(key) == 0:
            return None
        return bytes(store.queue_pop(key, block=False))
    except torch.distributed.QueueEmptyError:
        return None


# ---------------------------------------------------------------------- one host's blocks
class HostBlocks:
    """One host's counted blocks of the parameters, and its delta reference.

    ``partials(ordinal)`` gives, per parameter, the host's ||w||², ||w - w_ref||² and
    ||w_ref||² (float64, ``3 * num_params``) over the blocks its ranks count, then makes
    those blocks the reference. Rank 0's host also reads rank 0's own slot.
    """

    def __init__(self, plan: Any, host: int, num_params: int, deltas: bool,
                 rank0_slots: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        self.plan, self.host, self.num_params, self.deltas = plan, host, num_params, deltas
        self.rank0_slots = rank0_slots
        ranks = plan.ranks_on(host)
        self.shards = ShardFiles(plan, ranks)  # this host's ranks' files (rank 0's host: not rank 0's own)
        # per rank: (parameter j, position of its block in that rank's slot)
        self.items: dict[int, list[tuple[int, int]]] = {}
        if 0 in ranks and rank0_slots is not None:
            self.items[0] = [(j, j) for j in range(num_params) if plan.blocks[j][0] is not None]
        for r in self.shards.files:
            self.items[r] = [(j, k) for k, j in enumerate(plan.file_tensors(r)) if j < num_params]
        self.reference: dict[tuple[int, int], torch.Tensor] = {}
        # why a block may have no reference: this worker started after start() (a replacement)
        self.no_reference = f"host {host}'s worker was replaced and has no reference yet"

    def partials(self, ordinal: int, slot: int | None = None) -> tuple[torch.Tensor | None, str | None, str | None]:
        """(sums, why the deltas are unknown or None, why there are no sums or None) for
        collection ``ordinal``; ``slot``: rank 0's. Ordinal -1 (the shards at ``start()``)
        only sets the reference.
        """
        if self.shards.lost:
            self.reference.clear()
            return None, None, next(iter(self.shards.lost.values()))
        pieces: list[tuple[int, int, torch.Tensor]] = []
        problem = None
        for r in self.shards.files:
            found = self.shards.take(r, ordinal)
            if isinstance(found, str):
                problem = problem or found
                continue
            pieces += [(r, j, found[k]) for j, k in self.items[r]]
        if 0 in self.items and slot is not None and self.rank0_slots is not None:
            pieces += [(0, j, self.rank0_slots[slot][k]) for j, k in self.items[0]]
        if problem is not None:  # the reference of the missing blocks would be stale: start over
            self.reference.clear()
            self.no_reference = f"host {self.host}'s shards were missing at the previous collection"
            return None, None, problem
        n = self.num_params
        sums = torch.zeros(3 * n, dtype=torch.float64)
        unknown = None if self.deltas else "deltas are not tracked"
        for r, j, t in pieces:
            flat = t.reshape(-1)
            sums[j] += _sq(flat)
            if not self.deltas:
                continue
            ref = self.reference.get((r, j))
            if ref is None:
                unknown = self.no_reference
                self.reference[(r, j)] = flat.clone()
                continue
            sums[2 * n + j] += _sq(ref)
            ref.sub_(flat)  # w_ref - w in the reference's memory, then the new reference over it
            sums[n + j] += _sq(ref)
            ref.copy_(flat)
        return sums, unknown, None

    def release(self, ordinal: int | None) -> None:
        self.shards.release(ordinal)


def _sq(t: torch.Tensor) -> float:
    """||t||² with float32 sums (float64 for float64 tensors), as the one-host reference pass."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return float(torch.linalg.vector_norm(t, dtype=dtype)) ** 2


def _encode(sums: torch.Tensor | None, unknown: str | None, why: str | None) -> bytes:
    """An answer: ``E<why>`` (no sums), ``K<sums>`` (deltas known), ``U<len><why><sums>`` (deltas unknown)."""
    if sums is None:
        return b"E" + (why or "unknown").encode()
    if unknown is None:
        return b"K" + sums.numpy().tobytes()
    text = unknown.encode()
    return b"U" + len(text).to_bytes(4, "little") + text + sums.numpy().tobytes()


def _decode(payload: bytes) -> tuple[torch.Tensor | None, str | None, str | None]:
    """The inverse of ``_encode``: (sums, why the deltas are unknown, why there are no sums)."""
    kind, body = payload[:1], payload[1:]
    if kind == b"E":
        return None, None, body.decode(errors="replace")
    unknown = None
    if kind == b"U":
        size = int.from_bytes(body[:4], "little")
        unknown, body = body[4 : 4 + size].decode(errors="replace"), body[4 + size :]
    return torch.frombuffer(bytearray(body), dtype=torch.float64), unknown, None


def _tagged(ordinal: int, payload: bytes) -> bytes:
    return f"{ordinal}:".encode() + payload


# ---------------------------------------------------------------------- rank 0's side
@dataclass
class Numbers:
    """One collection's weight numbers over every host: ``norms`` and ``deltas`` per parameter
    (None when missing), what is missing and why (``problems``: no weight numbers at all), and
    why the deltas alone are missing (``no_delta``)."""

    norms: list[float] | None
    deltas: WeightDeltas | None
    problems: list[str]
    no_delta: str | None


class CrossHost:
    """Rank 0's worker: each collection's weight norms and deltas, summed over the hosts."""

    def __init__(self, plan: Any, num_params: int, deltas: bool, rank0_slots: Sequence[Sequence[torch.Tensor]]) -> None:
        self.plan, self.num_params = plan, num_params
        self.local = HostBlocks(plan, 0, num_params, deltas, rank0_slots)
        self.remote = plan.remote_hosts()
        self.late: set[int] = set()
        self.reference_batch_idx: int | None = None  # the collection every host's reference holds (None: start())
        self.store: Any = None
        self.error: str | None = None
        if plan.store is None:
            self.error = NO_STORE
            return
        try:
            self.store = connect(plan.store, plan.token)
        except Exception as exc:
            self.error = (f"rank 0's worker could not reach the job's c10d store at {plan.store} "
                          f"({type(exc).__name__}: {exc}): weight numbers of the other hosts' shards are missing")

    def start_reference(self, slot: int | None) -> None:
        """The shards at ``start()`` (ordinal -1): rank 0's host's first reference."""
        self.local.partials(-1, slot)
        self.local.release(None)

    def numbers(self, slot: int, ordinal: int, batch_idx: int) -> Numbers:
        """The weight norms and deltas of the collection ``ordinal``, summed over the hosts."""
        self._ask(ordinal)
        sums, unknown, why = self.local.partials(ordinal, slot)
        # Every host that computes this collection makes it its reference (one that cannot clears
        # its reference and says so next time): so a later delta that is known is from this one.
        since, self.reference_batch_idx = self.reference_batch_idx, batch_idx
        problems = [] if why is None else [f"host 0 (rank 0's): {why}"]
        if self.error is not None:
            problems.append(self.error)
        for h in self.remote if self.store is not None else ():  # without a store: self.error says why
            waited = LATE_WAIT_S if h in self.late else WAIT_FOR_HOST_S
            got = self._answer(h, ordinal, waited)
            if got is None:
                problems.append(f"host {h} (ranks {self.plan.ranks_on(h)}) did not answer within {waited:g} s: its "
                                "weight numbers are missing (is its host worker running? its lowest rank's warnings say)")
                continue
            theirs, their_unknown, their_why = _decode(got)
            if theirs is None:
                problems.append(f"host {h}: {their_why}")
                continue
            if sums is not None:
                sums += theirs
            unknown = unknown or their_unknown
        if problems or sums is None:
            return Numbers(None, None, problems, None)
        n = self.num_params
        roots = sums.sqrt().tolist()
        norms, deltas, refs = roots[:n], roots[n : 2 * n], roots[2 * n :]
        if unknown is not None:
            return Numbers(norms, None, [], f"{unknown}: no delta for this collection (the next one has it)")
        return Numbers(norms, WeightDeltas(deltas, refs, since, norms), [], None)

    def _ask(self, ordinal: int) -> None:
        if self.store is not None:
            for h in self.remote:
                self.store.queue_push(f"ask/{h}", str(ordinal))

    def _answer(self, h: int, ordinal: int, wait_s: float) -> bytes | None:
        """Host ``h``'s answer for ``ordinal``. The ask is repeated every ASK_AGAIN_S: a host
        worker that died holding it is replaced, and its successor answers the repeat."""
        now = time.monotonic()
        deadline = now + wait_s
        again = now + ASK_AGAIN_S
        while True:
            raw = _pop(self.store, f"answer/{h}")
            if raw is not None:
                tag, _, payload = raw.partition(b":")
                if int(tag) == ordinal:
                    self.late.discard(h)
                    return payload
                continue  # an answer to an ask this worker gave up on, or to a repeat
            now = time.monotonic()
            if now > deadline:
                self.late.add(h)
                return None
            if now > again:
                again = now + ASK_AGAIN_S
                self.store.queue_push(f"ask/{h}", str(ordinal))
            time.sleep(0.001)

    def release(self, ordinal: int | None) -> None:
        self.local.release(ordinal)

    def finish(self) -> None:
        """Every record is written: the host workers may exit."""
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set("done", b"1")


# ---------------------------------------------------------------------- the other hosts
def host_loop(plan: Any, host: int, num_params: int, deltas: bool, config: Any, parent_pid: int, first: bool) -> None:
    """Entry point of a host worker: answer rank 0's asks until it is done, or our rank dies."""
    # imported here: worker.py imports the processor, which imports this module
    from .worker import _prepare_process, _Termination

    termination = _Termination()
    _prepare_process(config, False, termination)  # niceness and threads of the worker; SIGTERM ends the loop
    try:
        blocks = HostBlocks(plan, host, num_params, deltas)
        store = connect(plan.store, plan.token)
        if first and deltas:  # the shards at start(): the first reference (a replacement has none)
            blocks.partials(-1)
            blocks.release(None)
        serve(store, blocks, lambda: termination.requested or os.getppid() != parent_pid)
    except Exception as exc:  # one line, not a traceback: the store went away with the job, most often
        sys.stderr.write(f"train-telemetry: the host worker of host {host} stops: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)  # no interpreter teardown: everything is answered


def serve(store: Any, blocks: HostBlocks, orphaned: Any) -> None:
    """Answer the asks on this host's queue until rank 0's worker is done or ``orphaned()``."""
    host = blocks.host
    answers: OrderedDict[int, bytes] = OrderedDict()
    next_check = 0.0
    while True:
        raw = _pop(store, f"ask/{host}")
        if raw is None:
            now = time.monotonic()
            if now > next_check:
                next_check = now + PARENT_POLL_S
                if store.check(["done"]) or orphaned():
                    return
            time.sleep(ASK_POLL_S)
            continue
        ordinal = int(raw)
        payload = answers.get(ordinal)
        if payload is None:
            try:
                payload = _encode(*blocks.partials(ordinal))
            except Exception as exc:  # never leave rank 0's worker waiting for an answer
                blocks.reference.clear()
                blocks.no_reference = f"host {host}'s worker failed at the previous collection"
                payload = _encode(None, None, f"the host worker failed: {type(exc).__name__}: {exc}")
            blocks.release(ordinal)
            answers[ordinal] = payload
            while len(answers) > _CACHE:
                answers.popitem(last=False)
        store.queue_push(f"answer/{host}", _tagged(ordinal, payload))


class HostWorker:
    """A host's lowest rank: starts its host worker, restarts it if it dies, ends it at ``stop()``."""

    def __init__(self, plan: Any, host: int, num_params: int, deltas: bool, config: Any, warn: Any) -> None:
        self.plan, self.host, self.num_params, self.deltas = plan, host, num_params, deltas
        self.config, self.warn = config, warn
        self.ctx: Any = torch.multiprocessing.get_context("spawn")
        self.proc: Any = None
        self.restarts = 0
        self.closing = False
        self._lock = threading.Lock()

    def start(self, first: bool = True) -> None:
        from .worker_handle import without_main_rerun

        self.proc = self.ctx.Process(
            target=host_loop, name="train-telemetry-host-worker", daemon=True,
            args=(self.plan, self.host, self.num_params, self.deltas, self.config, os.getpid(), first))
        with without_main_rerun():
            self.proc.start()
        threading.Thread(target=self._watch, args=(self.proc,), name="train-telemetry-host-watch", daemon=True).start()

    def _watch(self, proc: Any) -> None:
        proc.join()
        with self._lock:
            if self.closing or proc.exitcode == 0:
                return
            if self.restarts >= self.config.max_worker_restarts:
                self.warn("host_worker_dead", f"the host worker of host {self.host} exited with code {proc.exitcode} "
                          f"{self.restarts + 1} times: its weight numbers are missing from the later records")
                return
            self.restarts += 1
            self.warn(f"host_worker_restart:{self.restarts}", f"the host worker of host {self.host} exited with code "
                      f"{proc.exitcode}; started a new one (its first record's deltas are null: its reference is gone)")
            with contextlib.suppress(Exception):
                self.start(first=False)

    def close(self, timeout_s: float) -> None:
        """Wait for the host worker to finish rank 0's asks (it exits when rank 0's worker is done)."""
        with self._lock:
            self.closing = True
        if self.proc is None:
            return
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
