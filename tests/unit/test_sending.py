"""sending.py: what plain pickling cannot send reaches a real spawned worker, shared memory still shared."""

from __future__ import annotations

import json
import multiprocessing.spawn
import pickle
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from train_telemetry.sending import UnpicklableError, dumps_for_worker
from train_telemetry.worker_handle import without_main_rerun

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


@dataclass
class Payload:
    """Stands in for the lead's Setup message: a model and a forward_fn."""

    model: Any
    forward_fn: Any = None


# -- run in the spawned child (module level: the child imports this module by name) --------


def _watch_shared(payload: bytes, out: Any, written: Any) -> None:
    holder = pickle.loads(payload)
    out.put((type(holder).__name__, holder.total(), holder.t.is_shared()))
    if written.wait(30):
        out.put(holder.total())  # the parent wrote into the tensor after we loaded it


def _forward_in_child(payload: bytes, x: torch.Tensor, out: Any) -> None:
    try:
        sent = pickle.loads(payload)
        with torch.no_grad():
            # a list, not a tensor: a tensor would travel as a handle into this exiting process
            out.put(("ok", sent.forward_fn(sent.model, x).tolist()))
    except Exception as exc:  # the parent asserts on what went wrong
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out), daemon=True)
    proc.start()
    return proc, out


@pytest.mark.timeout(120)
def test_local_class_instance_shares_its_shared_memory_tensor_with_a_spawned_worker() -> None:
    """A locally defined class travels by value, and its shm tensor is the same memory in the child."""

    class Holder:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

        def total(self) -> float:
            return float(self.t.sum())

    t = torch.ones(1000).share_memory_()
    holder = Holder(t)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        pickle.dumps(holder)  # why it must go by value
    payload = dumps_for_worker(holder)
    ctx = mp.get_context("spawn")
    out, written = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_watch_shared, args=(payload, out, written), daemon=True)
    proc.start()
    try:
        assert out.get(timeout=60) == ("Holder", 1000.0, True)
        t.fill_(3.0)  # in place, after the child loaded it
        written.set()
        assert out.get(timeout=30) == 3000.0
    finally:
        proc.join(30)
    assert proc.exitcode == 0


@pytest.mark.timeout(120)
def test_local_module_and_lambda_forward_fn_run_in_a_spawned_worker() -> None:
    """A model class defined in a function and a lambda closing over a scale give the trainer's logits."""

    class LocalNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).relu()

    torch.manual_seed(0)
    model, scale = LocalNet(), 2.5
    payload = Payload(model, lambda m, x: m(x) * scale)
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = payload.forward_fn(model, x)
    proc, out = _spawn(_forward_in_child, dumps_for_worker(payload), x)
    try:
        status, got = out.get(timeout=60)
    finally:
        proc.join(30)
    assert status == "ok", got
    assert got == want.tolist()


def test_module_level_objects_still_go_by_reference() -> None:
    """What plain pickling can send is sent as plain pickling sends it (no cloudpickle involved)."""
    data = dumps_for_worker(Payload(nn.Linear(2, 2), torch.nn.functional.relu))
    assert b"cloudpickle" not in data
    assert isinstance(pickle.loads(data).model, nn.Linear)


