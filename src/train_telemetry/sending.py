"""Sending the model and forward_fn to the worker: by reference where it can, by value where it must.

Runs in: the training process (``dumps_for_worker``, at ``start()``). The bytes are read
in the worker process by plain ``pickle.loads``; cloudpickle must be importable there
(it is a core dependency).

Under ``spawn`` the worker is a fresh interpreter. Standard pickling sends a class or a
function as a name to import there, which fails for classes defined in a function, for
lambdas and closures, and for everything the trainer's ``__main__`` defines: the worker
is started without running the trainer's main script (worker_handle.without_main_rerun,
so that a script with no ``if __name__ == "__main__":`` guard is not trained a second
time), and a notebook or ``python -c`` has no script to run anyway. So:

1. :class:`multiprocessing.reduction.ForkingPickler` first, the pickler torch extends so
   a tensor in shared memory travels as a handle to the same memory, not as its bytes.
   It is refused (and step 2 taken) when it would name a class or function of
   ``__main__`` (or of ``__mp_main__``, its name in a trainer that is itself a spawned
   child): plain pickling would succeed here and fail in the worker. Under ``fork`` the
   worker would have them in memory; they go by value all the same.
2. Otherwise cloudpickle, which sends those classes and functions by value (a script's
   model class, forward_fn and metrics among them), with ForkingPickler's reducers
   kept: shared-memory tensors are still sent as handles. What the script imports from
   its other modules (``from model import GPT``) still goes by name: the worker keeps the
   trainer's ``sys.path`` and working directory.
3. What neither can send (an open file, a lock) raises :class:`UnpicklableError`, naming
   the attribute that holds it (``model.logger.stream: cannot pickle '_io.TextIOWrapper'
   object``), found by pickling the object's parts one by one with a pickler that shares
   no memory (it never sends the bytes it makes).
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Iterator, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reducers on ForkingPickler)

__all__ = ["UnpicklableError", "dumps_for_worker"]

# The names the trainer's main script has: "__main__", or "__mp_main__" where the trainer
# is itself a spawned child (torch.multiprocessing.spawn(train, ...)): multiprocessing ran
# the launcher script again there under that name, and its classes carry it.
_MAIN_MODULES = ("__main__", "__mp_main__")
_REGISTRY_LOCK = threading.RLock()  # cloudpickle's by-value registry is process-wide

# The live table ForkingPickler.register fills (torch's tensor, storage and event reducers
# among them); private in the stubs, stable in CPython since 3.4.
_FORKING_REDUCERS: dict[type, Any] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]


class UnpicklableError(TypeError):
    """Part of what goes to the worker cannot be pickled, even by value; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def dumps_for_worker(obj: Any, *, name: str = "") -> bytes:
    """Bytes that ``pickle.loads`` turns back into ``obj`` in the worker (see the module docstring).

    ``name`` prefixes the attribute path of an :class:`UnpicklableError` (``""``: the path
    starts at ``obj``'s attributes, e.g. ``model.logger.stream`` for a setup message).
    Costs two pickling passes when the first is refused; a refused first pass may already
    have moved CPU tensors into shared memory, as pickling them for the worker does anyway.
    """
    try:
        return _dump(_ReferencePickler, obj)
    except Exception:
        pass  # by value below; if that fails too, its error is the one to report
    try:
        return _dump(_ValuePickler, obj)
    except Exception as exc:
        raise locate_unpicklable(obj, name, exc) from exc


