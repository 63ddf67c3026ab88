"""FSDP2 (``fully_shard``): real torchrun ranks (gloo, CPU, loopback) against one process.

scripts/ddp_example.py --fsdp shards the tiny classifier over 2 ranks (every Linear and
the root: ``full``; the backbone sharded and the head replicated: ``mixed``), with two
named param groups, an LR that changes every step and two accumulated micro-batches per
optimizer step. Rank 0 writes; every value it records (gradient and weight norms, deltas,
update ratios, LRs, loss, accuracy, batch statistics, holdout logits, per-layer numbers,
activations) must equal what one process with the whole model records on the same global
batches. The shards of ranks > 0 reach rank 0's worker through named shared-memory files,
which must be gone after the run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import (  # noqa: F401
    EXAMPLE,
    REL,
    assert_all_written,
    pytestmark,
    run_example,
    run_two_ranks,
)

from train_telemetry import read_records
from train_telemetry.records import read_json
from train_telemetry.shards import TEST_HOSTS_ENV

STEPS = ["--steps", "8", "--collect-every-n", "2", "--accum", "2"]
NOT_COMPARED = {"timestamp", "time", "hook_ms", "worker_lag_ms", "rank", "world_size"}


def _shm_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("train-telemetry-")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The records of one process with the whole model, on the same global batches."""
    out, results = run_example(tmp_path_factory.mktemp("single"), *STEPS, ranks=1)
    assert_all_written(results[0]["summary"])
    return read_records(out)


