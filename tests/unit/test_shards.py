"""The FSDP2 shard hand-off (shards.py) without torchrun: rank 1's file, rank 0's worker assembling.

The end-to-end checks against a one-process run are in tests/e2e/test_fsdp.py; these pin
the protocol's edge cases in milliseconds: uneven shards, collections one rank dropped,
a rank that never answers, ranks on other hosts.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from train_telemetry import snapshot
from train_telemetry.messages import TensorSpec
from train_telemetry.shards import Assembler, ShardPlan
from train_telemetry.snapshot import FREE, PUBLISHED, TAKEN, SlotFile


def make_plan(num_slots: int = 2, same_host: bool = True) -> ShardPlan:
    # weight [7, 3] cut 4 + 3 over 2 ranks along dim 0; bias [5] cut 3 + 2; a replicated buffer
    specs = [TensorSpec("w", (7, 3), "float32"), TensorSpec("b", (5,), "float64"), TensorSpec("buf", (2,), "float32")]
    plan = ShardPlan(world_size=2, specs=specs, dims=[0, 0, None], sizes=[[4, 3], [3, 2], []], num_slots=num_slots,
                     hosts=1 if same_host else 2, host_of=[0, 0] if same_host else [0, 1])
    plan.paths = [None, f"/dev/shm/train-telemetry-test-{uuid.uuid4().hex[:8]}-rank1" if same_host else None]
    return plan


@pytest.fixture
def plan() -> ShardPlan:
    p = make_plan()
    yield p
    if p.paths[1] and os.path.exists(p.paths[1]):
        os.unlink(p.paths[1])


def full_tensors(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(7, 3, generator=g), torch.randn(5, generator=g, dtype=torch.float64), torch.randn(2, generator=g)]


def rank0_slot(full: list[torch.Tensor]) -> list[torch.Tensor]:
    return [full[0][:4].clone(), full[1][:3].clone(), full[2].clone()]


def rank1_part(full: list[torch.Tensor]) -> list[torch.Tensor]:
    return [full[0][4:], full[1][3:]]


def test_the_worker_assembles_exactly_the_full_tensors(plan: ShardPlan) -> None:
    rank1 = SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    slots = [rank0_slot(full_tensors(0)), rank0_slot(full_tensors(1))]
    assert rank1.copy_in(0, rank1_part(full_tensors(0)))
    assert rank1.copy_in(1, rank1_part(full_tensors(1)))
    assembler = Assembler(plan, slots)
    for ordinal in (0, 1):
        got, why = assembler.tensors(ordinal, ordinal)
        assert why is None and got is not None
        for a, b in zip(got, full_tensors(ordinal), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assembler.release(ordinal)
    assert list(rank1.states) == [FREE, FREE]  # freed for rank 1's next copies


def test_collections_rank0_dropped_are_freed_and_a_missing_shard_is_named(plan: ShardPlan) -> None:
    rank1 = SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    assembler = Assembler(plan, [rank0_slot(full_tensors(5))] * 2)
    assert rank1.copy_in(3, rank1_part(full_tensors(3)))  # rank 0 dropped ordinal 3
    assert rank1.copy_in(4, rank1_part(full_tensors(4)))  # and rank 1 has no slot left
    assert not rank1.copy_in(5, rank1_part(full_tensors(5)))
    got, why = assembler.tensors(0, 5)
    assert got is None and "rank 1 has no shards of this collection (it had no free snapshot slot" in (why or "")
    assembler.release(5)
    assert list(rank1.states) == [FREE, FREE]  # the stale ones are freed, not leaked
    assert rank1.copy_in(6, rank1_part(full_tensors(6)))
    assert list(rank1.states).count(PUBLISHED) == 1


def test_a_slot_being_filled_is_never_freed_under_its_filler(plan: ShardPlan) -> None:
    """The worker frees published shard slots only: one that rank 1 has taken and is still
    copying into (its tag an old collection's) stays taken while the worker frees stale ones."""
    rank1 = SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    assembler = Assembler(plan, [rank0_slot(full_tensors(0))] * 2)
    assert rank1.copy_in(0, rank1_part(full_tensors(0)))
    assert assembler.tensors(0, 0)[1] is None
    assembler.release(0)
    filling = rank1.states.acquire()  # rank 1's next copy begins in the slot just freed (tag 0)
    assert filling is not None
    assembler.release(3)  # the worker frees what is stale up to collection 3
    assert list(rank1.states)[filling] == TAKEN


def test_a_rank_that_stops_copying_is_waited_for_once_then_read_again_when_it_catches_up(
        plan: ShardPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "WAIT_FOR_RANK_S", 0.05)
    rank1 = SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    assembler = Assembler(plan, [rank0_slot(full_tensors(2))] * 2)
    got, why = assembler.tensors(0, 0)
    assert got is None and "did not arrive within" in (why or "")
    monkeypatch.setattr(snapshot, "WAIT_FOR_RANK_S", 60.0)
    got, why = assembler.tensors(1, 1)  # no second wait: a minute here would fail the test's timeout
    assert got is None and "is behind" in (why or "")
    assembler.release(1)
    assert rank1.copy_in(2, rank1_part(full_tensors(2)))  # the slow rank catches up
    got, why = assembler.tensors(0, 2)
    assert why is None and got is not None and all(torch.equal(a, b) for a, b in zip(got, full_tensors(2), strict=True))


def test_a_copy_that_fails_frees_its_slot_and_is_not_waited_for(plan: ShardPlan) -> None:
    """A rank whose shard copy raises (a device error): its slot is not left taken, and the
    reader names the rank at once instead of waiting for shards that will not come."""
    rank1 = SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    with pytest.raises(RuntimeError):
        rank1.copy_in(0, [torch.zeros(9), torch.zeros(2, dtype=torch.float64)])  # wrong size: the copy raises
    assert list(rank1.states) == [FREE, FREE] and rank1.progress[0] == 0
    got, why = Assembler(plan, [rank0_slot(full_tensors(0))] * 2).tensors(0, 0)
    assert got is None and "rank 1 has no shards of this collection" in (why or "")


def test_ranks_on_other_hosts_give_a_reason_instead_of_weights() -> None:
    plan = make_plan(same_host=False)
    got, why = Assembler(plan, [rank0_slot(full_tensors(0))]).tensors(0, 0)
    assert got is None and "shards lie on 2 hosts" in (why or "") and "holdout" in (why or "")
    assert "weight norms, deltas and update ratios are" in (why or "")  # from the hosts' sums (test_hosts.py)


def test_a_full_dev_shm_fails_with_the_fix(plan: ShardPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    from train_telemetry import TelemetryConfigError

    with pytest.raises(TelemetryConfigError, match="shm-size"):
        SlotFile(plan.paths[1], plan.num_slots, plan.file_specs(1), create=True)
    assert not os.path.exists(plan.paths[1])


def test_a_rank_without_a_batch_makes_the_global_counts_unknown_not_smaller(plan: ShardPlan) -> None:
    """A rank that passes no batch adds "unknown" to the summed label counts (as under DDP):
    rank 0 then records no batch statistics rather than the other ranks' rows as the global batch."""
    from train_telemetry.batches import BatchFormatCache
    from train_telemetry.metrics.batch import unpack_count_vector
    from train_telemetry.shards import ShardSync

    params = [torch.nn.Parameter(torch.zeros(7, 3)), torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    sync = ShardSync(params, plan, 1, torch.device("cpu"), BatchFormatCache(["x"], "y", False, need_inputs=False),
                     want_counts=True)
    given, missing = torch.zeros(sync.size, dtype=torch.float64), torch.zeros(sync.size, dtype=torch.float64)
    sync._fill(given, {"x": torch.zeros(4, 3), "y": torch.tensor([0, 1, 1, 2])}, None, None)
    sync._fill(missing, None, None, None)
    counts = (given + missing)[sync.counts_at : sync.failed_at].to(torch.int64).tolist()
    assert unpack_count_vector(counts) == (None, None)
    assert unpack_count_vector(given[sync.counts_at : sync.failed_at].to(torch.int64).tolist())[1] == 4
    assert not sync.failures

