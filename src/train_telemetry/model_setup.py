"""What ``start()`` prepares for a model: its slots, the collector that fills them, and the
Setup message the sink builds records with; and the holdout's format, checked up front.

Runs in: the training process, in ``start()`` (or on the set-up thread when the first hook
brings the model). Apart from the facade (telemetry.py) so that it stays a state machine
that routes: this is the one-time work between "a model" and "a running collection".
Everything here may raise; the facade turns that into ``start()``'s error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .batches import BatchFormat, slice_batch
from .collect import Collector
from .config import TelemetryConfig, TelemetryConfigError
from .distributed import Strategy
from .groups import ParamGroups
from .messages import Setup
from .metrics import Metric
from .metrics.holdout import HoldoutForward
from .sending import locate_unpicklable
from .shards import plain_type_name
from .sinks import Sink
from .snapshot import Layout, build_layout, unwrap_model
from .worker_handle import TelemetryStartError

__all__ = ["Optimizers", "as_list", "holdout_format", "set_up_model"]

ForwardFn = Callable[[torch.nn.Module, Any], Any]
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


def as_list(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    """One optimizer, a list of them, or None, as a list."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def holdout_format(config: TelemetryConfig, holdout: Any, forward_fn: ForwardFn | None) -> BatchFormat | None:
    """The holdout's format (raises with its structure and the fix), or None without one."""
    if holdout is None or not config.track_holdout_logits:
        return None
    if config.keys_are_default and isinstance(holdout, Mapping):
        # Some of the seed's keys but not all: a seed-style batch with a key missing.
        wanted = [*config.input_keys, config.label_key]
        missing = [k for k in wanted if k not in holdout]
        if missing and len(missing) < len(wanted) and (forward_fn is None or config.label_key in missing):
            raise TelemetryConfigError(
                f"the holdout batches lack key(s) {missing} (they have {sorted(map(str, holdout))}): "
                "set input_keys/label_key in the config to your batch's keys, or pass forward_fn")
    try:
        return BatchFormat.resolve(holdout, config.input_keys, config.label_key, config.keys_are_default,
                                   need_inputs=forward_fn is None)
    except TelemetryConfigError as exc:
        raise TelemetryConfigError(f"the holdout batches: {exc}") from None


def set_up_model(config: TelemetryConfig, metrics: Sequence[Metric], needs: frozenset[str], model: torch.nn.Module,
                 optimizers: Sequence[torch.optim.Optimizer], *, sink: Sink, strategy: Strategy, groups: ParamGroups,
                 holdout: Any, fmt: BatchFormat | None, forward_fn: ForwardFn | None, segment: int,
                 checkpoint_name: str, init_reference: bool) -> Collector:
    """Build the slot pool and hand the sink its slots and the eval model on them (once).

    ``init_reference``: copy the weights now, as the first delta's reference (at start();
    not for a model that arrives with the first hook, whose weights have trained already).
    """
    inner = unwrap_model(model)
    layout = build_layout(inner)
    groups.update(optimizers, layout.params)  # not sent: the Setup below carries the map
    # Without weights to copy the slots hold no weights, but still bound how many
    # snapshots can wait for the worker: a slow or hung worker then costs drops, never memory.
    copy_weights = "weights" in needs
    slot_layout = layout if copy_weights else Layout(specs=[], params=layout.params, buffers=[], on_cuda=layout.on_cuda)
    replica_groups = strategy.replica_groups()
    pool = sink.slot_pool(slot_layout, strategy.info.world_size if replica_groups else 0)
    collector = Collector(config, needs, layout, pool)
    eval_model = None
    if "holdout" in needs and holdout is not None and copy_weights:
        try:  # sharded: a plain copy on the meta device; the worker points it at the assembled weights
            eval_model = strategy.eval_copy(inner, pool.slots[0])
        except Exception as exc:  # deepcopy pickles what it cannot copy: name the culprit
            raise TelemetryStartError(
                f"the model cannot be copied for the worker's holdout eval: {locate_unpicklable(inner, 'model', exc)}. "
                "Remove what cannot be pickled from the model (open files, locks, sockets), "
                "or set track_holdout_logits: false"
            ) from exc
    init_slot = None
    if init_reference and "weight_deltas" in needs:
        init_slot = sink.acquire()
        assert init_slot is not None
        torch._foreach_copy_(collector.dsts[init_slot], layout.live_sources())
        if layout.on_cuda:
            torch.cuda.current_stream().synchronize()  # once, at start: not the hot path
    with_eval = eval_model is not None
    label_name = fmt.label_name if fmt is not None and fmt.label_name else str(config.label_key)
    setup = Setup(
        # specs name the parameters for metrics even without weights
        specs=layout.specs if copy_weights else layout.specs[: layout.num_params],
        num_params=layout.num_params,
        slots=pool.slots if copy_weights else [],
        meta=pool.meta,
        model=eval_model,
        forward=HoldoutForward.for_model(inner, holdout, fmt, forward_fn) if with_eval else None,
        holdout=holdout if with_eval else None,
        holdout_labels=fmt.labels(holdout) if with_eval and fmt is not None else None,
        slice_batch=slice_batch,
        init_slot=init_slot,
        groups=groups.message(layout.num_params),
        metrics=list(metrics),
        needs=needs,
        segment=segment,
        module_types={name: plain_type_name(m) for name, m in inner.named_modules()},
        label_name=label_name,
        rank=strategy.info.rank,
        world_size=strategy.info.world_size,
        checkpoint_name=checkpoint_name,
        shards=strategy.plan if copy_weights else None,
        replica_groups=replica_groups,
    )
    sink.setup(setup, layout.on_cuda)
    return collector
