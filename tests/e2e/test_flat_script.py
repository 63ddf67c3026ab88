"""A flat script with no ``if __name__ == "__main__":`` guard trains with the telemetry worker.

Each test runs a script of ``_trainer_scripts/flat_*.py`` (top-level code only, nanoGPT's
train.py style: its model class, forward_fn and metric defined at the top level) in a
subprocess. Under ``spawn`` and ``forkserver`` multiprocessing would run the script again
in the worker, as ``__mp_main__``: its start-up line printed twice, ``Telemetry.start()``
refused there, ``init_process_group`` called by a process that is no rank. The worker is
started without it (worker_handle.without_main_rerun) and gets the script's classes and
functions by value (sending.py), also where they live in ``__mp_main__`` (a trainer that
``torch.multiprocessing.spawn`` started).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from failure_checks import GLOO_TEARDOWN_ABORT, descendants, free_port, strict_lines

from train_telemetry.sinks import usable_cores

SCRIPTS = Path(__file__).parent / "_trainer_scripts"
RUN_TIMEOUT_S = 90  # a run takes ~5 s alone; a loaded 2-core machine may take many times that
STARTING = "flat script: starting"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to reap the process tree"),
]




def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to its end; on a hang kill its whole process tree and fail with its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[1:]} hung (killed after {RUN_TIMEOUT_S}s):\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def summary_line(stdout: str) -> dict[str, Any]:
    line = next(line for line in stdout.splitlines() if line.startswith("summary "))
    return dict(json.loads(line[len("summary "):]))


def assert_records_from_the_worker(records_file: Path, expected: int, user_metric: bool = True) -> None:
    """``expected`` whole records, each with its gradient norm, built by the worker."""
    records = strict_lines(records_file)
    assert len(records) == expected
    for rec in records:
        assert rec["gradient_norm"]["overall"] > 0, rec
        assert rec["telemetry"]["built_by"] == "worker", rec["telemetry"]
        assert len(rec["holdout_logits"]["logits"]) == 8  # the holdout ran in the worker
        assert "errors" not in rec, rec["errors"]
        if user_metric:  # the script's own Metric subclass ran in the worker
            assert rec["abs_weight_sum"]["total"] > 0, rec


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_flat_script_trains_with_the_worker_and_runs_once(tmp_path: Path, start_method: str) -> None:
    """mode async: the script runs once, and every record is built by the worker with its class, forward_fn and metric."""
    done = run([sys.executable, str(SCRIPTS / "flat_train.py"), str(tmp_path / "run"), "async", start_method],
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(STARTING) == 1, done.stdout
    summary = summary_line(done.stdout)
    assert summary["mode"] == "async" and summary["clean"], summary
    assert summary["records_written"] == summary["expected"]
    assert_records_from_the_worker(tmp_path / "run" / "telemetry.jsonl", summary["expected"])


@pytest.mark.timeout(120)
def test_flat_script_with_mode_auto(tmp_path: Path) -> None:
    """mode auto with one torch thread: the script runs once and every record is written, by the worker where a core is free."""
    done = run([sys.executable, str(SCRIPTS / "flat_train.py"), str(tmp_path / "run"), "auto", "spawn", "1"],
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(STARTING) == 1, done.stdout
    summary = summary_line(done.stdout)
    assert summary["clean"] and summary["records_written"] == summary["expected"], summary
    if usable_cores() >= 2:  # one training thread leaves the worker a core: auto keeps it
        assert summary["mode"] == "async", summary
    records = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert len(records) == summary["expected"]
    want = "worker" if summary["mode"] == "async" else "trainer"
    assert {rec["telemetry"]["built_by"] for rec in records} == {want}
    assert all(rec["gradient_norm"]["overall"] > 0 and rec["abs_weight_sum"]["total"] > 0 for rec in records)


@pytest.mark.timeout(120)
def test_script_classes_reach_the_worker_of_a_trainer_started_by_mp_spawn(tmp_path: Path) -> None:
    """torch.multiprocessing.spawn's trainer has the script's classes as __mp_main__: the worker gets them and never runs the script."""
    done = run([sys.executable, str(SCRIPTS / "flat_mp_spawn.py"), str(tmp_path / "run")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    # Once in the launcher, once in the trainer mp.spawn started (multiprocessing's re-run,
    # which the script's main guard is for); a third would be our worker's.
    assert done.stdout.count(STARTING) == 2, done.stdout
    summary = summary_line(done.stdout)
    assert summary["mode"] == "async" and summary["clean"], summary
    assert summary["records_written"] == summary["expected"]
    assert_records_from_the_worker(tmp_path / "run" / "telemetry.jsonl", summary["expected"])




@pytest.mark.timeout(120)
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_flat_ddp_script_under_torchrun_never_inits_a_process_group_in_the_worker(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks, init_process_group at the top level: each rank starts once and rank 0's worker writes every record."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(SCRIPTS / "flat_ddp.py"), str(tmp_path / "run")]
    done = run(cmd, cwd=tmp_path, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    # Searched in the whole stream, not by line: torchrun may interleave the two ranks' output.
    summaries = {int(rank): json.loads(found) for rank, found in re.findall(r"summary rank (\d) (\{[^{}]*\})", done.stdout)}
    if done.returncode != 0 and len(summaries) == 2 and GLOO_TEARDOWN_ABORT in done.stdout + done.stderr:
        pass  # both ranks finished; one aborted in gloo's teardown (pytorch/pytorch#190489), not ours
    else:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        assert done.stdout.count(f"flat ddp: starting rank {rank}") == 1, done.stdout
    assert summaries[0]["mode"] == "async" and summaries[0]["worker_pid"] is not None, summaries
    assert summaries[1]["worker_pid"] is None  # only rank 0 runs a worker
    assert summaries[0]["records_written"] == summaries[0]["expected"]
    assert_records_from_the_worker(tmp_path / "run" / "telemetry.jsonl", summaries[0]["expected"], user_metric=False)
