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

import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

from .records import CHECKPOINT_FILE


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
    meta: list[Any]  # meta[i]: slot i's shared byte buffer (snapshot.SlotPool)
    meta_offsets: dict[str, int]
    model: Any  # the model for holdout eval, its tensors the slot's (snapshot.model_on_slot), or None
    forward_fn: Any  # picklable forward_fn(model, batch) -> logits, or None
    holdout: dict[str, Any] | None  # the fixed holdout batch (CPU tensors)
    init_slot: int | None  # slot holding the weights at start(): the first delta reference
    groups: Groups
    rank: int = 0
    world_size: int = 1
    # The delta reference's file name in the run directory; with per_rank each rank has its
    # own (last_checkpoint.rank1.pt), else two workers would race on one file.
    checkpoint_name: str = CHECKPOINT_FILE


@dataclass
class Groups:
    """Which optimizer param group each parameter is in; snapshots name their version."""

    version: int
    group_of: list[int]  # param index -> group index
    names: list[str]


HEADER_BYTES = 64 * 1024  # per slot: a snapshot's header (write_header)

# What a snapshot's header says about each value (the kinds below).
NONE, IN_HEADER, IN_SLOT, IN_AUX, IN_EXTRA, ALL_MISSING = 0, 1, 2, 3, 4, 5

# seq, batch_idx, epoch, time, hook_ms, dropped_before, dropped_total, batch_size (-1: unknown),
# groups version, grads kind, loss kind, accuracy kind, counts kind, loss, #LRs (-1: none),
# bytes of the pickled extra that follows the LRs.
_HEAD = struct.Struct("<qqqddqqqqbbbbdiI")
_WITH_LRS: dict[int, struct.Struct] = {}


@dataclass
class Snapshot:
    """One collection as the worker reads it from a slot's header (see write_header).

    The tensors (weights, gradient norms, loss, labels, outputs) stay in the slot; the
    kinds say where each value is: NONE, IN_HEADER, IN_SLOT (the slot's meta buffer),
    IN_AUX (labels/outputs copied into the aux bytes, described in ``extra``), IN_EXTRA
    (computed in the hook and pickled into ``extra``), ALL_MISSING (no parameter had a gradient).
    """

    seq: int
    slot: int
    batch_idx: int
    epoch: int
    time: float  # time.time() at the hook
    hook_ms: float
    dropped_before: int  # snapshots dropped since the previous one taken
    dropped_total: int
    batch_size: int | None
    groups_version: int
    grads: int
    loss_kind: int
    accuracy_kind: int
    counts_kind: int
    loss: float | None  # when loss_kind == IN_HEADER
    learning_rates: list[float] | None  # per optimizer param group
    extra: dict[str, Any] = field(default_factory=dict)  # aux layout, hook-side errors, ...


def write_header(
    buf: Any, slot: int, seq: int, batch_idx: int, epoch: int, time: float, hook_ms: float,
    dropped_before: int, dropped_total: int, batch_size: int, groups_version: int, grads: int,
    loss_kind: int, accuracy_kind: int, counts_kind: int, loss: float, lrs: list[float] | None, extra: bytes,
) -> None:
    """Pack one snapshot's plain numbers into slot ``slot``'s header in ``buf`` (a shared byte array)."""
    off = slot * HEADER_BYTES
    n_lrs = -1 if lrs is None else len(lrs)
    fmt = _WITH_LRS.get(n_lrs)
    if fmt is None:  # the header and the LRs in one struct: one pack call per snapshot
        fmt = _WITH_LRS[n_lrs] = struct.Struct(_HEAD.format + f"{max(n_lrs, 0)}d")
    if fmt.size + len(extra) > HEADER_BYTES:
        extra = pickle.dumps({"errors": [{"where": "header", "type": "OverflowError",
                                          "message": f"{len(extra)} bytes of hook-side values do not fit a slot header"}]})
    fmt.pack_into(buf, off, seq, batch_idx, epoch, time, hook_ms, dropped_before, dropped_total, batch_size,
                  groups_version, grads, loss_kind, accuracy_kind, counts_kind, loss, n_lrs, len(extra), *(lrs or ()))
    if extra:
        off += fmt.size
        buf[off : off + len(extra)] = extra


def read_header(buf: Any, slot: int) -> Snapshot:
    """The :class:`Snapshot` whose header write_header put in slot ``slot``."""
    off = slot * HEADER_BYTES
    (seq, batch_idx, epoch, time, hook_ms, dropped_before, dropped_total, batch_size, groups_version, grads,
     loss_kind, accuracy_kind, counts_kind, loss, n_lrs, n_extra) = _HEAD.unpack_from(buf, off)
    off += _HEAD.size
    lrs = None
    if n_lrs >= 0:
        lrs = list(struct.unpack_from(f"<{n_lrs}d", buf, off))
        off += 8 * n_lrs
    extra = pickle.loads(bytes(buf[off : off + n_extra])) if n_extra else {}
    return Snapshot(
        seq=seq, slot=slot, batch_idx=batch_idx, epoch=epoch, time=time, hook_ms=hook_ms,
        dropped_before=dropped_before, dropped_total=dropped_total,
        batch_size=None if batch_size < 0 else batch_size, groups_version=groups_version, grads=grads,
        loss_kind=loss_kind, accuracy_kind=accuracy_kind, counts_kind=counts_kind,
        loss=loss if loss_kind == IN_HEADER else None, learning_rates=lrs, extra=extra,
    )


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
