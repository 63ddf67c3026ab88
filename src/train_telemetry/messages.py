"""Everything that crosses the process boundary between the trainer and the worker.

Runs in: both processes. See NOTE [worker lifecycle] in worker.py for the protocol.

Trainer -> worker, control queue: :class:`Setup` once, :class:`Groups` when the
optimizer's param groups change, then :class:`Stop`. Snapshots do not use the queue: the
hook writes a slot's tensors and its header (``write_header``: plain numbers, packed) and
publishes the slot (snapshot.Channel); the worker decodes the header into a
:class:`Snapshot`. Worker -> trainer (``from_worker`` queue): :class:`Ready` once the
worker runs, :class:`SetupDone` after ``Setup``, :class:`Done` as its last word.
Tensors cross only inside ``Setup`` (handles of the shared-memory slots, once).
"""

from __future__ import annotations

import operator
import pickle
import struct
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, TypeAlias, get_type_hints

from .records import CHECKPOINT_FILE, error_entry


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one state tensor in a slot (parameters first, then buffers)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"; str so the spec pickles without torch dtype objects


@dataclass
class Setup:
    """Everything the worker needs before the first snapshot."""

    specs: list[TensorSpec]
    num_params: int  # specs[:num_params] are parameters, the rest buffers
    slots: list[list[Any]]  # slots[i][j]: shared CPU tensor for specs[j] in slot i
    meta: list[Any]  # meta[i]: slot i's shared byte buffer (snapshot.META_FIELDS)
    model: Any  # the model for holdout eval, its tensors the slot's (snapshot.model_on_slot), or None
    forward: Any  # forward(model, batch) -> logits for the holdout (forward_fn, or the batch format's call)
    holdout: Any  # the fixed holdout batch (CPU tensors), or None
    holdout_labels: Any  # its label tensor, or None
    slice_batch: Any  # slice_batch(batch, start, stop), for evaluating the holdout in chunks
    init_slot: int | None  # slot holding the weights at start(): the first delta reference
    groups: Groups
    metrics: list[Any]  # the run's Metric objects (metrics.resolve_metrics)
    needs: frozenset[str]  # what they need (metrics.all_needs)
    module_types: dict[str, str]  # module name -> class name, for metrics' setup
    label_name: str = "label"
    # After a worker died (sinks.WorkerSink): which restart this is, snapshots to record as
    # crashes instead of processing (seq -> reason), and the last seq already on disk.
    restart: int = 0
    segment: int = 0  # resumed runs: which start() in this output_dir (records carry it)
    skip: dict[int, str] = field(default_factory=dict)
    written_through_seq: int | None = None
    rank: int = 0
    world_size: int = 1
    # The delta reference's file name in the run directory; with per_rank each rank has its
    # own (last_checkpoint.rank1.pt), else two workers would race on one file.
    checkpoint_name: str = CHECKPOINT_FILE
    # FSDP2: how the ranks' shards make the full tensors (shards.ShardPlan); ``slots`` then
    # hold rank 0's shards and the worker assembles the rest from the other ranks' files.
    shards: Any = None
    # The replica check (replicas.py): groups of ranks that should hold the same weights;
    # then each slot's meta holds one fingerprint per rank (``world_size`` of them).
    replica_groups: list[list[int]] = field(default_factory=list)

    @property
    def replica_slots(self) -> int:
        return self.world_size if self.replica_groups else 0


@dataclass
class Groups:
    """Which optimizer param group each parameter is in; snapshots name their version."""

    version: int
    group_of: list[int]  # param index -> group index
    names: list[str]


HEADER_BYTES = 64 * 1024  # per slot: a snapshot's header (write_header)

# What a snapshot's header says about each value (the kinds below).
NONE, IN_HEADER, IN_SLOT, IN_AUX, IN_EXTRA, ALL_MISSING = 0, 1, 2, 3, 4, 5

# struct codes of the header's plain numbers; the Snapshot fields below carry them.
_I64: TypeAlias = Annotated[int, "q"]
_F64: TypeAlias = Annotated[float, "d"]
_I8: TypeAlias = Annotated[int, "b"]


