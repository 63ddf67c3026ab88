"""Gradient clipping that keeps the pre-clip norms: ``Telemetry.clip_grad_norm_``.

Runs in: the training process, in the user's loop, in place of
``torch.nn.utils.clip_grad_norm_``. Same arguments, same return value (bit for bit: the
same grouping by device and dtype, the same fused ``_foreach_norm``, the same total and
the same scaling), the gradients clipped the same way. The per-parameter norms it computes
anyway are kept (0-d tensors, no sync) for the next collection, which records them per
param group as ``gradient_norm_pre_clip``: after clipping, ``gradient_norm`` is at most
``max_norm`` at every step, so a spike would never show in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = ["PreClip", "clip_grad_norm"]


@dataclass
class PreClip:
    """What one clip measured: each parameter's gradient norm before it was scaled."""

    params: list[torch.Tensor]
    norms: list[torch.Tensor]  # 0-d, on the gradients' devices; [i] is params[i]'s (L2 only)
    total: torch.Tensor  # what clip_grad_norm_ returned
    max_norm: float


def clip_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> tuple[torch.Tensor, PreClip]:
    """``torch.nn.utils.clip_grad_norm_``, plus what it measured on the way (:class:`PreClip`)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]  # the second test is for mypy
    norm_type = float(norm_type)
    if not grads:
        empty = torch.tensor(0.0)
        return empty, PreClip([], [], empty, float(max_norm))
    with torch.no_grad():
        by_param: list[torch.Tensor | None] = [None] * len(grads)
        in_torch_order: list[torch.Tensor] = []
        grouped: Any = _group_tensors_by_device_and_dtype([grads], with_indices=True)
        for (device, _), ([group], indices) in grouped.items():
            if (foreach is None and _has_foreach_support(group, device)) or (
                    foreach and _device_has_foreach_support(device)):
                norms = list(torch._foreach_norm(group, norm_type))
            elif foreach:
                raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
            else:
                norms = [torch.linalg.vector_norm(g, norm_type) for g in group]
            in_torch_order += norms
            for i, n in zip(indices, norms, strict=True):
                by_param[i] = n
        first = grads[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in in_torch_order]), norm_type)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`")
        _scale(grads, float(max_norm), total, foreach)
    kept = [n for n in by_param if n is not None] if norm_type == 2.0 else []
    return total, PreClip(params if kept else [], kept, total, float(max_norm))


def _scale(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor, foreach: bool | None) -> None:
    """torch's own scaling (``clip_grads_with_norm_``): grad *= min(max_norm / (total + 1e-6), 1)."""
    clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # a tensor op: no sync on CUDA
    grouped: Any = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
    for (device, _), ([group], _) in grouped.items():
        if (foreach is None and _has_foreach_support(group, device)) or (foreach and _device_has_foreach_support(device)):
            torch._foreach_mul_(group, clip_coef.to(device))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            coef = clip_coef.to(device)
            for g in group:
                g.mul_(coef)
