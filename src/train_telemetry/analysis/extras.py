"""Optional dependencies (matplotlib, pandas, pyarrow, tensorboard): imported only when a
feature needs them, with an error that names the pip extra to install.

Runs in: any process that reads a run (no torch).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency of the feature asked for is not installed; the message says which."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'train-telemetry[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {top}, which is not installed: pip install 'train-telemetry[{extra}]' "
            f"(or pip install {top})"
        ) from exc
