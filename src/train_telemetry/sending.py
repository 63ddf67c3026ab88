"""Sending the model and forward_fn to the worker: by reference where it can, by value where it must.

Runs in: the training process (``dumps_for_worker``, at ``start()``). The bytes are read
in the worker process by plain ``pickle.loads``; cloudpickle must be importable there
(it is a core dependency).

Under ``spawn`` the worker is a fresh interpreter. Standard pickling sends a class or a
function as a name to import there, which fails for classes defined in a function or a
notebook, for lambdas and for closures. So:

1. :class:`multiprocessing.reduction.ForkingPickler` first, the pickler torch extends so
   a tensor in shared memory travels as a handle to the same memory, not as its bytes.
   It is refused (and step 2 taken) when it would name a class or function of
   ``__main__`` that the worker cannot import: in a notebook or ``python -c`` the worker
   has no such ``__main__``, and a class defined under ``if __name__ == "__main__":`` is
   not there either. Plain pickling would succeed here and fail in the worker.
2. Otherwise cloudpickle, which sends those classes and functions by value, with
   ForkingPickler's reducers kept: shared-memory tensors are still sent as handles.
3. What neither can send (an open file, a lock) raises :class:`UnpicklableError`, naming
   the attribute that holds it (``model.logger.stream: cannot pickle '_io.TextIOWrapper'
   object``), found by pickling the object's parts one by one with a pickler that shares
   no memory (it never sends the bytes it makes).
"""

from __future__ import annotations

import functools
import inspect
import io
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Iterator, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reducers on ForkingPickler)

__all__ = ["UnpicklableError", "dumps_for_worker"]

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
    """Plain pickling would name a ``__main__`` object the worker cannot import."""


class _ReferencePickler(ForkingPickler):
    """ForkingPickler that refuses to send ``__main__`` classes/functions the worker lacks."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for every non-atomic object: keep it to an attribute read for the rest.
        if getattr(obj, "__module__", None) == "__main__" and isinstance(obj, (type, types.FunctionType)) \
                and not _worker_can_import(obj):
            raise _NeedsValue(f"{obj.__qualname__} lives in a __main__ the worker cannot import")
        return NotImplemented


class _ValuePickler(cloudpickle.Pickler):
    """cloudpickle, plus ForkingPickler's reducers: shared-memory tensors go as handles."""

    # Tensors and storages are never classes or functions, so cloudpickle's reducer_override
    # passes them on to this table, where torch's reducers come first. A class attribute:
    # the C pickler reads dispatch_table once, at __init__, and cloudpickle's class attribute
    # shadows the C slot, so assigning self.dispatch_table afterwards would change nothing.
    dispatch_table = ChainMap(_FORKING_REDUCERS, cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        if getattr(obj, "__module__", None) == "__main__" and isinstance(obj, (type, types.FunctionType)) \
                and _worker_can_import(obj):
            return NotImplemented  # a script's module-level class: by name, as plain pickle does
        return super().reducer_override(obj)


def _reduce_without_sharing(obj: Any) -> Any:
    return (int, ())


class _ProbePickler(_ValuePickler):
    """Pickles like :class:`_ValuePickler` but moves no tensor to shared memory (for diagnosis only)."""

    dispatch_table = ChainMap(
        {cls: _reduce_without_sharing for cls in _FORKING_REDUCERS if cls.__module__.startswith("torch")},
        _FORKING_REDUCERS,
        cloudpickle.Pickler.dispatch_table,
    )


# -- can the worker import this __main__ object? -----------------------------------------


def _main_rerun_by_spawn() -> bool:
    """Whether a spawned worker runs the trainer's main script as its own ``__main__``.

    Mirrors ``multiprocessing.spawn``: main is re-imported by module name (unless it is a
    package's ``__main__``) or from its file (unless that is IPython); a notebook kernel,
    ``python -c`` and the REPL have neither.
    """
    main = sys.modules.get("__main__")
    if main is None:
        return False
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        return not (spec_name == "__main__" or spec_name.endswith(".__main__"))
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or path.startswith("<"):
        return False
    return not path.rsplit("/", 1)[-1].startswith("ipython")


def _worker_can_import(obj: Any) -> bool:
    """A ``__main__`` class/function is importable in the worker: module level, outside any block."""
    if "<locals>" in obj.__qualname__ or not _main_rerun_by_spawn():
        return False
    parts = obj.__qualname__.split(".")
    top: Any = getattr(sys.modules["__main__"], parts[0], None)
    found = top
    for part in parts[1:]:
        found = getattr(found, part, None)
    if found is not obj:
        return False
    try:
        first_line = inspect.getsourcelines(top)[0][0]  # of the outermost name: a method's class
    except (OSError, TypeError, IndexError):
        return True  # no source to look at: trust the name, as plain pickle would
    # Indented: defined inside a block, typically `if __name__ == "__main__":`, which the
    # worker's re-run of the script (as __mp_main__) skips.
    return not first_line[:1].isspace()


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
