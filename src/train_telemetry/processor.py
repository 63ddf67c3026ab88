"""From a published slot to a written line: read the slot, build the record, move the reference.

Runs in: the worker process (``worker_loop``), and in the training process for
``mode: sync`` (called inline by sinks.InlineSink): same code, same records.

One snapshot: ``read_slot`` turns the slot's header and tensors into a
:class:`~train_telemetry.metrics.SnapshotData` (weight deltas and the holdout forward
computed on first use), ``build.build_record`` runs the metrics, the snapshot becomes the
new delta reference (reference.py), the slot is released, and the record is written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from msgspec import UNSET

from .build import build_record
from .config import TelemetryConfig
from .hosts import CrossHost
from .messages import ALL_MISSING, IN_AUX, IN_EXTRA, IN_SLOT, Groups, Setup, Snapshot
from .metrics.api import RunInfo, SnapshotData, _Lazy
from .metrics.batch import LabelCounts, batch_accuracy, label_counts, unpack_count_vector
from .metrics.holdout import evaluate_holdout
from .mirrors import open_mirrors
from .records import TypedRecord, encode_record, error_entry, typed_record
from .reference import ReferenceCheckpoint
from .shards import Assembler, RankFailed, materialize
from .snapshot import RANK_PARTS, aux_view, bind_model, meta_views
from .writer import OnceLog, RecordWriter

_MAX_LOGGED_ERRORS = 20
# Weight metrics built from per-parameter norms alone: across hosts they come from each host's sums (hosts.py).
_FROM_SUMS = frozenset({"weight_norm", "weight_delta", "update_ratio", "layers"})
# What a record loses when a rank could not add its share to a part (snapshot.RANK_PARTS).
_PART_FIELDS = {"gradient_norm": (), "train_loss": ("loss",), "batch_stats": ("label_counts", "batch_size"),
                "train_accuracy": ("train_accuracy",)}


class SnapshotProcessor:
    """Builds and writes the record of each snapshot: the work of the worker."""

    def __init__(self, config: TelemetryConfig, run_dir: Path, setup: Setup, writer: RecordWriter, log: OnceLog) -> None:
        self.config = config
        self.setup = setup
        self.writer = writer
        self.log = log
        # Trackers the records are mirrored to, each on its own thread (mirrors/hub.py); None: none.
        self.mirrors = open_mirrors(config, run_dir, writer.path, setup.rank, log.once)
        self.built_by = "worker"  # "trainer" when the training process runs us inline (sinks.InlineSink)
        self.groups: dict[int, Groups] = {setup.groups.version: setup.groups}
        views = meta_views(setup.meta, max(setup.num_params, 1), setup.replica_slots)
        self.norms, self.pre_clip, self.scalars = views["norms"], views["pre_clip"], views["scalars"]
        self.counts, self.aux, self.failed = views["counts"], views["aux"], views["failed"]
        self.replicas = views["replicas"]
        self._aux_views: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self.errors: dict[str, int] = {}
        self.last_errors: list[str] = []
        self.last_finite_step: int | None = None  # of the last record with no NaN/Inf (provenance.py)
        self.param_names = [spec.name for spec in setup.specs[: setup.num_params]]
        self.buffer_names = [spec.name for spec in setup.specs[setup.num_params :]]
        self.reference: ReferenceCheckpoint | None = None
        # FSDP2 with counted shards on several hosts: weight numbers summed over the hosts (hosts.py)
        plan = setup.shards
        self.cross_host = (CrossHost(plan, setup.num_params, "weight_deltas" in setup.needs, setup.slots)
                           if plan is not None and plan.cross_host and setup.slots else None)
        if "weight_deltas" in setup.needs and setup.slots and self.cross_host is None:
            self.reference = ReferenceCheckpoint(
                run_dir / setup.checkpoint_name, [s.name for s in setup.specs], setup.num_params)
        self.model = setup.model
        self.model_targets: list[torch.Tensor] = []
        # FSDP2: full tensors assembled from every rank's shards (shards.py); else the slot itself
        self.assembler = Assembler(setup.shards, setup.slots) if setup.shards is not None and setup.slots else None
        if self.model is not None and self.assembler is not None:
            first, why = self.assembler.tensors(0, None)
            if first is None:
                self.model = None  # no holdout without the weights (the records say why)
            else:
                materialize(self.model, first)
        if self.model is not None:
            # The model's own tensors (not detached copies): bind_model re-points them per snapshot.
            self.model_targets = [*self.model.parameters(), *self.model.buffers()]
            if len(self.model_targets) != len(setup.specs):
                raise RuntimeError("the worker's model copy does not match the snapshot layout")
        num_classes = 0
        if isinstance(setup.holdout_labels, torch.Tensor):
            counts = label_counts(setup.holdout_labels)
            num_classes = counts.num_classes if counts is not None else 0
        info = RunInfo(config=config, param_names=self.param_names, buffer_names=self.buffer_names,
                       module_types=setup.module_types, rank=setup.rank, world_size=setup.world_size,
                       num_classes=num_classes, label_name=setup.label_name, replica_groups=setup.replica_groups)
        for m in setup.metrics:
            m.setup(info)
        init = self.slot(setup.init_slot, -1)[0] if setup.init_slot is not None else None
        if self.cross_host is not None and setup.init_slot is not None and "weight_deltas" in setup.needs:
            self.cross_host.start_reference(setup.init_slot)
        if init is not None and self.reference is not None:
            self.reference.save(init, None, None)
            self.release_shards(-1)
        elif self.reference is not None and not setup.restart:
            self.reference.discard()  # a start without weights: no stale reference from an earlier run

    def check_holdout(self) -> str | None:
        """Run the holdout forward once at setup, so a bad forward fails start(), not the run;
        then let the metrics instrument the eval model (after: this forward is no snapshot's)."""
        if self.model is not None and self.setup.holdout is not None:
            try:
                slot, why = self.slot(0, None)
                if slot is None:
                    raise RuntimeError(why)
                self.evaluate(slot)
            except Exception as exc:
                where = "on the training thread" if self.built_by == "trainer" else "in the telemetry worker"
                return (f"the holdout forward failed {where}: {type(exc).__name__}: {exc}. "
                        "Check input_keys/label_key, or pass forward_fn=(model, batch) -> logits")
            for m in self.setup.metrics:
                m.instrument(self.model)
        return None

    def add_groups(self, groups: Groups) -> None:
        self.groups[groups.version] = groups
        for old in sorted(self.groups)[:-8]:  # snapshots in flight name recent versions only
            del self.groups[old]

    def slot(self, i: int, ordinal: int | None) -> tuple[list[torch.Tensor] | None, str | None]:
        """The full tensors of slot ``i`` (assembled from every rank's shards under FSDP2), or None and why not."""
        if not self.setup.slots:
            return None, None
        if self.assembler is None:
            return self.setup.slots[i], None
        return self.assembler.tensors(i, ordinal)

    def release_shards(self, ordinal: int) -> None:
        if self.assembler is not None:
            self.assembler.release(ordinal)
        if self.cross_host is not None:
            self.cross_host.release(ordinal)

    def finish(self) -> None:
        """Every record is written (stop()): let the other hosts' workers go."""
        if self.cross_host is not None:
            self.cross_host.finish()

    # -- one snapshot -> one record ------------------------------------------------
    def handle(self, snap: Snapshot, release: Callable[[int], None]) -> None:
        """Build and write the record of ``snap``, then release its slot.

        Released only after the write: a worker that dies before it wrote the line leaves
        the slot taken, and its successor replays it (sinks.WorkerSink); one that dies
        between the write and the release is caught by ``Setup.written_through_seq``.
        """
        try:
            setup = self.setup
            if setup.written_through_seq is not None and snap.seq <= setup.written_through_seq:
                return  # on disk already: written by the worker that died
            reason = setup.skip.get(snap.seq)
            if reason is not None:  # this snapshot killed two workers: record that, not it
                self.count_error("worker", RuntimeError(reason))
                record = self._core(snap, [{"where": "worker", "type": "WorkerCrash", "message": reason}])
            else:
                record = self.process(snap)
            self.write(record)
        finally:
            self.release_shards(snap.ordinal)  # the other ranks' shards first: rank 0's slot frees the next copy
            release(snap.slot)

    def _core(self, snap: Snapshot, errors: list[dict[str, str]]) -> TypedRecord:
        return build_record(self.read_slot(snap, []), [], snap, errors, self.count_error, self.built_by)

    def process(self, snap: Snapshot) -> TypedRecord:
        """The record of ``snap``, read from its slot (which stays taken)."""
        errors: list[dict[str, str]] = list(snap.extra.get("errors", ()))
        data = self.read_slot(snap, errors)
        if self.reference is not None and data.params is not None and self.reference.torn():
            errors.append({"where": "weight_delta", "type": "ReferenceTorn", "message":
                           "the reference checkpoint was being rewritten when a worker died: no delta "
                           "for this collection (the next one measures from this snapshot)"})
        stamp = {k: v for k, v in (("restarts", self.setup.restart), ("segment", self.setup.segment)) if v}
        record = build_record(data, self.setup.metrics, snap, errors, self.count_error, self.built_by, stamp,
                              self.last_finite_step)
        if record.nonfinite is UNSET:
            self.last_finite_step = record.step if record.step is not UNSET else record.batch_idx
        if self.reference is not None and data.params is not None:
            try:  # the next delta's reference; a failure makes it null, never wrong
                self.reference.save(data.params + list((data.buffers or {}).values()), snap.batch_idx, snap.epoch,
                                    data.weight_norms)
            except Exception as exc:
                self.count_error("weight_delta", exc)
                built = record.to_dict()
                built["errors"] = [*built.get("errors", ()), error_entry("weight_delta", exc)]
                record = typed_record(built)
        return record

    def read_slot(self, snap: Snapshot, errors: list[dict[str, str]]) -> SnapshotData:
        """What the metrics see of ``snap``: numbers from the header, views of the slot."""
        setup, i = self.setup, snap.slot
        groups = self.groups.get(snap.groups_version) or self.groups[max(self.groups)]
        slot, why = self.slot(i, snap.ordinal)
        if why is not None and self.cross_host is None:
            errors.append({"where": "weights", "type": "ShardsMissing", "message": why})
        elif why is not None and self._needs_model():  # weight numbers come from the hosts' sums below
            errors.append({"where": "holdout", "type": "WeightsOnOtherHosts", "message": why})
        n = setup.num_params
        data = SnapshotData(
            batch_idx=snap.batch_idx, step=snap.step, epoch=snap.epoch, seq=snap.seq, time=snap.time, config=self.config,
            param_names=self.param_names, group_names=groups.names, group_of=groups.group_of,
            learning_rates=snap.learning_rates, loss=snap.header_loss, batch_size=snap.rows,
            training=None if snap.training < 0 else bool(snap.training), rank=setup.rank, world_size=setup.world_size,
        )
        if slot is not None:
            data.params = slot[:n]
            data.buffers = dict(zip(self.buffer_names, slot[n:], strict=True))
            if self.reference is not None:
                reference, params = self.reference, data.params
                data._deltas = _Lazy(lambda: reference.distances(params))
            if self.model is not None and setup.holdout is not None:
                data._holdout = _Lazy(lambda: self.evaluate(slot))
        if self.cross_host is not None:
            found = self.cross_host.numbers(i, snap.ordinal, snap.batch_idx)
            data._weight_norms = found.norms
            if found.deltas is not None:
                data._deltas = _Lazy(lambda: found.deltas)
            errors += [{"where": "weights", "type": "ShardsMissing", "message": p} for p in found.problems]
            if found.no_delta is not None and "weight_deltas" in setup.needs:
                errors.append({"where": "weight_delta", "type": "NoReference", "message": found.no_delta})
        if snap.grads == IN_SLOT:
            data.grad_norms = [None if v < 0 else v for v in self.norms[i][:n].tolist()]  # NaN stays NaN
        elif snap.grads == ALL_MISSING:
            data.grad_norms = [None] * n
        if "clip_max_norm" in snap.extra:  # the loop clipped with Telemetry.clip_grad_norm_
            data.pre_clip_norms = [None if v < 0 else v for v in self.pre_clip[i][:n].tolist()]
            data.clipping = {"max_norm": snap.extra["clip_max_norm"], "pre_clip_norm": float(self.scalars[i][2])}
        if snap.loss_kind == IN_SLOT:
            data.loss = float(self.scalars[i][0])
        extra = snap.extra
        views = self._views(i, extra) if "labels" in extra else {}
        data.labels, data.outputs = views.get("labels"), views.get("outputs")
        accuracy = None
        if snap.accuracy_kind == IN_AUX:
            with self._guard("train_accuracy", errors):
                accuracy = float(batch_accuracy(views["outputs"], views["labels"], extra.get("shift", False)))
        elif snap.accuracy_kind == IN_SLOT:
            accuracy = float(self.scalars[i][1])
        if accuracy is not None and not math.isnan(accuracy):  # NaN: every label was ignored
            data.train_accuracy = accuracy
        if snap.counts_kind == IN_SLOT:  # DDP: the all_reduced count vector
            data.label_counts, data.batch_size = unpack_count_vector(self.counts[i].tolist())
        elif snap.counts_kind == IN_AUX:
            with self._guard("batch_stats", errors):
                data.label_counts = label_counts(views["labels"])
        elif snap.counts_kind == IN_EXTRA:
            data.label_counts = extra.get("label_counts")
        if isinstance(data.label_counts, LabelCounts):
            data.label_counts.name = extra.get("label_name")  # the hook's batch format: keys <name>_<id>_pct
        if setup.replica_groups:  # every rank's weight fingerprint, from the collective
            data.replica_values = self.replicas[i].tolist()
        failed = self.failed[i].tolist()  # zeros unless FSDP2's collective says otherwise
        if any(failed):
            self._drop_failed_parts(data, failed, errors)
        return data

    def _needs_model(self) -> bool:
        """Whether this run asks for what needs the whole model in one process (holdout, activations, ...)."""
        return self.setup.holdout is not None or any(
            m.needs & {"weights", "buffers", "holdout"} and m.key not in _FROM_SUMS for m in self.setup.metrics)

    def _drop_failed_parts(self, data: SnapshotData, failed: list[float], errors: list[dict[str, str]]) -> None:
        """FSDP2: a part some rank could not add its share to (shards.ShardSync) is recorded as
        null, with an error naming the rank: the global value would lack that rank's share."""
        for p, where in enumerate(RANK_PARTS):
            count, rank_sum = int(failed[2 * p]), int(failed[2 * p + 1])
            if not count:
                continue
            who = f"rank {rank_sum} could not add its share" if count == 1 else f"{count} ranks could not add their share"
            exc = RankFailed(f"{who} to this collection's global {where.replace('_', ' ')} (the rank's own warning "
                             "says why): recorded as null, not summed without it")
            errors.append(error_entry(where, exc))
            self.count_error(where, exc)
            for name in _PART_FIELDS[where]:
                setattr(data, name, None)
            if where == "gradient_norm" and data.grad_norms is not None:
                data.grad_norms = [None] * len(data.grad_norms)  # null norms, as for parameters without gradients

    def evaluate(self, slot: list[torch.Tensor]) -> dict[str, Any]:
        """The holdout forward at ``slot``'s weights (the eval model reads them, no copy)."""
        setup = self.setup
        assert self.model is not None
        bind_model(self.model_targets, slot)
        return evaluate_holdout(self.model, setup.holdout, setup.holdout_labels, setup.forward, setup.slice_batch,
                                self.config.eval_batch_size)

    def _views(self, slot: int, extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The labels/outputs the hook copied into ``slot``'s aux bytes, as tensors."""
        key = (slot, extra.get("labels"), extra.get("outputs"))  # (offset, dtype, shape) tuples
        views = self._aux_views.get(key)
        if views is None:
            if len(self._aux_views) > 64:
                self._aux_views.clear()
            views = {}
            for name in ("labels", "outputs"):
                if name in extra:
                    offset, dtype, shape = extra[name]
                    views[name] = aux_view(self.aux[slot], offset, getattr(torch, dtype), shape)
            self._aux_views[key] = views
        return views

    def write(self, record: TypedRecord) -> None:
        try:
            line = encode_record(record)
        except Exception as exc:  # never let one odd value cost the run: write what we can
            self.count_error("encode", exc)
            line = encode_record(
                {k: record[k] for k in ("schema", "batch_idx", "epoch", "seq", "timestamp", "time")}
                | {"errors": [error_entry("encode", exc)]}
            )
        self.writer.write(line)
        if self.mirrors is not None:  # an append per mirror: never waits (NOTE [mirror isolation])
            self.mirrors.feed(record)

    # -- errors -------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, where: str, errors: list[dict[str, str]]) -> Any:
        try:
            yield
        except Exception as exc:
            errors.append(error_entry(where, exc))
            self.count_error(where, exc)

    def count_error(self, where: str, exc: BaseException) -> None:
        key = f"{where}: {type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.last_errors) < _MAX_LOGGED_ERRORS and self.errors[key] == 1:
            self.last_errors.append(f"{key}: {exc}")
        self.log.once(key, f"{where} failed ({type(exc).__name__}: {exc}); recorded in the "
                      "record's errors, further identical failures are counted silently")

