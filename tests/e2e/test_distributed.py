"""Telemetry under torch.distributed: real ranks under torchrun (gloo, CPU, loopback) vs one process.

Every test runs scripts/ddp_example.py with 2 ranks wrapped in DistributedDataParallel
and compares what they wrote with the same script run in one process on the same global
batches (the reference). DDP averages gradients over ranks and the loss is a mean, so
gradient norms, weight deltas and LRs must agree to float32 rounding; batch statistics
are checked against the labels of the global batch computed here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
from failure_checks import GLOO_TEARDOWN_ABORT, descendants, free_port

from train_telemetry import Telemetry, TelemetryConfig, read_records
from train_telemetry.records import read_json
from train_telemetry.sinks import usable_cores

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "ddp_example.py"
REL = 1e-5
RUN_TIMEOUT_S = 75  # one torchrun launch takes ~12 s on 2 cores
COMPARED = ("gradient_norm", "weight_delta", "weight_norm", "learning_rates")

pytestmark = [
    pytest.mark.slow,
    # test_fsdp.py (which imports these marks) lists /dev/shm before and after its runs: under
    # `-n 2` no other torchrun test may run beside it, so both files go to one worker.
    pytest.mark.xdist_group("torchrun"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()






def run_example(workdir: Path, *flags: str, ranks: int = 2,
                env: dict[str, str] | None = None) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Run the example (under torchrun when ranks > 1), with ``env`` added to the environment;
    return its output dir and each rank's result."""
    out = workdir / "telemetry"
    results = workdir / "results"
    results.mkdir(parents=True)
    # on_full: block, so that no collection is dropped and runs compare record by record.
    # mode: async unless given: the worker under DDP is what GPU training runs (auto would build
    # inline here: the ranks' threads take every core of this CPU machine).
    mode = [] if "--mode" in flags else ["--mode", "async"]
    script = [str(EXAMPLE), "--out", str(out), "--result-dir", str(results), "--on-full", "block", *mode, *flags]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={ranks}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *script]
    else:
        cmd = [sys.executable, *script]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun puts each rank in a session of its own: kill the whole tree by pid, so
        # that ranks stuck in a collective do not outlive the test.
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the run hung (killed after {RUN_TIMEOUT_S}s):\n{output[-4000:]}")
    finished = all((results / f"result.rank{r}.json").exists() for r in range(ranks))
    if proc.returncode != 0 and finished and GLOO_TEARDOWN_ABORT in output:
        # Every rank trained, stopped telemetry and wrote its result; one then aborted while
        # gloo tore down (about 1 run in 20 here, barrier or not: pytorch/pytorch#190489).
        # Not ours to fix, and not what these tests check: the records and summaries are.
        warnings.warn(f"a rank aborted in gloo teardown after finishing:\n{output[-2000:]}", stacklevel=2)
    else:
        assert proc.returncode == 0, output[-4000:]
    by_rank = {}
    for rank in range(ranks):
        path = results / f"result.rank{rank}.json"
        assert path.exists(), f"rank {rank} did not finish:\n{output[-4000:]}"
        by_rank[rank] = json.loads(path.read_text())
    return out, by_rank




def run_two_ranks(script: str, *args: str, timeout: float = 100) -> list[str]:
    """Run ``script`` (``python -c``) as ranks 0 and 1 without torchrun (its argv: the rank, then
    ``args``), on loopback gloo; each must exit 0. Returns their outputs."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-4000:]
    return outputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The records of one process trained on the same global batches."""
    out, results = run_example(tmp_path_factory.mktemp("reference"), ranks=1)
    assert_all_written(results[0]["summary"])
    return read_records(out)


def assert_all_written(summary: dict[str, Any]) -> None:
    """Every snapshot taken is on disk, none dropped or failed, the worker (if any) exited normally."""
    assert summary["snapshots_dropped"] == 0 and summary["hook_errors"] == 0, summary
    assert summary["records_written"] == summary["snapshots_taken"] > 0, summary
    assert summary["clean"] and not summary["worker_terminated"], summary
    assert summary["worker_exitcode"] == (0 if summary["mode"] == "async" else None), summary


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)


