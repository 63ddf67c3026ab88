"""Faults on the worker side, bad input and a bad disk: training goes on, nothing is lost silently.

Each test runs a real tiny training loop in this process with the real worker (spawned)
and asserts what a user sees: the records file, the summary, warnings, the worker's pid,
wall time with generous bounds. See failure modes F1, F3, F4, F12, F13, F14, F15, F17,
F18, F25 in the research notes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from failure_checks import line_count, pid_alive, strict_lines, wait_for
from torch import nn

from train_telemetry import (
    Telemetry,
    TelemetryConfig,
    TelemetryConfigError,
    TelemetryStartError,
    read_records,
)
from train_telemetry.config import MOVED_TO_TUNING, Tuning
from train_telemetry.demo import SiameseNet

# ---------------------------------------------------------------------------- helpers


def make_batch(g: torch.Generator, n: int = 8) -> dict[str, torch.Tensor]:
    return {
        "img1": torch.randn(n, 1, 8, 8, generator=g),
        "img2": torch.randn(n, 1, 8, 8, generator=g),
        "winner": torch.randint(0, 2, (n,), generator=g),
    }


class Run:
    """A tiny model, its optimizer and a stream of batches; ``step()`` trains and calls the hook."""

    def __init__(self, telemetry: Telemetry, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.model = SiameseNet(width=4, embed=8)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.telemetry = telemetry
        self.step_idx = 0
        self.hook_seconds: list[float] = []
        telemetry.set_holdout_data(make_batch(self.g, 16))

    def start(self) -> Run:
        self.telemetry.start(self.model, self.opt)
        return self

    def step(self, n: int = 1, outputs_override: torch.Tensor | None = None, pause: float = 0.0) -> None:
        for _ in range(n):
            time.sleep(pause)  # a slower "training step", so that slots free up between hooks
            batch = make_batch(self.g)
            out = self.model(batch["img1"], batch["img2"])
            loss = nn.functional.cross_entropy(out, batch["winner"])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            t0 = time.monotonic()
            self.telemetry.on_batch_end(
                self.model, self.opt, self.step_idx, 0, None, batch, loss=loss,
                outputs=out if outputs_override is None else outputs_override,
            )
            self.hook_seconds.append(time.monotonic() - t0)
            self.step_idx += 1


def child_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited and can be reaped (it is left unreaped for its parent).

    Not /proc's Z state: a thread-group leader shows Z while its other threads still exit.
    """
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already (the collector joins a dead worker for its exit code)
        return True


@contextlib.contextmanager
def no_core_dumps() -> Iterator[None]:
    """Children started inside inherit RLIMIT_CORE=0, so a crashed worker leaves no core file."""
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old)


def config(tmp_path: Path, **overrides: Any) -> TelemetryConfig:
    """Collect at every step; block rather than drop, so that the counts are deterministic.

    worker_nice 0 and long deadlines: on a loaded machine a niced worker can be starved.
    mode async: the worker is what these tests break (auto builds inline on a busy CPU).
    """
    tuning = {"block_timeout_s": 30.0, "worker_nice": 0}
    tuning.update({k: overrides.pop(k) for k in list(overrides) if k in MOVED_TO_TUNING})
    base: dict[str, Any] = {"output_dir": str(tmp_path / "run"), "collect_every_n": 1, "stop_timeout_s": 30.0, "mode": "async",
                            "on_full": "block", "tuning": Tuning(**tuning)}
    base.update(overrides)
    return TelemetryConfig(**base)


# Holdout forward functions: module level, so the spawned worker can unpickle them.


class HoldoutBoom(Exception):
    """The user's own exception type, to check that records keep the original type."""


_flaky_calls = 0


def flaky_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Works for the start-up check and the first record's eval, then always fails."""
    global _flaky_calls
    _flaky_calls += 1
    if _flaky_calls > 2:
        raise HoldoutBoom("the holdout forward exploded")
    return model(batch["img1"], batch["img2"])  # type: ignore[no-any-return]


SLOW_EVAL_S = 0.5


