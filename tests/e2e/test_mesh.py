"""2-D and 3-D device meshes: HSDP, FSDP2 + tensor parallel, HSDP + TP on 4 real torchrun ranks
(gloo, CPU, loopback); also on two simulated hosts.

scripts/ddp_example.py --fsdp hsdp | tp | hsdp_tp runs the tiny classifier on a 2x2 mesh:
HSDP (``fully_shard`` on a (replicate, shard) mesh) or torchtitan's layout (the backbone's
Linears column- then row-wise over "tp", every Linear and the root ``fully_shard`` over
"dp"), or on the 3-D mesh (replicate 2, shard 1, tp 2) of torchtitan's HSDP + TP, with two named param groups, an LR that changes every step and two accumulated
micro-batches per optimizer step. Every per-group and per-layer value rank 0 records must
equal a float64 one-process computation written here with plain torch (replicated
parameters counted once: counted twice, a norm would come out up to sqrt(2) too large), and
every key must equal the one-process run's record. The hook's collectives are counted on
the same runs: one small all_reduce per collection, nothing else, nothing between.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import (  # noqa: F401
    REL,
    assert_all_written,
    example,
    pytestmark,
    run_example,
    run_two_ranks,
)
from test_fsdp import assert_same

from train_telemetry import read_records
from train_telemetry.metrics.batch import COUNT_VECTOR_LEN
from train_telemetry.shards import TEST_HOSTS_ENV
from train_telemetry.snapshot import RANK_PARTS

STEPS, EVERY = 6, 2
FLAGS = ["--steps", str(STEPS), "--collect-every-n", str(EVERY), "--accum", "2"]
PARAMS = ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias", "head.weight", "head.bias"]


def _shm_files() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("train-telemetry-")}


@pytest.fixture(scope="module")
def float64_reference() -> list[dict[str, Any]]:
    return float64_records(STEPS)


def float64_records(steps: int) -> list[dict[str, Any]]:
    """What each collection should record, computed in float64 on one process with the whole
    model and the whole global batch (the example's model, data, optimizer and schedule)."""
    torch.manual_seed(0)
    model = example.TinyNet().double()  # the same initial weights as every rank's (seed 0)
    optimizer, scheduler = example.make_optimizer(model)
    names = [n for n, _ in model.named_parameters()]
    assert names == PARAMS
    params = list(model.parameters())
    group = {n: "backbone" if n.startswith("backbone") else "head" for n in names}
    layer = {n: n.rsplit(".", 1)[0] for n in names}
    holdout = example.holdout_batch()
    previous = [p.detach().clone() for p in params]  # the first delta measures from start()
    out = []
    for step in range(steps):
        batch = example.global_batch(step)
        logits = model(batch["x"].double())
        loss = torch.nn.functional.cross_entropy(logits, batch["y"])  # the mean over the global batch
        loss.backward()
        optimizer.step()
        if step % EVERY == 0:
            grads = {n: p.grad.detach() for n, p in zip(names, params, strict=True)}
            weights = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
            before = dict(zip(names, previous, strict=True))
            squares = {"gradient_norm": {n: float(g.square().sum()) for n, g in grads.items()},
                       "weight_norm": {n: float(w.square().sum()) for n, w in weights.items()},
                       "weight_delta": {n: float((weights[n] - before[n]).square().sum()) for n in names},
                       "_before": {n: float(b.square().sum()) for n, b in before.items()}}
            families = {f: {**_norms(sq, dict.fromkeys(names, "overall")), **_norms(sq, group)} for f, sq in squares.items()}
            layers = {f: _norms(sq, layer) for f, sq in squares.items()}
            for table in (families, layers):
                table["update_ratio"] = {k: v / table["_before"][k] for k, v in table["weight_delta"].items()}
                del table["_before"]
            with torch.no_grad():
                held = model(holdout["x"].double())
            out.append({
                "batch_idx": step, **families, "layers": layers,
                "learning_rates": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "loss": float(loss.detach()), "accuracy": float((logits.detach().argmax(1) == batch["y"]).double().mean()),
                "labels": batch["y"].tolist(), "holdout": held.tolist(),
                "reference_batch_idx": out[-1]["batch_idx"] if out else None,
            })
            previous = [w.clone() for w in weights.values()]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def assert_matches(got: dict[str, Any], want: dict[str, Any], where: str, weights: bool = True,
                   deltas: bool = True, holdout: bool = True) -> None:
    """``got`` (a record) equals ``want`` (float64_records) at rel 1e-5: gradient norms, and
    with ``weights`` weight norms (with ``deltas`` deltas and update ratios too), overall,
    per group and per layer; the LRs, loss, accuracy and global batch statistics; with
    ``holdout`` the holdout logits."""
    families = ["gradient_norm", *(["weight_norm"] if weights else []),
                *(["weight_delta", "update_ratio"] if weights and deltas else [])]
    for family in families:
        assert set(got[family]) == set(want[family]) == {"overall", "backbone", "head"}, (where, family)
        for key, value in want[family].items():
            assert close(got[family][key], value), (where, family, key, got[family][key], value)
        assert set(got["layers"][family]) == set(want["layers"][family]) == {"backbone.0", "backbone.2", "head"}
        for key, value in want["layers"][family].items():
            assert close(got["layers"][family][key], value), (where, "layers", family, key, got["layers"][family][key], value)
    if weights and deltas:
        assert got["reference_batch_idx"] == want["reference_batch_idx"], where
    for name, lr in want["learning_rates"].items():
        assert close(got["learning_rates"][name], lr), (where, name)
    assert close(got["train"]["loss"], want["loss"]) and close(got["train"]["accuracy"], want["accuracy"]), where
    labels = want["labels"]
    assert got["batch_stats"]["batch_size"] == len(labels) == 16, where  # TP peers' rows counted once
    for c in range(3):
        assert close(got["batch_stats"][f"y_{c}_pct"], 100.0 * labels.count(c) / len(labels)), (where, c)
    if holdout:
        held = got["holdout_logits"]["logits"]
        for row_got, row_want in zip(held, want["holdout"], strict=True):
            for a, b in zip(row_got, row_want, strict=True):
                assert close(a, b, abs_tol=1e-6), (where, "holdout", a, b)


def _norms(squares: dict[str, float], key: dict[str, str]) -> dict[str, float]:
    """sqrt of the summed squares per ``key[name]`` (a group, a layer, or "overall")."""
    sums: dict[str, float] = {}
    for name, value in squares.items():
        sums[key[name]] = sums.get(key[name], 0.0) + value
    return {k: math.sqrt(v) for k, v in sums.items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out, results = run_example(tmp_path_factory.mktemp("single"), *FLAGS, ranks=1)
    assert_all_written(results[0]["summary"])
    return read_records(out)


# The layouts whose ranks include replicas of each other (the replica check compares them):
# HSDP's replicate dim, and the 3-D mesh's (replicate 2, shard 1, tp 2), torchtitan's HSDP + TP.
WITH_REPLICAS = ("hsdp", "hsdp_tp")


@pytest.fixture(scope="module", params=["hsdp", "tp", "hsdp_tp"])
def mesh_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 4-rank run on a 2x2 mesh, the hook's collectives counted on every rank."""
    before = _shm_files()
    out, results = run_example(tmp_path_factory.mktemp(request.param), *FLAGS, "--fsdp", request.param,
                               "--count-collectives", ranks=4)
    return {"layout": request.param, "records": read_records(out), "results": results,
            "shm_left": _shm_files() - before}


def close(got: float | None, want: float, abs_tol: float = 1e-9) -> bool:
    return got is not None and math.isclose(got, want, rel_tol=REL, abs_tol=abs_tol)


@pytest.mark.timeout(240)
def test_2d_mesh_records_equal_the_float64_reference_per_group_and_layer(
        mesh_run: dict[str, Any], float64_reference: list[dict[str, Any]]) -> None:
    """HSDP and FSDP2 + TP on a 2x2 mesh: every gradient norm, weight norm, delta and update
    ratio (overall, per group, per layer), the LRs, loss, accuracy, global batch statistics
    and holdout logits rank 0 records equal the float64 one-process values at rel 1e-5."""
    results = mesh_run["results"]
    assert_all_written(results[0]["summary"])
    assert all(results[r]["summary"]["hook_errors"] == 0 and results[r]["worker_pid"] is None for r in (1, 2, 3))
    records = mesh_run["records"]
    assert [r["batch_idx"] for r in records] == [w["batch_idx"] for w in float64_reference] == [0, 2, 4]
    for got, want in zip(records, float64_reference, strict=True):
        where = f"{mesh_run['layout']} batch {want['batch_idx']}"
        assert "errors" not in got, (where, got["errors"])
        assert (got["rank"], got["world_size"]) == (0, 4)
        assert_matches(got, want, where)
    assert not mesh_run["shm_left"], f"shard files left in /dev/shm: {mesh_run['shm_left']}"


@pytest.mark.timeout(240)
def test_2d_mesh_records_equal_the_one_process_run_key_by_key(
        mesh_run: dict[str, Any], one_process: list[dict[str, Any]]) -> None:
    """Every key of every record (activations, holdout predictions, model mode ...) equals
    what the example writes in one process, as for FSDP2 on a 1-D mesh."""
    records = mesh_run["records"]
    assert len(records) == len(one_process) == 3
    for got, want in zip(records, one_process, strict=True):
        check = got.pop("replicas", None)  # one process has no replicas to compare
        assert_same(got, want, f"{mesh_run['layout']} batch {want['batch_idx']}")
        # HSDP: each shard's two replicas (ranks 0 and 2, 1 and 3) compared, equal bit for bit;
        # FSDP2 + TP: no two ranks hold the same blocks of every tensor, so nothing to compare
        want_check = {"compared": 4, "not_compared": 0, "max_rel_spread": 0.0, "diverged": []}
        assert check == (want_check if mesh_run["layout"] in WITH_REPLICAS else None), check


@pytest.mark.timeout(240)
def test_the_hook_issues_one_small_all_reduce_per_collection_and_nothing_else(mesh_run: dict[str, Any]) -> None:
    """Counted on every rank, around each on_batch_end (torch.distributed's functions wrapped,
    and gloo's own events for anything that bypasses them): one all_reduce over the whole
    world of a vector of 2 numbers per parameter plus the fixed label counts (and, with
    replicas to compare, one number per rank) at each collection, whatever the mesh; no
    all-gather of weights or gradients; none between."""
    size = 4 + 2 * len(PARAMS) + COUNT_VECTOR_LEN + 2 * len(RANK_PARTS)
    size += 4 if mesh_run["layout"] in WITH_REPLICAS else 0  # the replica check: one number per rank
    for rank, result in mesh_run["results"].items():
        seen = {int(step): calls for step, calls in result["collectives"].items()}
        assert sorted(seen) == list(range(STEPS)), (rank, seen)
        for step, calls in seen.items():
            if step % EVERY:
                assert calls == [], (rank, step, calls)
            else:
                assert calls == [["all_reduce", 4, size], ["gloo", None, "gloo:all_reduce"]], (rank, step, calls)


@pytest.mark.timeout(240)
def test_a_killed_worker_on_a_2d_mesh_blocks_no_rank_and_every_record_stays_exact(
        tmp_path: Path, one_process: list[dict[str, Any]]) -> None:
    """HSDP on the 2x2 mesh, rank 0's worker SIGKILLed at the second collection step: all
    four ranks train to the end, a new worker replays what the dead one held, and no record is
    lost: each equals the one-process run's key by key, or, where rank 1 had already stopped
    and removed its shard file when the new worker started (the replacement used to fail to
    start there, and lose every snapshot it held), keeps every key that does not need the
    weights and says which shards were missing (issue 24, item 4)."""
    out, results = run_example(tmp_path, *FLAGS, "--fsdp", "hsdp", "--mode", "async",
                               "--kill-worker-at", str(EVERY), ranks=4)
    assert sorted(results) == [0, 1, 2, 3] and all(r["steps"] == STEPS for r in results.values())
    s0 = results[0]["summary"]
    assert s0["worker_restarts"] == 1, s0
    records = read_records(out)
    assert len(records) == s0["records_written"] == s0["snapshots_taken"] == len(one_process), s0  # none lost
    for got, want in zip(records, one_process, strict=True):
        # the replacement worker stamps its records; one process has no replicas to compare
        got = {k: v for k, v in got.items() if k not in ("restarts", "replicas")}
        missing = [e for e in got.pop("errors", []) if e["type"] == "ShardsMissing"]
        if missing:
            # Rank 1 stopped (and removed its shard file) before rank 0's worker was replaced,
            # which a 6-step run makes likely: the replayed record says so and keeps every key
            # that does not need the weights, exact.
            assert "rank 1's shard file was gone" in missing[0]["message"], missing
            assert "weight_norm" not in got and "holdout_logits" not in got, sorted(got)
            assert all(v is None for v in got.get("weight_delta", {}).values()), got.get("weight_delta")  # absent, not wrong
            kept = ("batch_idx", "epoch", "gradient_norm", "learning_rates", "batch_stats", "train")
            got, want = {k: got[k] for k in kept}, {k: want[k] for k in kept}
        assert_same(got, want, f"hsdp, worker killed, batch {want['batch_idx']}")


@pytest.fixture(scope="module", params=["hsdp", "tp"])
def hosts_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same 2x2 runs with ranks 0-1 and 2-3 on two "hosts" that share no memory
    (TRAIN_TELEMETRY_TEST_HOSTS=2). HSDP's mesh replicates across them (rows of the
    (replicate, shard) mesh are hosts); torchtitan's layout puts "tp" within a host and "dp"
    across, so the weights' counted blocks lie on both."""
    before = _shm_files()
    out, results = run_example(tmp_path_factory.mktemp(f"hosts-{request.param}"), *FLAGS, "--fsdp", request.param,
                               "--count-collectives", ranks=4, env={TEST_HOSTS_ENV: "2"})
    return {"layout": request.param, "records": read_records(out), "results": results,
            "shm_left": _shm_files() - before}


@pytest.mark.timeout(240)
def test_on_two_hosts_every_weight_number_is_exact_and_the_holdout_is_there_or_explained(
        hosts_run: dict[str, Any], float64_reference: list[dict[str, Any]]) -> None:
    """Across hosts nothing but a few numbers per parameter crosses: every gradient norm,
    weight norm, delta and update ratio (overall, per group, per layer) still equals the
    float64 one-process values. HSDP replicating across hosts has a whole copy on rank 0's
    host, so its records are complete, holdout included; with shards on both hosts the
    holdout (the whole model in one process) is absent and each record says why. The hook
    still issues one small all_reduce per collection and nothing else."""
    layout, results = hosts_run["layout"], hosts_run["results"]
    assert_all_written(results[0]["summary"])
    assert all(results[r]["summary"]["hook_errors"] == 0 for r in (1, 2, 3))
    records = hosts_run["records"]
    assert [r["batch_idx"] for r in records] == [w["batch_idx"] for w in float64_reference]
    for got, want in zip(records, float64_reference, strict=True):
        where = f"{layout} on two hosts, batch {want['batch_idx']}"
        if layout == "hsdp":
            assert "errors" not in got, (where, got["errors"])
            assert_matches(got, want, where)
            continue
        assert_matches(got, want, where, holdout=False)
        (error,) = got["errors"]
        assert (error["where"], error["type"]) == ("holdout", "WeightsOnOtherHosts"), error
        assert "2 hosts" in error["message"] and "HSDP that replicates across hosts" in error["message"], error
        assert "holdout_logits" not in got and "activations" not in got, where
    size = 4 + 2 * len(PARAMS) + COUNT_VECTOR_LEN + 2 * len(RANK_PARTS) + (4 if layout == "hsdp" else 0)
    for rank, result in results.items():
        for step, calls in result["collectives"].items():
            want_calls = [] if int(step) % EVERY else [["all_reduce", 4, size], ["gloo", None, "gloo:all_reduce"]]
            assert calls == want_calls, (layout, rank, step, calls)
    assert not hosts_run["shm_left"], f"shard files left in /dev/shm: {hosts_run['shm_left']}"


@pytest.mark.timeout(300)
def test_on_two_hosts_a_failed_fill_and_a_killed_host_worker_hang_nothing_and_cost_only_their_records(
        tmp_path: Path) -> None:
    """FSDP2 + TP on two "hosts", 12 steps: rank 3 (on host 1) fails its shard copy at step 2,
    and host 1's worker is SIGKILLed after step 6. No rank waits: every collection is
    recorded, gradient norms, LRs, loss and batch statistics exact throughout. Step 2's
    record has no weight numbers and names rank 3; step 4's has exact weight norms but no
    delta (host 1's reference is gone) and says why; the replacement host worker has no
    reference either, so exactly one of steps 6 and 8 has no delta and says it was replaced;
    every other record, and the last, is exact."""
    steps = 12
    out, results = run_example(tmp_path, "--steps", str(steps), "--collect-every-n", str(EVERY), "--accum", "2",
                               "--fsdp", "tp", "--fail-fill-rank", "3", "--fail-fill-at", "2",
                               "--kill-host-worker-at", "6", ranks=4, env={TEST_HOSTS_ENV: "2"})
    assert sorted(results) == [0, 1, 2, 3] and all(r["steps"] == steps for r in results.values())
    records = read_records(out)
    reference = float64_records(steps)
    assert [r["batch_idx"] for r in records] == [w["batch_idx"] for w in reference] == list(range(0, steps, EVERY))
    replaced = []
    for got, want in zip(records, reference, strict=True):
        step, where = want["batch_idx"], f"failures on two hosts, batch {want['batch_idx']}"
        errors = {e["type"]: e["message"] for e in got.get("errors", []) if e["type"] != "WeightsOnOtherHosts"}
        if step == 2:
            assert_matches(got, want, where, weights=False, holdout=False)
            assert "weight_norm" not in got and all(v is None for v in got["weight_delta"].values()), where
            assert "rank 3 has no shards of this collection" in errors["ShardsMissing"], errors
        elif step == 4 or "NoReference" in errors:
            assert_matches(got, want, where, deltas=False, holdout=False)
            assert all(v is None for v in got["weight_delta"].values()), where
            if step == 4:
                assert "missing at the previous collection" in errors["NoReference"], errors
            else:
                replaced.append(step)
                assert "worker was replaced" in errors["NoReference"], errors
        else:
            assert errors == {}, (where, errors)
            assert_matches(got, want, where, holdout=False)
    assert len(replaced) == 1 and replaced[0] in (6, 8), replaced


PARTIAL_GRADS = """
import os, sys, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.fsdp import fully_shard
from train_telemetry import Telemetry, TelemetryConfig, TelemetryConfigError, read_records

rank, store, out, case = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
if case == "pipeline" and rank == 1:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))  # another stage: other parameters
if case == "tp_alone":
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    parallelize_module(model, mesh, {"0": ColwiseParallel()})
else:
    fully_shard(model)
if case in ("tp_alone", "pipeline"):  # layouts start() must refuse on both ranks
    try:
        Telemetry(TelemetryConfig(output_dir=out, mode="sync")).start(model)
    except TelemetryConfigError as exc:
        print("refused:", exc, flush=True)
    dist.barrier()  # neither rank tears gloo down while the other is still in start()'s collective
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # not the interpreter's teardown: gloo's threads under a DeviceMesh abort there now and then
t = Telemetry(TelemetryConfig(output_dir=out, mode="sync", collect_every_n=1))
t.start(model)
# Each rank's share of a gradient as a Partial DTensor: the gradient is the sum of both
# ranks' tensors, which no rank holds. Its norm must be the norm of the sum.
g = torch.Generator().manual_seed(5)
full = [torch.randn(p.shape, generator=g) for p in model.parameters()]
mine = [torch.randn(p.shape, generator=g) for p in model.parameters()]
for p, f, m in zip(model.parameters(), full, mine):
    share = m if rank == 0 else f - m  # rank 0's part plus rank 1's part is ``f``
    partial = DTensor.from_local(share, mesh, [Partial()], run_check=False)
    p.grad = partial.redistribute(mesh, [Partial()])  # still Partial: a sum no rank holds
print("placements", [str(p.grad.placements) for p in model.parameters()], flush=True)
t.on_batch_end(model, None, 0)
t.stop()
if rank == 0:
    record = read_records(out)[0]
    print("norm", record["gradient_norm"]["overall"], torch.stack([f.norm() for f in full]).norm().item(), flush=True)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as above: no interpreter teardown under gloo's DeviceMesh threads
"""


def _two_ranks(tmp_path: Path, case: str) -> list[str]:
    return run_two_ranks(PARTIAL_GRADS, str(tmp_path / "store"), str(tmp_path / "run"), case)


@pytest.mark.timeout(120)
def test_partial_gradients_are_summed_over_ranks_not_counted_from_one(tmp_path: Path) -> None:
    """Gradients that are Partial DTensors (each rank holds a term of the sum): the recorded
    norm is the norm of the sum, as the optimizer sees it, not of rank 0's term."""
    outputs = _two_ranks(tmp_path, "partial")
    assert "Partial" in outputs[0], outputs[0][-3000:]
    norm = next(line for line in outputs[0].splitlines() if line.startswith("norm")).split()
    assert math.isclose(float(norm[1]), float(norm[2]), rel_tol=REL), norm


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "message"), [
    ("pipeline", "rank 1 holds other parameters than rank 0.*pipeline parallelism.*not supported"),
    ("tp_alone", "tensor parallelism alone.*apply fully_shard over the data-parallel mesh dimension"),
])
def test_layouts_that_cannot_be_recorded_exactly_are_refused_with_the_fix(tmp_path: Path, case: str, message: str) -> None:
    """Ranks holding different parameters (pipeline stages), and tensor parallelism without
    fully_shard (which ranks see different batches is unknown): start() refuses on every rank,
    naming the problem and what to do."""
    import re

    outputs = _two_ranks(tmp_path, case)
    for output in outputs:
        refused = next((line for line in output.splitlines() if line.startswith("refused:")), "")
        assert re.search(message, refused), output[-3000:]