def assert_same_training(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert [r["batch_idx"] for r in records] == [r["batch_idx"] for r in reference]
    for got, want in zip(records, reference, strict=True):
        for family in COMPARED:
            assert got[family].keys() == want[family].keys(), family
            for key, value in want[family].items():
                assert close(got[family][key], value), (got["batch_idx"], family, key, got[family][key], value)
        for a, b in zip(got["holdout_logits"]["logits"], want["holdout_logits"]["logits"], strict=True):
            assert all(math.isclose(x, y, rel_tol=REL, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def expected_batch_stats(labels: torch.Tensor) -> dict[str, float | int]:
    counts = torch.bincount(labels, minlength=example.NUM_CLASSES).tolist()
    stats: dict[str, float | int] = {f"y_{c}_pct": 100.0 * n / len(labels) for c, n in enumerate(counts)}
    return stats | {"batch_size": len(labels)}


def assert_batch_stats(records: list[dict[str, Any]], rank: int | None) -> None:
    """Each record's batch_stats cover the global batch (rank None) or that rank's share."""
    for record in records:
        batch = example.global_batch(record["batch_idx"])
        if rank is not None:
            batch = example.rank_share(batch, rank, 2)
        want = expected_batch_stats(batch["y"])
        got = record["batch_stats"]
        assert got.keys() == want.keys()
        assert all(close(got[k], v) for k, v in want.items()), (record["batch_idx"], got, want)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["async", "auto"])
def test_rank0_writes_records_that_match_one_process(tmp_path: Path, reference: list[dict[str, Any]], mode: str) -> None:
    """By default rank 0 alone writes, rank 1 starts no worker, and the records equal a single-process run's;
    built by rank 0's worker (async), or inline by rank 0 (auto: 2 ranks x 1 thread take 2 cores)."""
    out, results = run_example(tmp_path, "--mode", mode)
    assert sorted(p.name for p in out.iterdir()) == ["last_checkpoint.pt", "last_checkpoint.pt.ok", "run.json", "summary.json", "telemetry.jsonl"]
    assert results[1]["worker_pid"] is None
    assert results[1]["summary"]["records_written"] == 0 and results[1]["summary"]["clean"]
    inline = mode == "auto" and usable_cores() <= 2  # OMP_NUM_THREADS=1 (run_example)
    assert (results[0]["worker_pid"] is None) == inline
    assert {r["telemetry"]["built_by"] for r in read_records(out)} == {"trainer" if inline else "worker"}
    assert_all_written(results[0]["summary"])
    records = read_records(out)
    assert {(r["rank"], r["world_size"]) for r in records} == {(0, 2)}
    assert_same_training(records, reference)
    assert_batch_stats(records, rank=None)
    # the replica check: both ranks' weights compared at every collection, equal bit for bit
    assert all(r["replicas"] == {"compared": 2, "not_compared": 0, "max_rel_spread": 0.0, "diverged": []}
               for r in records), [r["replicas"] for r in records]
    from train_telemetry.analysis import load_run, render_report, report_data

    assert "replicas: 2 ranks that should hold the same weights compared, their weights equal at every collection" in (
        render_report(report_data(load_run(out))))
    run = read_json(out / "run.json")
    assert run is not None and (run["rank"], run["world_size"], run["global_batch_stats"]) == (0, 2, True)
    assert sorted(run["groups"]) == ["backbone", "head"]
    # The names the user's module has, not DDP's "module." ones.
    ckpt = torch.load(out / "last_checkpoint.pt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(name for name, _ in example.TinyNet().named_parameters())


@pytest.mark.timeout(150)
def test_per_rank_every_rank_writes_its_own_files(tmp_path: Path, reference: list[dict[str, Any]]) -> None:
    """With per_rank each rank writes telemetry.rank<r>.jsonl: identical gradient records, its own batch stats."""
    out, results = run_example(tmp_path, "--per-rank")
    assert sorted(p.name for p in out.iterdir()) == [
        "last_checkpoint.rank0.pt", "last_checkpoint.rank0.pt.ok", "last_checkpoint.rank1.pt",
        "last_checkpoint.rank1.pt.ok", "run.rank0.json", "run.rank1.json",
        "summary.rank0.json", "summary.rank1.json", "telemetry.rank0.jsonl", "telemetry.rank1.jsonl",
    ]
    per_rank = [read_records(out / f"telemetry.rank{r}.jsonl") for r in (0, 1)]
    for rank in (0, 1):
        assert results[rank]["worker_pid"] is not None
        assert_all_written(results[rank]["summary"])
        assert {(r["rank"], r["world_size"]) for r in per_rank[rank]} == {(rank, 2)}
        run = read_json(out / f"run.rank{rank}.json")
        assert run is not None and (run["rank"], run["global_batch_stats"]) == (rank, False)
        assert_same_training(per_rank[rank], reference)
        assert_batch_stats(per_rank[rank], rank=rank)
    # After the all-reduce both ranks hold the same gradients and weights, bit for bit.
    for a, b in zip(*per_rank, strict=True):
        assert (a["gradient_norm"], a["weight_delta"]) == (b["gradient_norm"], b["weight_delta"])


@pytest.mark.timeout(150)
def test_a_rank_whose_weights_drift_from_the_others_is_named(tmp_path: Path) -> None:
    """Rank 1 scales one weight matrix by 1.001 after step 4 (a rank-dependent bug: DDP never
    re-syncs weights, so from there the two ranks train different models). The records before
    show the two replicas equal; from the next collection on, both ranks are named, with the
    size of the difference, at no extra collective; the report calls it serious, naming the
    steps between which it happened."""
    out, results = run_example(tmp_path, "--diverge-rank", "1", "--diverge-at", "4")
    assert_all_written(results[0]["summary"])
    records = read_records(out)
    assert [r["batch_idx"] for r in records] == [0, 3, 6, 9]
    for r in records:
        check = r["replicas"]
        assert (check["compared"], check["not_compared"]) == (2, 0), check
        if r["batch_idx"] < 4:
            assert check["max_rel_spread"] == 0.0 and check["diverged"] == [], check
        else:
            assert check["diverged"] == [0, 1] and 1e-5 < check["max_rel_spread"] < 1e-2, check
    from train_telemetry.analysis import diagnose, load_run, render_report, report_data

    (found,) = [d for d in diagnose(load_run(out)) if d.code == "replica_divergence"]
    assert found.severity == "serious" and "ranks [0, 1]" in found.title and "between step 3 and step 6" in found.title
    text = render_report(report_data(load_run(out)))
    assert "replicas: 2 ranks that should hold the same weights compared, their weights differ" in text, text


@pytest.mark.timeout(150)
def test_gradient_accumulation_with_no_sync(tmp_path: Path, reference: list[dict[str, Any]]) -> None:
    """With two no_sync micro-batches per optimizer step the hook runs per optimizer step and still matches."""
    out, results = run_example(tmp_path, "--accum", "2")
    assert_all_written(results[0]["summary"])
    assert results[0]["summary"]["snapshots_taken"] == len(reference)
    records = read_records(out)
    assert_same_training(records, reference)
    assert_batch_stats(records, rank=None)


@pytest.mark.timeout(150)
def test_killed_worker_on_rank0_blocks_no_rank(tmp_path: Path) -> None:
    """SIGKILL of rank 0's worker mid-run: both ranks finish training, a new worker replays, nothing is lost."""
    out, results = run_example(tmp_path, "--steps", "30", "--collect-every-n", "2", "--kill-worker-at", "8")
    for rank in (0, 1):
        assert results[rank]["steps"] == 30
    s0, s1 = results[0]["summary"], results[1]["summary"]
    assert s0["worker_restarts"] == 1, s0
    assert s0["snapshots_taken"] + s0["snapshots_dropped"] == 15
    assert s0["hook_errors"] == 0 and s1["hook_errors"] == 0 and s1["clean"]
    records = read_records(out)  # whole lines only, each snapshot once
    assert len(records) == s0["records_written"] == s0["snapshots_taken"] == 15
    assert [r["batch_idx"] for r in records] == list(range(0, 30, 2))


@pytest.mark.timeout(150)
def test_uncountable_labels_on_one_rank_do_not_stall_the_ranks(
    tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    """Labels rank 1 cannot count still let it join the batch-stats collective: no deadlock, no class stats."""
    out, results = run_example(tmp_path, "--bad-labels-rank", "1")
    assert_all_written(results[0]["summary"])
    assert results[1]["summary"]["hook_errors"] == 0
    records = read_records(out)
    assert_same_training(records, reference)
    assert all(r["batch_stats"] == {"batch_size": example.GLOBAL_BATCH} for r in records)


@pytest.mark.timeout(60)
def test_start_before_init_process_group_takes_the_rank_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun with no process group yet, rank 1 (from $RANK) warns, starts no worker and writes nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "telemetry"
    model, optimizer, _ = example.build()
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), collect_every_n=1, input_keys=["x"], label_key="y"))
    with pytest.warns(RuntimeWarning, match=r"taking rank 1 from \$RANK"):
        telemetry.start(model, optimizer)
    telemetry.on_batch_end(model, optimizer, 0, batch=example.global_batch(0))
    summary = telemetry.stop()
    assert telemetry.worker_pid is None and summary.clean and summary.records_written == 0
    assert not out.exists()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("failing", [0, 1])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_a_start_that_fails_on_one_rank_fails_on_every_rank(tmp_path: Path, failing: int, wrapper: str) -> None:
    """start() failing on one rank only raises on every rank (DDP and FSDP2); a script that
    catches it trains to the end, and no shard file is left in /dev/shm."""
    before = {p for p in os.listdir("/dev/shm") if p.startswith("train-telemetry-")}
    flags = ["--fsdp", "full"] if wrapper == "fsdp2" else []
    out, results = run_example(tmp_path, "--fail-start-rank", str(failing), *flags)
    for rank in (0, 1):
        error = results[rank]["start_error"]
        assert error is not None, rank
        if rank == failing:
            assert "lacks the configured key(s) ['y']" in error
        else:
            assert f"failed on another rank (rank {failing}:" in error
        assert results[rank]["steps"] == 12
        pid = results[rank]["worker_pid"]  # rank 0 may have started one: it is gone
        assert pid is None or not Path(f"/proc/{pid}").exists()
    assert {p for p in os.listdir("/dev/shm") if p.startswith("train-telemetry-")} == before


@pytest.mark.timeout(150)
def test_the_overhead_budget_skips_collections_without_leaving_a_rank_in_the_collective(tmp_path: Path) -> None:
    """Over budget, rank 0 skips collections: after the label-count all_reduce, so rank 1 is never left in it."""
    out, results = run_example(tmp_path, "--steps", "60", "--collect-every-n", "1", "--overhead-budget", "0.0001",
                               "--step-sleep", "0.08")
    s0 = results[0]["summary"]
    assert results[0]["steps"] == results[1]["steps"] == 60
    assert s0["snapshots_skipped"] > 0, s0  # the budget kicked in
    assert s0["snapshots_taken"] + s0["snapshots_dropped"] == 60
    records = read_records(out)
    assert len(records) == s0["records_written"] == s0["snapshots_taken"]
    assert_batch_stats(records, rank=None)  # each record's counts are its own step's, summed over both ranks