def slow_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A holdout forward far slower than a training step: the worker falls behind."""
    time.sleep(SLOW_EVAL_S)
    return model(batch["img1"], batch["img2"])  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- worker death


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_worker_killed_mid_run_training_goes_on_and_stop_reports_it(tmp_path: Path, sig: signal.Signals) -> None:
    """A worker killed mid-run costs later records only: no hook blocks, one warning names pid and signal, stop() reports it."""
    with no_core_dumps():
        run = Run(Telemetry(config(tmp_path, stop_timeout_s=5.0, max_worker_restarts=0))).start()
    pid = run.telemetry.worker_pid
    assert pid is not None
    records = tmp_path / "run" / "telemetry.jsonl"
    run.step(5)
    wait_for(lambda: line_count(records) >= 3, 30, "the first records")
    os.kill(pid, sig)
    wait_for(lambda: child_exited(pid), 10, "the worker to die")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.step(20)
    assert max(run.hook_seconds[5:]) < 1.0, "a hook call blocked on the dead worker"
    dead = [str(w.message) for w in caught if "exited unexpectedly" in str(w.message)]
    assert len(dead) == 1, [str(w.message) for w in caught]
    assert f"pid {pid}" in dead[0] and sig.name in dead[0]

    t0 = time.monotonic()
    summary = run.telemetry.stop()
    assert time.monotonic() - t0 < 5.0
    assert summary.worker_exit_signal == sig.name
    assert summary.clean is False
    assert summary.snapshots_dropped == 20
    assert any(sig.name in e for e in summary.last_errors)
    lines = strict_lines(records)  # whole lines only, even though the worker died mid-run
    assert summary.records_written == len(lines) >= 3
    assert [r["seq"] for r in lines] == list(range(len(lines)))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["worker_exit_signal"] == sig.name


@pytest.mark.timeout(60)
def test_worker_hung_training_drops_and_stop_terminates_and_reaps_it(tmp_path: Path) -> None:
    """A stopped (hung) worker: hooks never wait, drops are counted, stop() meets its deadline then kills and reaps it."""
    run = Run(Telemetry(config(tmp_path, num_slots=2, on_full="drop"))).start()
    pid = run.telemetry.worker_pid
    assert pid is not None
    records = tmp_path / "run" / "telemetry.jsonl"
    run.step(2)
    wait_for(lambda: line_count(records) >= 2, 30, "the first records")
    os.kill(pid, signal.SIGSTOP)
    try:
        run.step(30)
        assert max(run.hook_seconds[2:]) < 1.0, "a hook call waited on the hung worker"
        t0 = time.monotonic()
        summary = run.telemetry.stop(timeout=1.0)
        elapsed = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    # 1 s deadline + SIGTERM grace + SIGKILL: TERM_GRACE_S is 2 s; generous for a loaded box.
    assert elapsed < 1.0 + 2 * 2.0 + 3.0
    assert summary.worker_terminated is True
    assert not Path(f"/proc/{pid}").exists(), "the worker was not reaped"
    # Both slots were taken by snapshots the stopped worker never processed; the rest dropped.
    assert summary.snapshots_dropped >= 30 - 2
    assert summary.snapshots_taken + summary.snapshots_dropped == 32
    assert summary.clean is False
    assert len(strict_lines(records)) == summary.records_written >= 2


@pytest.mark.timeout(60)
def test_worker_started_from_a_thread_outlives_that_thread(tmp_path: Path) -> None:
    """start() from a short-lived thread: the worker keeps running after that thread ends (PDEATHSIG follows threads)."""
    run = Run(Telemetry(config(tmp_path)))
    starter = threading.Thread(target=run.start)
    starter.start()
    starter.join()
    run.step(3)
    summary = run.telemetry.stop()
    assert summary.records_written == summary.snapshots_taken == 3, summary
    assert summary.clean and summary.worker_exitcode == 0


# ---------------------------------------------------------------------------- errors in metrics


@pytest.mark.timeout(60)
def test_exception_in_holdout_eval_is_recorded_per_record_and_logged_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A failing holdout forward or metric costs that field only: errors keep the original type and message, logged once."""
    run = Run(Telemetry(config(tmp_path, eval_batch_size=256), forward_fn=flaky_forward)).start()
    run.step(6)
    run.step(1, outputs_override=torch.zeros(3, 2))  # a train-accuracy metric that cannot work
    summary = run.telemetry.stop()
    records = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert len(records) == 7 == summary.records_written  # no record lost to the failures
    assert "holdout_logits" in records[0] and "errors" not in records[0]
    for r in records[1:]:
        assert "holdout_logits" not in r
        assert {"where": "holdout_logits", "type": "HoldoutBoom", "message": "the holdout forward exploded"} in r["errors"]
        # the record's other metrics are still there
        assert r["gradient_norm"]["overall"] > 0
        assert r["weight_delta"]["overall"] > 0
        assert r["learning_rates"]["group_0"] == pytest.approx(0.01)
    accuracy_errors = [e for e in records[-1]["errors"] if e["where"] == "train_accuracy"]
    assert len(accuracy_errors) == 1 and accuracy_errors[0]["type"] == "RuntimeError"
    assert summary.errors == {"holdout_logits: HoldoutBoom": 6, "train_accuracy: RuntimeError": 1}
    err = capfd.readouterr().err
    assert err.count("holdout_logits failed (HoldoutBoom") == 1, err


