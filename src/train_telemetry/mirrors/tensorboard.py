"""TensorBoard: event files under ``log_dir`` (default ``<output_dir>/tensorboard``).

Runs in: a mirror's thread (hub.py). Uses tensorboard's own event-file writer and protos, as
``export --tensorboard`` does (no torch, no TensorFlow). Tags are export's columns with the
first '.' made a '/' (``gradient_norm/head``: TensorBoard groups cards by that part), the same
tags ``export --tensorboard`` writes, so the two are interchangeable. Diagnoses and the
holdout table are text summaries (TensorBoard's Text tab); it has no tables or tags.
A log_dir that already holds event files (a Lightning TensorBoardLogger's) just gets one more.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .base import BaseMirror, HoldoutTable, MirrorContext


class TensorBoardMirror(BaseMirror):
    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, prefix: str = "") -> None:
        self.log_dir = log_dir
        self.prefix = prefix
        self._writer: Any = None
        self._last_step = 0

    def open(self, context: MirrorContext) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        log_dir = Path(self.log_dir) if self.log_dir else context.run_dir / "tensorboard"
        log_dir.mkdir(parents=True, exist_ok=True)
        # flush_secs: a live dashboard sees a record within seconds, not at the 120 s default.
        self._writer = EventFileWriter(str(log_dir), flush_secs=5, filename_suffix=".train-telemetry")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key.replace(".", "/", 1), simple_value=value) for key, value in scalars.items()]
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self._last_step = step

    def _text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        value = Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))

    def log_holdout(self, step: int, table: HoldoutTable) -> None:
        self._text(f"{self.prefix}train_telemetry/holdout_examples", table.to_markdown(), step)

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        self._text(f"{self.prefix}train_telemetry/diagnoses", "```\n" + text + "\n```", self._last_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