def assert_same(got: Any, want: Any, where: str) -> None:
    """Every key of every record equal (floats to rel 1e-5), except timing and rank."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) - NOT_COMPARED == set(want) - NOT_COMPARED, (where, got, want)
        for key in set(want) - NOT_COMPARED:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=REL, abs_tol=1e-7), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fsdp2_on_two_hosts_records_every_weight_number_and_says_why_the_holdout_is_absent(
        tmp_path: Path, one_process: list[dict[str, Any]], mode: str) -> None:
    """Each rank on a host of its own (no shared memory between them): every collection is
    recorded; gradient norms, LRs, loss, batch statistics and also the weight norms, deltas
    and update ratios (overall, per group, per layer: summed from each host's worker,
    hosts.py) equal one process's; the holdout and activations, which need the whole model
    in one process, are absent and each record says why. Before, the weight numbers were
    absent too, and before that most records were lost (an AttributeError in the hook).
    The same records whether rank 0's worker builds them or its training thread does."""
    out, results = run_example(tmp_path, *STEPS, "--fsdp", "full", "--mode", mode, env={TEST_HOSTS_ENV: "2"})
    assert_all_written(results[0]["summary"])
    assert results[0]["summary"]["hook_errors"] == 0 == results[1]["summary"]["hook_errors"]
    records = read_records(out)
    assert len(records) == len(one_process) == 4
    assert {r["telemetry"]["built_by"] for r in records} == {"worker" if mode == "async" else "trainer"}
    for got, want in zip(records, one_process, strict=True):
        for key in ("gradient_norm", "learning_rates", "train", "batch_stats", "weight_norm", "weight_delta",
                    "update_ratio", "layers", "reference_batch_idx"):
            assert_same(got[key], want[key], f"batch {want['batch_idx']}.{key}")
        assert "holdout_logits" not in got and "activations" not in got
        (missing,) = got["errors"]
        assert (missing["where"], missing["type"]) == ("holdout", "WeightsOnOtherHosts"), missing
        assert "shards lie on 2 hosts" in missing["message"], missing


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["full", "mixed"])
def test_fsdp2_records_equal_one_process(tmp_path: Path, one_process: list[dict[str, Any]], how: str) -> None:
    """Sharded (and sharded + replicated) over 2 ranks, the records equal the one-process run's, key by key."""
    before = _shm_files()
    out, results = run_example(tmp_path, *STEPS, "--fsdp", how)
    assert_all_written(results[0]["summary"])
    assert results[1]["worker_pid"] is None and results[1]["summary"]["hook_errors"] == 0
    records = read_records(out)
    assert len(records) == len(one_process) == 4
    for got, want in zip(records, one_process, strict=True):
        assert (got["rank"], got["world_size"]) == (0, 2)
        assert "errors" not in got, got["errors"]
        assert_same(got, want, f"batch {want['batch_idx']}")
    # What was compared is there: the weight families, the holdout and the global batch.
    last = records[-1]
    assert last["weight_delta"]["overall"] is not None and last["weight_delta"]["overall"] > 0
    assert len(last["holdout_logits"]["logits"]) == 24 and last["batch_stats"]["batch_size"] == 16
    assert last["train"]["loss"] is not None and last["train"]["accuracy"] is not None
    assert sorted(last["gradient_norm"]) == ["backbone", "head", "overall"]
    # The names are the user's; rank 0's delta reference holds the full tensors.
    ckpt = torch.load(out / "last_checkpoint.pt", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    assert shapes["backbone.0.weight"] == (16, 6) and shapes["head.weight"] == (3, 8), shapes
    assert _shm_files() == before, "a rank's shard file was left in /dev/shm"


@pytest.mark.timeout(150)
def test_killed_worker_under_fsdp2_blocks_no_rank_and_replays(tmp_path: Path) -> None:
    """SIGKILL of rank 0's worker mid-run: both ranks train to the end, a new worker replays
    the shards it held (the other ranks' too), every collection is on disk once."""
    out, results = run_example(tmp_path, "--steps", "30", "--collect-every-n", "2", "--kill-worker-at", "8",
                               "--fsdp", "full")
    for rank in (0, 1):
        assert results[rank]["steps"] == 30
    s0 = results[0]["summary"]
    assert s0["worker_restarts"] == 1, s0
    records = read_records(out)
    assert len(records) == s0["records_written"] == s0["snapshots_taken"] == 15
    assert [r["batch_idx"] for r in records] == list(range(0, 30, 2))
    assert all("errors" not in r for r in records), [r.get("errors") for r in records]
    assert all(r["weight_norm"]["overall"] > 0 for r in records)


FSDP2_ONE_RANK = """
import sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, read_records
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
plain.load_state_dict(model.state_dict())
for layer in model:
    fully_shard(layer)
fully_shard(model)
try:
    Telemetry(TelemetryConfig(output_dir=sys.argv[2] + "/x", per_rank=True)).start(model)
except TelemetryConfigError as exc:
    print("refused:", exc)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
t = Telemetry(TelemetryConfig(output_dir=sys.argv[2] + "/run", mode="sync", collect_every_n=1))
t.start(model, opt)
x = torch.randn(8, 4)
model(x).square().mean().backward()
opt.step()
t.on_batch_end(model, opt, 0)
t.stop()
plain(x).square().mean().backward()
record = read_records(sys.argv[2] + "/run")[0]
want = torch.stack([p.grad.norm() for p in plain.parameters()]).norm().item()
print("norm", record["gradient_norm"]["overall"], want)
print("names", sorted(record["layers"]["gradient_norm"]))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_fsdp2_on_one_rank_and_per_rank_refused(tmp_path: Path) -> None:
    """One rank (every shard local): exact, with the user's layer names; per_rank is refused with the fix."""
    proc = subprocess.run([sys.executable, "-c", FSDP2_ONE_RANK, str(tmp_path / "store"), str(tmp_path)],
                          capture_output=True, text=True, timeout=100, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused: per_rank: true with a sharded (FSDP2) model" in proc.stdout, proc.stdout
    norm = next(line for line in proc.stdout.splitlines() if line.startswith("norm")).split()
    assert math.isclose(float(norm[1]), float(norm[2]), rel_tol=REL), norm
    assert "names ['0', '1']" in proc.stdout, proc.stdout
    assert read_json(tmp_path / "run" / "run.json") is not None


def test_deepspeed_zero3_partitioned_parameters_are_refused_with_the_fix(tmp_path: Path) -> None:
    """ZeRO-3 marks each partitioned parameter with ``ds_id``: start() says why records would be wrong."""
    from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError

    model = torch.nn.Linear(4, 2)
    for i, p in enumerate(model.parameters()):
        p.ds_id = i  # what deepspeed.zero.Init sets on the parameters it partitions
    with pytest.raises(TelemetryConfigError, match="DeepSpeed ZeRO-3.*fully_shard"):
        Telemetry(TelemetryConfig(output_dir=str(tmp_path / "run"), mode="sync")).start(model)
    assert not (tmp_path / "run" / "telemetry.jsonl").exists()


FSDP2_RANK_FAILS = """
import copy, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_telemetry import Telemetry, TelemetryConfig
from train_telemetry.shards import ShardSync

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
plain = copy.deepcopy(model)
fully_shard(model[0])
fully_shard(model[2])
fully_shard(model)
opt, plain_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
step_now = 0
if rank == 1:  # at step 1 this rank's whole share of the collective fails
    real_fill = ShardSync._fill

    def failing_fill(self, *args):
        if step_now == 1:
            raise RuntimeError("rank 1 cannot fill")
        return real_fill(self, *args)

    ShardSync._fill = failing_fill
t = Telemetry(TelemetryConfig(output_dir=out, mode="sync", collect_every_n=1, input_keys=["x"], label_key="y"))
t.start(model, opt)
g = torch.Generator().manual_seed(1)
for step in range(3):
    step_now = step
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    mine = slice(4 * rank, 4 * rank + 4)
    logits = model(x[mine])
    loss = torch.nn.functional.cross_entropy(logits, y[mine])
    loss.backward()
    opt.step()
    batch = {"x": x[mine], "y": y[mine]}
    if rank == 1 and step == 2:  # at step 2 its labels cannot be read: no "y" key
        batch = {"x": x[mine], "labels": y[mine]}
    t.on_batch_end(model, opt, step, batch=batch, loss=loss.detach(), outputs=logits.detach())
    opt.zero_grad()
    if rank == 0:  # one process, the whole model, the global batch
        plain_logits = plain(x)
        plain_loss = torch.nn.functional.cross_entropy(plain_logits, y)
        plain_loss.backward()
        norm = torch.stack([p.grad.norm() for p in plain.parameters()]).norm().item()
        acc = (plain_logits.argmax(1) == y).float().mean().item()
        print("want", step, norm, plain_loss.item(), acc, flush=True)
        plain_opt.step()
        plain_opt.zero_grad()
summary = t.stop()
print("hook_errors", summary.hook_errors, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.timeout(150)
def test_a_rank_whose_share_fails_makes_its_parts_null_with_an_error_naming_it(tmp_path: Path) -> None:
    """Two FSDP2 ranks; rank 1's share of the collective fails at step 1 (all of it) and at
    step 2 (its labels): rank 0 records those parts as null with a RankFailed error naming
    rank 1, never a global value without rank 1's share; every other value is exact."""
    out = tmp_path / "run"
    outputs = run_two_ranks(FSDP2_RANK_FAILS, str(tmp_path / "store"), str(out), timeout=120)
    want = {int(w[1]): [float(v) for v in w[2:]] for w in (line.split() for line in outputs[0].splitlines())
            if w and w[0] == "want"}
    records = read_records(out)
    assert [r["batch_idx"] for r in records] == [0, 1, 2]

    def exact(got: float | None, value: float) -> bool:
        return got is not None and math.isclose(got, value, rel_tol=REL)

    first, whole, labels = records
    norm, loss, acc = want[0]
    assert "errors" not in first, first["errors"]
    assert exact(first["gradient_norm"]["overall"], norm) and exact(first["train"]["loss"], loss)
    assert exact(first["train"]["accuracy"], acc) and first["batch_stats"]["batch_size"] == 8

    errors = {e["where"]: e for e in whole["errors"]}
    assert set(errors) == {"gradient_norm", "train_loss", "batch_stats", "train_accuracy"}, whole["errors"]
    assert all(e["type"] == "RankFailed" and "rank 1 could not add its share" in e["message"] for e in errors.values())
    assert whole["gradient_norm"]["overall"] is None
    assert (whole.get("train") or {}).get("loss") is None and (whole.get("train") or {}).get("accuracy") is None
    assert whole.get("batch_stats") is None
    assert whole["weight_norm"]["overall"] > 0  # the weights never depended on the collective

    norm, loss, acc = want[2]
    errors = {e["where"]: e for e in labels["errors"]}
    assert set(errors) == {"batch_stats", "train_accuracy"}, labels["errors"]
    assert all("rank 1" in e["message"] for e in errors.values())
    assert exact(labels["gradient_norm"]["overall"], norm) and exact(labels["train"]["loss"], loss)
    assert labels["train"]["accuracy"] is None and labels.get("batch_stats") is None
    # The failing rank says why, once per part and cause; no collection was skipped.
    assert "rank 1 could not add its part to the global gradient_norm" in outputs[1], outputs[1][-3000:]
    assert "RuntimeError: rank 1 cannot fill" in outputs[1] and "TelemetryConfigError" in outputs[1]
    assert "hook_errors 0" in outputs[0] and "hook_errors 0" in outputs[1]
