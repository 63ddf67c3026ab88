"""Weight numbers summed over hosts (hosts.py), without torchrun: rank 1 "on another host".

A real c10d TCPStore in this process stands in for the job's; rank 1's shard file is read
by a host worker's loop (``serve``) on a thread, rank 0's side by ``CrossHost``. Values are
checked against norms of the full tensors computed here with plain torch. The end-to-end
runs (4 torchrun ranks on two "hosts") are in tests/e2e/test_mesh.py.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from train_telemetry import hosts
from train_telemetry.hosts import CrossHost, HostBlocks, connect, serve
from train_telemetry.messages import TensorSpec
from train_telemetry.shards import ShardPlan
from train_telemetry.snapshot import SlotFile


def full_tensors(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(7, 3, generator=g), torch.randn(5, generator=g, dtype=torch.float64)]


def rank0_slot(full: list[torch.Tensor]) -> list[torch.Tensor]:
    return [full[0][:4].clone(), full[1][:3].clone()]


def rank1_part(full: list[torch.Tensor]) -> list[torch.Tensor]:
    return [full[0][4:], full[1][3:]]


class TwoHosts:
    """Rank 0 on host 0, rank 1 on host 1: the plan, rank 1's file, the store, host 1's worker loop."""

    def __init__(self) -> None:
        self.server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        specs = [TensorSpec("w", (7, 3), "float32"), TensorSpec("b", (5,), "float64")]
        self.plan = ShardPlan(world_size=2, specs=specs, dims=[0, 0], sizes=[[4, 3], [3, 2]], num_slots=2,
                              hosts=2, host_of=[0, 1], store=("127.0.0.1", self.server.port),
                              token=uuid.uuid4().hex[:12])
        self.plan.paths = [None, f"/dev/shm/train-telemetry-test-{self.plan.token}-rank1"]
        self.rank1 = SlotFile(self.plan.paths[1], 2, self.plan.file_specs(1), create=True)
        self.slots = [rank0_slot(full_tensors(0)), rank0_slot(full_tensors(0))]
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def serve_host1(self, first: bool = True) -> None:
        blocks = HostBlocks(self.plan, 1, 2, deltas=True)
        if first:
            blocks.partials(-1)
            blocks.release(None)
        self.thread = threading.Thread(target=serve, args=(connect(self.plan.store, self.plan.token), blocks,
                                                             self.stop.is_set), daemon=True)
        self.thread.start()

    def collect(self, ordinal: int, step: int, rank1_copies: bool = True, wait_s: float = 5.0) -> bool:
        """Both ranks' hooks at collection ``ordinal``: rank 0 into its slot, rank 1 into its file
        (waiting up to ``wait_s`` for a slot host 1's worker frees); whether rank 1 copied."""
        self.slots[ordinal % 2][:] = rank0_slot(full_tensors(step))
        if rank1_copies:
            return self.rank1.copy_in(ordinal, rank1_part(full_tensors(step)), wait_s)
        self.rank1.progress[0] = ordinal  # a copy that failed: dealt with, nothing published
        return False

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.rank1.unlink()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    h = TwoHosts()
    yield h
    h.close()


def expected(step: int, before: int) -> dict[str, list[float]]:
    now, ref = full_tensors(step), full_tensors(before)
    return {"norms": [float(t.double().norm()) for t in now],
            "deltas": [float((a.double() - b.double()).norm()) for a, b in zip(now, ref, strict=True)],
            "refs": [float(t.double().norm()) for t in ref]}


def close_to(got: list[float], want: list[float]) -> bool:
    return all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want, strict=True))


def start(h: TwoHosts) -> CrossHost:
    h.collect(-1, 0)  # the shards at start()
    h.slots[1][:] = rank0_slot(full_tensors(0))
    cross = CrossHost(h.plan, 2, True, h.slots)
    cross.start_reference(1)
    return cross


def test_norms_and_deltas_summed_over_hosts_equal_the_full_tensors(two_hosts: TwoHosts) -> None:
    """Each parameter's norm, delta from the previous collection and reference norm equal
    the full tensors' although no process holds them whole; the reference steps along."""
    cross = start(two_hosts)
    two_hosts.serve_host1()
    previous = 0
    for ordinal, step in enumerate((3, 5, 9)):
        assert two_hosts.collect(ordinal, step)
        got = cross.numbers(ordinal % 2, ordinal, batch_idx=step)
        cross.release(ordinal)
        want = expected(step, previous)
        assert got.problems == [] and got.no_delta is None and got.norms is not None and got.deltas is not None
        assert close_to(got.norms, want["norms"]), (got.norms, want)
        assert close_to(got.deltas.deltas, want["deltas"]) and close_to(got.deltas.reference_norms, want["refs"])
        assert got.deltas.reference_batch_idx == (None if ordinal == 0 else previous)
        previous = step