@pytest.mark.timeout(180)
def test_main_module_classes_reach_a_worker_that_cannot_import_main(tmp_path: Path) -> None:
    """`python -c` (like a notebook) has no __main__ file: its classes go by value, plain pickling's fail."""
    script = textwrap.dedent(f"""
        import json, pickle, sys
        sys.path[:0] = [{str(HERE)!r}, {str(SRC)!r}]
        import torch
        import torch.multiprocessing as mp
        from multiprocessing.reduction import ForkingPickler
        from torch import nn
        from test_sending import Payload, _forward_in_child
        from train_telemetry.sending import dumps_for_worker

        class MainNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(x)

        def double(model, x):
            return model(x) * 2

        if __name__ == "__main__":
            torch.manual_seed(0)
            payload = Payload(MainNet(), double)
            x = torch.randn(3, 4)
            with torch.no_grad():
                want = double(payload.model, x)
            ctx = mp.get_context("spawn")
            results = {{}}
            for how, data in (("plain", bytes(ForkingPickler.dumps(payload))), ("ours", dumps_for_worker(payload))):
                out = ctx.Queue()
                proc = ctx.Process(target=_forward_in_child, args=(data, x, out), daemon=True)
                proc.start()
                status, got = out.get(timeout=60)
                proc.join(30)
                results[how] = [status, got if status == "error" else got == want.tolist()]
            print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["plain"][0] == "error" and "MainNet" in results["plain"][1]
    assert results["ours"] == ["ok", True]


class Logger:
    def __init__(self, stream: Any) -> None:
        self.stream = stream


def test_open_file_inside_the_model_is_named_by_its_attribute_path(tmp_path: Path) -> None:
    """A file held by the model's logger is reported as model.logger.stream, with pickle's reason."""
    model = nn.Sequential(nn.Linear(2, 2))
    with open(tmp_path / "log.txt", "w") as stream:
        model.logger = Logger(stream)
        with pytest.raises(UnpicklableError) as err:
            dumps_for_worker(Payload(model))
    assert isinstance(err.value, TypeError)
    assert str(err.value).startswith("model.logger.stream: cannot pickle '_io.TextIOWrapper' object")
    assert err.value.path == "model.logger.stream"


def test_lock_captured_by_forward_fn_is_named() -> None:
    """A lock in a lambda's closure is reported under forward_fn, after the model pickled fine."""
    lock = threading.Lock()

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with lock:
            return model(x)

    with pytest.raises(UnpicklableError, match=r"^forward_fn\.<closure lock>: cannot pickle '_thread\.lock' object$"):
        dumps_for_worker(Payload(nn.Linear(2, 2), forward))


def test_submodule_attribute_path_with_a_name_prefix() -> None:
    """Inside a submodule the path follows module names; `name` prefixes it."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model[1].guard = threading.Lock()
    with pytest.raises(UnpicklableError, match=r"^model\.1\.guard: cannot pickle '_thread\.lock' object$"):
        dumps_for_worker(model, name="model")


@pytest.mark.timeout(180)
def test_flat_script_classes_go_by_value_to_a_worker_that_does_not_rerun_the_script(tmp_path: Path) -> None:
    """A script's top-level class and function (no main guard) reach a child started as the worker is, and the script runs once."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, pickle, sys
        sys.path[:0] = [{str(HERE)!r}, {str(SRC)!r}]
        import torch
        import torch.multiprocessing as mp
        from multiprocessing.reduction import ForkingPickler
        from torch import nn
        from test_sending import Payload, _forward_in_child
        from train_telemetry.sending import dumps_for_worker
        from train_telemetry.worker_handle import without_main_rerun

        print("script ran", flush=True)  # twice if the child re-ran this file

        class FlatNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(x)

        def double(model, x):
            return model(x) * 2

        torch.manual_seed(0)
        payload = Payload(FlatNet(), double)
        x = torch.randn(3, 4)
        with torch.no_grad():
            want = double(payload.model, x)
        ctx = mp.get_context("spawn")
        results = {{}}
        for how, data in (("plain", bytes(ForkingPickler.dumps(payload))), ("ours", dumps_for_worker(payload))):
            out = ctx.Queue()
            # _forward_in_child still comes by name: the child keeps this script's sys.path
            proc = ctx.Process(target=_forward_in_child, args=(data, x, out), daemon=True)
            with without_main_rerun():
                proc.start()
            status, got = out.get(timeout=60)
            proc.join(30)
            results[how] = [status, got if status == "error" else got == want.tolist()]
        print(json.dumps(results))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("script ran") == 1, done.stdout
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["plain"][0] == "error" and "FlatNet" in results["plain"][1]
    assert results["ours"] == ["ok", True], results


def test_without_main_rerun_drops_the_main_script_for_its_own_thread_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the block this thread's preparation data names no main script, another thread's still does; after it, this one's does again."""
    main_keys = {"init_main_from_name", "init_main_from_path"}
    # A main script, as a trainer run from a file has (under pytest-xdist, __main__ is execnet's, which names none).
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", __file__, raising=False)

    def names_main() -> bool:
        return bool(main_keys & set(multiprocessing.spawn.get_preparation_data("probe")))

    assert names_main()  # pytest's own __main__: by module name or by file
    other: list[bool] = []
    with without_main_rerun():
        assert not names_main()
        thread = threading.Thread(target=lambda: other.append(names_main()))
        thread.start()
        thread.join(10)
    assert other == [True]
    assert names_main()