class OptimizerWithoutLR(torch.optim.SGD):
    """An optimizer whose param groups have no 'lr' (as some custom optimizers do)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.01)
        for group in self.param_groups:
            del group["lr"]


@pytest.mark.timeout(60)
def test_hook_side_failures_cost_a_field_or_a_record_never_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A metric failing in the hook is recorded in that record's errors; a failed collection frees its slot, so later ones work."""
    import train_telemetry.collect as telemetry_module

    telemetry = Telemetry(config(tmp_path, mode="sync"))
    run = Run(telemetry)
    run.start()
    batch = make_batch(run.g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 1) fields that cannot be computed: no LR in the groups, a batch that is no batch
        #    (a tuple is one now: batches.py recognises (x1, x2, y))
        telemetry.on_batch_end(run.model, OptimizerWithoutLR(run.model.parameters()), 0, 0, None, batch)
        telemetry.on_batch_end(run.model, run.opt, 1, 0, None, "not a batch")
        # 2) a collection that fails after taking its slot (sync mode has a single slot)
        real = telemetry_module.grad_norms
        monkeypatch.setattr(telemetry_module, "grad_norms", lambda params, stack, groups=None: 1 / 0)
        for step in range(2, 5):
            telemetry.on_batch_end(run.model, run.opt, step, 0, None, batch)
        monkeypatch.setattr(telemetry_module, "grad_norms", real)
        for step in range(5, 8):
            telemetry.on_batch_end(run.model, run.opt, step, 0, None, batch)
    summary = telemetry.stop()
    records = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert [r["batch_idx"] for r in records] == [0, 1, 5, 6, 7]
    assert summary.hook_errors == 3 and summary.snapshots_dropped == 0
    lr_error = records[0]["errors"][0]
    assert (lr_error["where"], lr_error["type"]) == ("learning_rates", "KeyError")
    assert "learning_rates" not in records[0] and records[0]["weight_norm"]["overall"] > 0
    assert [e["where"] for e in records[1]["errors"]] == ["batch_stats"]
    assert "cannot read a batch that is a str" in records[1]["errors"][0]["message"]
    assert records[1]["weight_delta"]["overall"] is not None
    assert all("errors" not in r for r in records[2:])
    failed = [str(w.message) for w in caught if "collection failed" in str(w.message)]
    assert len(failed) == 1 and "ZeroDivisionError" in failed[0]  # one warning for 3 failures


# ---------------------------------------------------------------------------- backpressure


