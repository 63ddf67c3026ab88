"""Callbacks that drive a :class:`~train_telemetry.Telemetry` from a framework's trainer.

- :mod:`train_telemetry.integrations.transformers`: ``TelemetryCallback`` for the Hugging Face
  ``transformers.Trainer`` (``pip install 'train-telemetry[transformers]'``).
- :mod:`train_telemetry.integrations.lightning`: ``TelemetryCallback`` for a Lightning
  ``Trainer`` (``pip install 'train-telemetry[lightning]'``).

Import the submodule you need: this package imports no framework, so importing it costs
nothing and works where neither is installed. What both callbacks share lives here: how a
``config`` argument becomes a :class:`~train_telemetry.TelemetryConfig`, and the message of a
missing framework.

Runs in: the training process (the callbacks call the public ``Telemetry`` API only).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import TelemetryConfig

__all__ = ["load_config", "missing_framework"]


def load_config(config: TelemetryConfig | Mapping[str, Any] | str | Path | None) -> TelemetryConfig:
    """A callback's ``config`` argument as a config: None (defaults), a config, a dict or a YAML path."""
    if config is None:
        return TelemetryConfig()
    if isinstance(config, TelemetryConfig):
        return config
    if isinstance(config, Mapping):
        return TelemetryConfig.from_dict(dict(config))
    if isinstance(config, (str, Path)):
        return TelemetryConfig.from_yaml(config)
    raise TypeError(
        f"config must be None, a TelemetryConfig, a dict or the path of a YAML file, not {type(config).__name__}"
    )


def missing_framework(module: str, framework: str, extra: str) -> ImportError:
    """The error raised when an integration's framework is not installed: it names the extra to install."""
    return ImportError(
        f"train_telemetry.integrations.{module} needs {framework}, which is not installed: "
        f"pip install 'train-telemetry[{extra}]'"
    )
