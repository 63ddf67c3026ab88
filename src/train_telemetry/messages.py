"""Everything that crosses the process boundary between the trainer and the worker.

Runs in: both processes. See NOTE [worker lifecycle] in worker.py for the protocol.

Trainer -> worker (``to_worker`` queue): :class:`Setup` once, then one :class:`Snapshot`
per collection, then :class:`Stop`. Worker -> trainer (``from_worker`` queue):
:class:`Ready` once the worker runs, :class:`SetupDone` after ``Setup``, :class:`Done` as
its last word. Messages are small: tensors cross only inside ``Setup`` (the shared-memory
slots and the model copy, once); a ``Snapshot`` names its slot by index.
"""

from __future__ import annotations

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
    model: Any  # CPU copy of the model for holdout eval, or None
    forward_fn: Any  # picklable forward_fn(model, batch) -> logits, or None
    holdout: dict[str, Any] | None  # the fixed holdout batch (CPU tensors)
    init_slot: int | None  # slot holding the weights at start(): the first delta reference
    # The delta reference's file name in the run directory; with per_rank each rank has its
    # own (last_checkpoint.rank1.pt), else two workers would race on one file.
    checkpoint_name: str = CHECKPOINT_FILE


@dataclass
class Snapshot:
    """One collection: plain numbers taken at the hook, plus the slot holding the weights."""

    seq: int
    slot: int | None  # None when weights were not copied (track_weight_delta and eval off)
    batch_idx: int
    epoch: int
    time: float  # time.time() at the hook
    grad_norms: list[float | None] | None  # per parameter, in spec order; None = no grad
    learning_rates: list[float] | None  # per optimizer param group
    group_of: list[int] | None  # param -> group index; sent with the first snapshot only
    group_names: list[str] | None  # sent with group_of
    label_counts: dict[int, int] | None
    batch_size: int | None
    train_loss: float | None
    train_accuracy: float | None
    hook_ms: float
    dropped_before: int  # snapshots dropped since the previous one taken
    dropped_total: int
    rank: int = 0
    world_size: int = 1
    errors: list[dict[str, str]] = field(default_factory=list)  # hook-side metric failures


@dataclass
class Stop:
    """No more snapshots: write what is queued, flush, answer Done, exit."""

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