@pytest.mark.timeout(60)
def test_slow_worker_with_on_full_drop_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    """on_full: drop with a worker slower than training: hooks never wait; drops are counted in records and summary."""
    run = Run(Telemetry(config(tmp_path, on_full="drop", num_slots=2), forward_fn=slow_forward)).start()
    run.step(30, pause=0.05)
    assert max(run.hook_seconds) < 0.8 * SLOW_EVAL_S, "a hook call waited for a slot under on_full: drop"
    summary = run.telemetry.stop()
    records = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert summary.snapshots_dropped > 0
    assert summary.snapshots_taken + summary.snapshots_dropped == 30
    assert len(records) == summary.records_written == summary.snapshots_taken
    assert [r["seq"] for r in records] == list(range(len(records)))
    # Each record says how many were dropped since the one before it.
    recorded = sum(r["telemetry"]["dropped_before"] for r in records)
    assert recorded == records[-1]["telemetry"]["dropped_total"] <= summary.snapshots_dropped
    assert recorded > 0


@pytest.mark.timeout(60)
def test_slow_worker_with_on_full_block_waits_and_loses_nothing(tmp_path: Path) -> None:
    """on_full: block with a slow worker: the hook waits for a slot and every snapshot is written."""
    run = Run(Telemetry(config(tmp_path, on_full="block", num_slots=2), forward_fn=slow_forward)).start()
    batch = make_batch(run.g)
    t0 = time.monotonic()
    for step in range(6):  # back to back: far faster than the worker's 0.5 s per snapshot
        run.telemetry.on_batch_end(run.model, run.opt, step, 0, None, batch)
    hooks_seconds = time.monotonic() - t0
    summary = run.telemetry.stop()
    assert summary.snapshots_dropped == 0
    assert summary.records_written == summary.snapshots_taken == 6
    assert len(strict_lines(tmp_path / "run" / "telemetry.jsonl")) == 6
    # The 6th hook needs the slot of the 4th snapshot: 4 evaluations of SLOW_EVAL_S each.
    assert hooks_seconds > 0.75 * 4 * SLOW_EVAL_S, "the hooks did not wait for the slow worker"


# ---------------------------------------------------------------------------- non-finite values


@pytest.mark.timeout(60)
def test_nan_and_inf_in_gradients_and_weights_are_recorded_and_flagged(tmp_path: Path) -> None:
    """NaN/Inf gradients and weights are written as strict-JSON markers and flagged; the worker goes on."""
    run = Run(Telemetry(config(tmp_path))).start()
    run.step(2)
    model, opt = run.model, run.opt
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    head_weight = model.head[0].weight
    assert head_weight.grad is not None
    with torch.no_grad():
        head_weight.grad[0, 0] = float("nan")
        model.backbone.features[0].weight.grad[0, 0, 0, 0] = float("inf")  # type: ignore[index]
        head_weight[0, 0] = float("inf")
    run.telemetry.on_batch_end(model, opt, 100, 0, None, make_batch(run.g))
    model.load_state_dict(saved)
    run.step_idx = 101
    run.step(2)
    summary = run.telemetry.stop()
    path = tmp_path / "run" / "telemetry.jsonl"
    lines = strict_lines(path)  # strict JSON: no NaN/Infinity literals
    assert len(lines) == 5 == summary.records_written
    assert summary.clean and summary.errors == {}
    bad = next(r for r in lines if r["batch_idx"] == 100)
    assert bad["gradient_norm"]["overall"] == "NaN"
    assert bad["weight_norm"]["overall"] == "Infinity"
    assert {"gradient_norm.overall", "weight_norm.overall", "holdout_logits.loss"} <= set(bad["nonfinite"])
    restored = read_records(path)  # the reader turns the markers back into floats
    assert torch.isnan(torch.tensor(restored[2]["gradient_norm"]["overall"]))
    assert "nonfinite" not in lines[-1]


# ---------------------------------------------------------------------------- disk


@pytest.mark.timeout(30)
def test_missing_parents_of_output_dir_are_created(tmp_path: Path) -> None:
    """An output_dir under folders not yet created (the seed's run_dir / 'telemetry') is created with its parents."""
    out = tmp_path / "no" / "such" / "run"
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out), mode="sync"))
    telemetry.start(SiameseNet(width=4, embed=8))
    telemetry.stop()
    assert (out / "run.json").is_file()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["parent_is_a_file", "read_only_dir"])