@dataclass
class Snapshot:
    """One collection's plain numbers, as the hook packs them into a slot's header.

    Declared once: the header's struct format, ``write_header`` and ``read_header`` derive
    from the annotated fields (``Annotated[int, "q"]`` is one int64 of the header), in
    order; the fields after them travel as the LRs and a pickled ``extra`` that follow.
    The tensors (weights, gradient norms, loss, labels, outputs) stay in the slot; the
    kinds say where each value is: NONE, IN_HEADER, IN_SLOT (the slot's meta buffer),
    IN_AUX (labels/outputs copied into the aux bytes, described in ``extra``), IN_EXTRA
    (computed in the hook and pickled into ``extra``), ALL_MISSING (no parameter had a gradient).
    """

    seq: _I64
    ordinal: _I64  # due collection steps before this one (drops included): the same on every rank
    batch_idx: _I64
    step: _I64  # batch_idx counted on where it went back (a new epoch): never decreases
    epoch: _I64
    time: _F64  # time.time() at the hook
    hook_ms: _F64
    dropped_before: _I64  # snapshots dropped since the previous one taken
    dropped_total: _I64
    batch_size: _I64  # -1: unknown (see .rows)
    groups_version: _I64
    grads: _I8
    loss_kind: _I8
    accuracy_kind: _I8
    counts_kind: _I8
    training: _I8  # model.training at the hook: 1, 0, or -1 when not read
    loss: _F64  # when loss_kind == IN_HEADER
    learning_rates: list[float] | None = None  # per optimizer param group
    extra: dict[str, Any] = field(default_factory=dict)  # aux layout, hook-side errors, ...
    slot: int = -1  # set by read_header

    @property
    def rows(self) -> int | None:
        return None if self.batch_size < 0 else self.batch_size

    @property
    def header_loss(self) -> float | None:
        return self.loss if self.loss_kind == IN_HEADER else None


_PACKED = [f.name for f in fields(Snapshot) if get_type_hints(Snapshot, include_extras=True)[f.name] in (_I64, _F64, _I8)]
# The packed fields, then the number of LRs (-1: none) and the bytes of the pickled extra.
_packed_values = operator.attrgetter(*_PACKED)  # one C call for all of them (hot path)
_HEAD = struct.Struct("<" + "".join(get_type_hints(Snapshot, include_extras=True)[n].__metadata__[0] for n in _PACKED) + "iI")
_WITH_LRS: dict[int, struct.Struct] = {}


def write_header(buf: Any, slot: int, snap: Snapshot, extra: bytes) -> None:
    """Pack ``snap`` (its numbers, LRs and the pickled ``extra``) into slot ``slot``'s header in ``buf``."""
    off = slot * HEADER_BYTES
    lrs = snap.learning_rates
    n_lrs = -1 if lrs is None else len(lrs)
    fmt = _WITH_LRS.get(n_lrs)
    if fmt is None:  # the header and the LRs in one struct: one pack call per snapshot
        fmt = _WITH_LRS[n_lrs] = struct.Struct(_HEAD.format + f"{max(n_lrs, 0)}d")
    if fmt.size + len(extra) > HEADER_BYTES:
        extra = pickle.dumps({"errors": [error_entry("header", OverflowError(
            f"{len(extra)} bytes of hook-side values do not fit a slot header"))]})
    fmt.pack_into(buf, off, *_packed_values(snap), n_lrs, len(extra), *(lrs or ()))
    if extra:
        off += fmt.size
        buf[off : off + len(extra)] = extra


def read_header(buf: Any, slot: int) -> Snapshot:
    """The :class:`Snapshot` whose header write_header put in slot ``slot``."""
    off = slot * HEADER_BYTES
    *values, n_lrs, n_extra = _HEAD.unpack_from(buf, off)
    off += _HEAD.size
    lrs = None
    if n_lrs >= 0:
        lrs = list(struct.unpack_from(f"<{n_lrs}d", buf, off))
        off += 8 * n_lrs
    extra = pickle.loads(bytes(buf[off : off + n_extra])) if n_extra else {}
    return Snapshot(**dict(zip(_PACKED, values, strict=True)), learning_rates=lrs, extra=extra, slot=slot)


@dataclass
class Stop:
    """No more snapshots: write every published one, flush, answer Done, exit."""

    reason: str = "stop"


@dataclass
class Ready:
    pid: int


@dataclass
class SetupDone:
    error: str | None  # None when the worker is ready for snapshots; else what went wrong


@dataclass
class Done:
    """The worker's last word: what it wrote and what went wrong."""

    records_written: int
    errors: dict[str, int]  # "where: ExcType" -> count
    last_errors: list[str]  # a few formatted messages
    io_errors: int
    clean: bool = True