def test_a_rank_whose_copy_failed_costs_that_record_and_the_next_delta_only(two_hosts: TwoHosts) -> None:
    """Rank 1's shards missing at one collection: that record has no weight numbers and says
    which rank; the next has exact norms but no delta (host 1's reference would be two
    collections old), and says why; the one after is exact again."""
    cross = start(two_hosts)
    two_hosts.serve_host1()
    two_hosts.collect(0, 2, rank1_copies=False)
    got = cross.numbers(0, 0, batch_idx=2)
    cross.release(0)
    assert got.norms is None and got.deltas is None
    assert any("host 1" in p and "rank 1 has no shards of this collection" in p for p in got.problems), got.problems
    assert two_hosts.collect(1, 4)
    got = cross.numbers(1, 1, batch_idx=4)
    cross.release(1)
    assert got.problems == [] and got.norms is not None and close_to(got.norms, expected(4, 2)["norms"])
    assert got.deltas is None and "missing at the previous collection" in (got.no_delta or ""), got.no_delta
    assert two_hosts.collect(2, 6)
    got = cross.numbers(0, 2, batch_idx=6)
    assert got.deltas is not None and close_to(got.deltas.deltas, expected(6, 4)["deltas"])
    assert got.deltas.reference_batch_idx == 4


def test_a_host_that_does_not_answer_is_waited_for_once_then_read_again(
        two_hosts: TwoHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    """No host worker on host 1 (dead, not yet replaced): rank 0 waits once, records the
    weight numbers as missing naming the host, does not wait the full time again, and once
    a (new) host worker answers, the records are exact again: the replacement, without a
    reference, gives norms at once and deltas from the collection after."""
    monkeypatch.setattr(hosts, "WAIT_FOR_HOST_S", 0.3)
    monkeypatch.setattr(hosts, "LATE_WAIT_S", 0.05)
    cross = start(two_hosts)
    assert two_hosts.collect(0, 2)
    got = cross.numbers(0, 0, batch_idx=2)
    cross.release(0)
    assert got.norms is None and any("host 1 (ranks [1]) did not answer within 0.3 s" in p for p in got.problems)
    # nobody frees rank 1's two slots (the start's and collection 0's): it cannot copy this one
    assert not two_hosts.collect(1, 4, wait_s=0.0)
    got = cross.numbers(1, 1, batch_idx=4)
    cross.release(1)
    assert got.norms is None and any("within 0.05 s" in p for p in got.problems), got.problems
    two_hosts.serve_host1(first=False)  # the replacement: it answers the asks left in its queue first
    monkeypatch.setattr(hosts, "WAIT_FOR_HOST_S", 10.0)
    monkeypatch.setattr(hosts, "LATE_WAIT_S", 10.0)
    assert two_hosts.collect(2, 6)
    got = cross.numbers(0, 2, batch_idx=6)
    cross.release(2)
    assert got.problems == [] and got.norms is not None and close_to(got.norms, expected(6, 0)["norms"])
    assert two_hosts.collect(3, 8)
    got = cross.numbers(1, 3, batch_idx=8)
    assert got.problems == [] and got.deltas is not None and close_to(got.deltas.deltas, expected(8, 6)["deltas"])
    assert got.deltas.reference_batch_idx == 6


def test_without_a_tcp_store_the_other_hosts_numbers_are_missing_and_say_why(two_hosts: TwoHosts) -> None:
    """A job initialised with init_method='file://...' has no TCPStore for the hosts' sums:
    records say so and how to fix it, never a norm of rank 0's host's shards alone."""
    two_hosts.plan.store = None
    cross = start(two_hosts)
    assert two_hosts.collect(0, 2)
    got = cross.numbers(0, 0, batch_idx=2)
    assert got.norms is None and got.deltas is None
    (problem,) = got.problems  # one reason, not also a wait that never happened
    assert "not a TCPStore" in problem and "env://" in problem, problem


def test_answers_survive_the_round_trip() -> None:
    sums = torch.arange(6, dtype=torch.float64)
    for unknown, why in ((None, None), ("no reference yet", None), (None, "rank 3 had no slot")):
        got: Any = hosts._decode(hosts._encode(None if why else sums, unknown, why))
        assert (got[1], got[2]) == (unknown, why)
        assert (got[0] is None) == (why is not None) and (got[0] is None or torch.equal(got[0], sums))