def test_unwritable_output_dir_fails_at_start(tmp_path: Path, case: str) -> None:
    """An output_dir that cannot be written fails at start(), before any worker, with a clear error."""
    if case == "parent_is_a_file":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    telemetry = Telemetry(TelemetryConfig(output_dir=str(out)))
    with pytest.raises(TelemetryConfigError, match="is not writable"):
        telemetry.start(SiameseNet(width=4, embed=8))
    assert telemetry.worker_pid is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_disk_full_mid_run_degrades_without_raising(tmp_path: Path, mode: str) -> None:
    """ENOSPC on every record write: training completes, nothing raises, the losses are counted and reported."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "telemetry.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    run = Run(Telemetry(config(tmp_path, mode=mode))).start()
    run.step(5)
    summary = run.telemetry.stop()
    assert summary.records_written == 0
    assert summary.snapshots_taken == 5 and summary.hook_errors == 0
    assert summary.io_errors >= 5
    assert summary.clean is False
    assert any("No space left on device" in e for e in summary.last_errors), summary.last_errors
    assert json.loads((out / "summary.json").read_text())["io_errors"] == summary.io_errors


@pytest.mark.timeout(60)
def test_disk_filling_up_mid_run_leaves_only_whole_lines(tmp_path: Path) -> None:
    """A disk that fills up mid-run: records written before stay, a half-written one is removed, the rest are counted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cfg = config(mnt, mode="sync", track_weight_delta=False, track_holdout_logits=False, fsync=False)
        run = Run(Telemetry(cfg)).start()
        ballast = mnt / "run" / "ballast"
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        ballast.write_bytes(b"x" * max(0, free - 8192))  # leave room for a few records only
        run.step(40)
        summary = run.telemetry.stop()
        lines = strict_lines(mnt / "run" / "telemetry.jsonl")
        assert 0 < len(lines) == summary.records_written < 40
        assert summary.io_errors >= 40 - len(lines)
        assert summary.hook_errors == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_disk_full_for_a_while_loses_nothing(tmp_path: Path, mode: str) -> None:
    """ENOSPC for a few seconds mid-run: records wait in memory and are written, in order, once space returns."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cfg = config(mnt, mode=mode, track_weight_delta=False, track_holdout_logits=False, fsync=False)
        run = Run(Telemetry(cfg)).start()
        records = mnt / "run" / "telemetry.jsonl"
        run.step(3)
        wait_for(lambda: line_count(records) >= 3, 30, "the first records")
        ballast = mnt / "run" / "ballast"
        with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):  # fill the disk to the last byte
            while True:
                f.write(b"x" * 4096)
        run.step(10, pause=0.2)  # two seconds of a full disk
        assert line_count(records) < 13
        ballast.unlink()  # space returns
        run.step(3)
        summary = run.telemetry.stop()
        lines = strict_lines(records)
        assert [r["seq"] for r in lines] == list(range(16))
        assert summary.records_written == summary.snapshots_taken == 16 and summary.io_errors > 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(60)
def test_torn_last_line_is_skipped_by_the_reader_and_repaired_on_restart(tmp_path: Path) -> None:
    """A crash mid-write leaves a torn last line: read_records skips it and the next run truncates it before appending."""
    cfg = config(tmp_path, mode="sync")
    first = Run(Telemetry(cfg)).start()
    first.step(3)
    first.telemetry.stop()
    path = tmp_path / "run" / "telemetry.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[-1][:40])  # half a record, no newline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn tail is expected after a crash: no warning
        assert [r["seq"] for r in read_records(path)] == [0, 1, 2]
    second = Run(Telemetry(cfg), seed=1).start()
    second.step(2)
    second.telemetry.stop()
    lines = strict_lines(path)
    assert path.read_bytes().startswith(whole)
    # The second run resumes into the same directory: a new segment, seq counting on.
    assert [(r.get("segment", 0), r["seq"]) for r in lines] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]


# ---------------------------------------------------------------------------- start-up problems


class _Logger:
    """Holds an open file: what no pickler can send, by reference or by value."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["model", "forward_fn"])