def _dump(pickler: type[pickle.Pickler], obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class _NeedsValue(pickle.PicklingError):
    """Plain pickling would name a main-script object, which the worker cannot import."""


class _ReferencePickler(ForkingPickler):
    """ForkingPickler that refuses to send the main script's classes and functions by name."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for every non-atomic object: keep it to an attribute read for the rest.
        if getattr(obj, "__module__", None) in _MAIN_MODULES and isinstance(obj, (type, types.FunctionType)):
            raise _NeedsValue(f"{obj.__qualname__} lives in {obj.__module__}, which the worker does not run")
        return NotImplemented


class _ValuePickler(cloudpickle.Pickler):
    """cloudpickle, plus ForkingPickler's reducers: shared-memory tensors go as handles.

    cloudpickle itself sends ``__main__``'s classes and functions by value, and whatever
    they reference from ``__main__`` with them; ``__mp_main__`` it would send by name, so
    ``dump`` registers it by value for the time of the dump (:func:`_spawned_main_by_value`).
    """

    # Tensors and storages are never classes or functions, so cloudpickle's reducer_override
    # passes them on to this table, where torch's reducers come first. A class attribute:
    # the C pickler reads dispatch_table once, at __init__, and cloudpickle's class attribute
    # shadows the C slot, so assigning self.dispatch_table afterwards would change nothing.
    dispatch_table = ChainMap(_FORKING_REDUCERS, cloudpickle.Pickler.dispatch_table)

    def dump(self, obj: Any) -> None:
        with _spawned_main_by_value():
            super().dump(obj)


@contextlib.contextmanager
def _spawned_main_by_value() -> Iterator[None]:
    """cloudpickle sends ``__mp_main__`` (where the trainer has one) by value inside the block.

    cloudpickle sends by value only a module named ``__main__``; in a trainer started by
    ``torch.multiprocessing.spawn`` the launcher script's classes (the DDP tutorial's
    ToyModel) live in ``__mp_main__``, which our worker does not have. The registry is
    process-wide: another thread's cloudpickle sends ``__mp_main__`` by value too while
    the block lasts, which its receiver can load as well.
    """
    module = sys.modules.get("__mp_main__")
    if getattr(module, "__name__", None) != "__mp_main__":  # none, or one register_ would refuse
        yield
        return
    with _REGISTRY_LOCK:
        registered = "__mp_main__" in cloudpickle.list_registry_pickle_by_value()
        if not registered:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            if not registered:
                cloudpickle.unregister_pickle_by_value(module)


def _reduce_without_sharing(obj: Any) -> Any:
    return (int, ())


class _ProbePickler(_ValuePickler):
    """Pickles like :class:`_ValuePickler` but moves no tensor to shared memory (for diagnosis only)."""

    dispatch_table = ChainMap(
        {cls: _reduce_without_sharing for cls in _FORKING_REDUCERS if cls.__module__.startswith("torch")},
        _FORKING_REDUCERS,
        cloudpickle.Pickler.dispatch_table,
    )


# -- what exactly cannot be pickled --------------------------------------------------------


def locate_unpicklable(obj: Any, name: str, error: BaseException) -> UnpicklableError:
    """The deepest attribute path under ``obj`` that fails to pickle, with its own error."""
    reason = _probe(obj)
    if reason is None:  # only sharing failed (e.g. /dev/shm full): nothing to point at
        return UnpicklableError(name or type(obj).__name__, f"{type(error).__name__}: {error}")
    path = name
    seen = {id(obj)}
    for _ in range(100):  # depth bound: a chain of objects this long is a cycle we missed
        for child_path, value in _children(obj, path):
            if id(value) in seen:
                continue
            seen.add(id(value))
            child_reason = _probe(value)
            if child_reason is not None:
                path, obj, reason = child_path, value, child_reason
                break
        else:
            break
    kind = type(obj).__qualname__ if type(obj).__module__ == "builtins" else f"{type(obj).__module__}.{type(obj).__qualname__}"
    if kind not in reason:  # cloudpickle's own messages may not name the type ("files not opened for reading")
        reason = f"cannot pickle '{kind}' object ({reason})"
    return UnpicklableError(path or type(obj).__name__, reason)


def _probe(obj: Any) -> str | None:
    try:
        _dump(_ProbePickler, obj)
    except RecursionError:
        return "too deeply nested to pickle (RecursionError)"
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def _join(path: str, part: str) -> str:
    if part.startswith("["):
        return f"{path}{part}"
    return f"{path}.{part}" if path else part


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of the parts pickling ``obj`` pickles, in the order a reader expects."""
    if isinstance(obj, torch.nn.Module):
        for table in ("_modules", "_parameters", "_buffers"):
            for key, value in getattr(obj, table, {}).items():
                yield _join(path, key), value
        for key, value in vars(obj).items():
            if key not in ("_modules", "_parameters", "_buffers"):
                yield _join(path, key), value
    elif isinstance(obj, Mapping):
        for key, value in list(obj.items()):
            # a top-level dict of named parts reads as attributes: model.logger, not ['model'].logger
            yield (key if not path and isinstance(key, str) else _join(path, f"[{key!r}]")), value
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield _join(path, f"[{i}]"), value
    elif isinstance(obj, types.FunctionType):
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield _join(path, f"<closure {var}>"), cell.cell_contents
            except ValueError:  # an empty cell
                continue
        for var in obj.__code__.co_names:
            if var in obj.__globals__ and not isinstance(obj.__globals__[var], types.ModuleType):
                yield _join(path, f"<global {var}>"), obj.__globals__[var]
        for i, value in enumerate(obj.__defaults__ or ()):
            yield _join(path, f"<default {i}>"), value
    elif isinstance(obj, types.MethodType):
        yield _join(path, "__self__"), obj.__self__
        yield _join(path, "__func__"), obj.__func__
    elif isinstance(obj, functools.partial):
        yield _join(path, "func"), obj.func
        yield _join(path, "args"), obj.args
        yield _join(path, "keywords"), obj.keywords
    elif isinstance(obj, type):
        for key, value in list(vars(obj).items()):
            if not key.startswith("__"):
                yield _join(path, key), value
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            yield from ((_join(path, k), v) for k, v in list(state.items()))
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                yield _join(path, slot), getattr(obj, slot)
        yield _join(path, "__class__"), type(obj)