def test_blocks_whose_rows_are_not_contiguous_are_placed_row_by_row(tmp_path: Path) -> None:
    """A block given as a list of rows (what a _StridedShard can give a rank when shards are
    uneven): rank 0's worker puts each of rank 1's rows where DTensor says it belongs."""
    from train_telemetry.messages import TensorSpec
    from train_telemetry.shards import Assembler, Block, ShardPlan
    from train_telemetry.snapshot import SlotFile

    full = torch.arange(15.0).view(5, 3)
    rows0, rows1 = [0, 2, 4], [1, 3]
    blocks: list[Block | None] = [Block((3, 3), (rows0, (0, 3))), Block((2, 3), (rows1, (0, 3)))]
    plan = ShardPlan(world_size=2, specs=[TensorSpec("w", (5, 3), "float32")], num_slots=1, blocks=[blocks])
    plan.paths = [None, f"/dev/shm/train-telemetry-test-{os.getpid()}-{tmp_path.name}-rank1"]
    try:
        rank1 = SlotFile(plan.paths[1], 1, plan.file_specs(1), create=True)
        assert rank1.copy_in(0, [full[rows1]])
        got, why = Assembler(plan, [[full[rows0].clone()]]).tensors(0, 0)
        assert why is None and got is not None and torch.equal(got[0], full), got
    finally:
        os.unlink(plan.paths[1])