def test_unpicklable_model_or_forward_fn_fails_at_start_with_the_fix(tmp_path: Path, what: str) -> None:
    """Under spawn, a model or forward_fn holding what cannot be pickled fails start() naming the attribute, and no worker is left."""
    lock = threading.Lock()

    def forward_with_lock(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        with lock:
            return m(b["img1"], b["img2"])

    forward_fn = forward_with_lock if what == "forward_fn" else None
    telemetry = Telemetry(config(tmp_path), forward_fn=forward_fn)
    g = torch.Generator().manual_seed(0)
    telemetry.set_holdout_data(make_batch(g, 16))
    model = SiameseNet(width=4, embed=8)
    if what == "model":
        model.logger = _Logger(open(tmp_path / "log.txt", "w"))  # type: ignore[assignment]  # noqa: SIM115
    pattern = r"model\.logger\.stream: cannot pickle '_io\.TextIOWrapper'" if what == "model" else r"cannot pickle '_thread\.lock'"
    with pytest.raises(TelemetryStartError, match=pattern):
        telemetry.start(model, torch.optim.SGD(model.parameters(), lr=0.1))
    pid = telemetry.worker_pid
    assert pid is None or not pid_alive(pid)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("missing", ["img2", "winner"])
def test_holdout_missing_a_configured_key_fails_at_start(tmp_path: Path, missing: str) -> None:
    """A holdout batch without an input_keys or label_key entry fails start(), before any worker, naming key and fix."""
    telemetry = Telemetry(config(tmp_path))
    batch = make_batch(torch.Generator().manual_seed(0), 16)
    del batch[missing]
    telemetry.set_holdout_data(batch)
    with pytest.raises(TelemetryConfigError, match=rf"lack key\(s\) \['{missing}'\].*set input_keys/label_key"):
        telemetry.start(SiameseNet(width=4, embed=8))
    assert telemetry.worker_pid is None


@pytest.mark.timeout(60)
def test_too_little_shared_memory_fails_at_start_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slots that do not fit in /dev/shm fail start() with the sizes and the fix, not SIGBUS mid-training."""
    import train_telemetry.snapshot as snapshot

    monkeypatch.setattr(snapshot, "_shm_free_bytes", lambda: 1024)
    telemetry = Telemetry(config(tmp_path))
    with pytest.raises(TelemetryConfigError, match=r"shared memory.*lower num_slots.*--shm-size"):
        telemetry.start(SiameseNet(width=4, embed=8))
    pid = telemetry.worker_pid
    assert pid is None or not pid_alive(pid)


# ---------------------------------------------------------------------------- nothing lost


@pytest.mark.timeout(120)
def test_a_killed_worker_is_replaced_and_replays_what_it_held(tmp_path: Path) -> None:
    """SIGKILL mid-run with on_full block: a new worker replays; records == snapshots taken, no gap, no duplicate."""
    with no_core_dumps():
        run = Run(Telemetry(config(tmp_path))).start()
    records = tmp_path / "run" / "telemetry.jsonl"
    for kill in range(2):
        run.step(6)
        wait_for(lambda k=kill: line_count(records) >= 3 + 6 * k, 30, "records before the kill")
        pid = run.telemetry.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.step(2)  # snapshots taken while the new worker starts wait in their slots
    run.step(4)
    summary = run.telemetry.stop()
    lines = strict_lines(records)  # json.loads of every line
    assert summary.worker_restarts == 2 and summary.snapshots_dropped == 0
    assert summary.records_written == summary.snapshots_taken == len(lines) == 20
    assert [r["seq"] for r in lines] == list(range(20))
    assert max(r.get("restarts", 0) for r in lines) == 2


@pytest.mark.timeout(120)
def test_restarts_stop_at_the_bound_and_the_run_goes_on(tmp_path: Path) -> None:
    """After max_worker_restarts replacements the next death ends telemetry; training and stop() still work."""
    with no_core_dumps():
        run = Run(Telemetry(config(tmp_path, max_worker_restarts=1, stop_timeout_s=5.0))).start()
    records = tmp_path / "run" / "telemetry.jsonl"
    run.step(3)
    wait_for(lambda: line_count(records) >= 3, 30, "the first records")
    first = run.telemetry.worker_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: run.telemetry.worker_pid not in (None, first), 60, "the replacement")
    run.step(3)
    wait_for(lambda: line_count(records) >= 6, 30, "records from the replacement")
    second = run.telemetry.worker_pid
    assert second is not None
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: child_exited(second), 10, "the second worker to die")
    time.sleep(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.step(5)
    assert max(run.hook_seconds[6:]) < 1.0
    summary = run.telemetry.stop()
    assert summary.worker_restarts == 1 and summary.snapshots_dropped == 5 and not summary.clean
    assert len(strict_lines(records)) == summary.records_written == 6


@pytest.mark.timeout(180)
def test_a_snapshot_that_kills_workers_is_recorded_as_a_crash_after_two(tmp_path: Path) -> None:
    """A metric that kills the worker on one snapshot: after two deaths that snapshot becomes an error record; the rest go on."""
    with no_core_dumps():
        telemetry = Telemetry(config(tmp_path, stop_timeout_s=30.0), metrics=[_module_crash_metric(3)])
        run = Run(telemetry).start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.step(6)
        summary = telemetry.stop()
    lines = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert [r["seq"] for r in lines] == list(range(6))
    crash = lines[3]
    assert [e["type"] for e in crash["errors"]] == ["WorkerCrash"] and "2 workers died" in crash["errors"][0]["message"]
    assert "crash_loop" not in crash and all(r["crash_loop"]["seen"] == r["seq"] for r in lines if r["seq"] != 3)
    assert summary.worker_restarts == 2 and summary.records_written == 6


def _module_crash_metric(seq: int) -> Any:
    from train_telemetry import metric

    return metric(key="crash_loop", needs={"loss"})(_CrashAt(seq))


class _CrashAt:
    """Module level (picklable by reference): SIGKILLs its own process at snapshot ``seq``."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def __call__(self, snap: Any) -> dict[str, float]:
        if snap.seq == self.seq:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"seen": float(snap.seq)}


@pytest.mark.timeout(120)
def test_a_reference_torn_by_a_kill_is_never_measured_against(tmp_path: Path) -> None:
    """A worker killed in the middle of rewriting last_checkpoint.pt: the next delta is null with the reason, then exact again."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SiameseNet(width=4, embed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    telemetry = Telemetry(config(tmp_path))
    telemetry.start(model, opt)
    weights = []
    ckpt = tmp_path / "run" / "last_checkpoint.pt"

    def step(i: int) -> None:
        b = make_batch(g)
        loss = nn.functional.cross_entropy(model(b["img1"], b["img2"]), b["winner"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        telemetry.on_batch_end(model, opt, i, 0, None, b)
        weights.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))

    for i in range(3):
        step(i)
    wait_for(lambda: line_count(tmp_path / "run" / "telemetry.jsonl") >= 3, 30, "the first records")
    pid = telemetry.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    # What a kill halfway through the in-place rewrite leaves: no marker, half the bytes new.
    (tmp_path / "run" / "last_checkpoint.pt.ok").unlink()
    with open(ckpt, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 3)
        f.write(bytes(size // 3))
    os.kill(pid, signal.SIGKILL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(3, 6):
            step(i)
    telemetry.stop()
    lines = strict_lines(tmp_path / "run" / "telemetry.jsonl")
    assert [r["seq"] for r in lines] == list(range(6))
    assert lines[3]["weight_delta"]["overall"] is None
    assert [e["type"] for e in lines[3]["errors"]] == ["ReferenceTorn"]
    for i in (4, 5):
        want = float(torch.linalg.vector_norm(weights[i] - weights[i - 1]))
        assert math.isclose(lines[i]["weight_delta"]["overall"], want, rel_tol=1e-5), i
