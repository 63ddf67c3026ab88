"""The trainer -> worker wire protocol, in milliseconds: the slot header and meta layout
round trips, the channel's acquire/publish/release, and the DDP label-count vector."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from train_telemetry.messages import (
    HEADER_BYTES,
    IN_AUX,
    IN_HEADER,
    IN_SLOT,
    NONE,
    Snapshot,
    read_header,
    write_header,
)
from train_telemetry.metrics.batch import COUNT_VECTOR_LEN, count_vector, unpack_count_vector
from train_telemetry.snapshot import Channel, meta_size, meta_views


def _snap(**changes: object) -> Snapshot:
    values: dict = dict(seq=7, ordinal=9, batch_idx=1200, step=4821, epoch=3, time=1.7e9 + 0.25, hook_ms=0.31, dropped_before=2,
                        dropped_total=5, batch_size=64, groups_version=4, grads=IN_SLOT, loss_kind=IN_HEADER,
                        accuracy_kind=IN_AUX, counts_kind=NONE, training=1, loss=0.693, learning_rates=[0.1, 1e-3])
    values.update(changes)
    return Snapshot(**values)


def test_header_round_trip_keeps_every_field() -> None:
    """Every field written by write_header comes back from read_header, in its slot."""
    channel = Channel(None, 3)
    sent = _snap()
    extra = {"labels": (0, "int64", (64,)), "errors": [{"where": "x", "type": "E", "message": "m"}]}
    write_header(channel.headers_view, 2, sent, pickle.dumps(extra))
    got = read_header(channel.headers_view, 2)
    assert got.slot == 2 and got.extra == extra
    for name in ("seq", "batch_idx", "epoch", "time", "hook_ms", "dropped_before", "dropped_total", "batch_size",
                 "groups_version", "grads", "loss_kind", "accuracy_kind", "counts_kind", "training", "loss",
                 "learning_rates"):
        assert getattr(got, name) == getattr(sent, name), name
    assert got.header_loss == 0.693 and got.rows == 64
    assert read_header(channel.headers_view, 0).seq == 0  # other slots untouched


def test_header_without_lrs_unknown_size_and_nan_loss() -> None:
    """No LRs stays None, batch_size -1 reads as unknown, a NaN loss survives."""
    channel = Channel(None, 1)
    write_header(channel.headers_view, 0, _snap(learning_rates=None, batch_size=-1, loss=math.nan), b"")
    got = read_header(channel.headers_view, 0)
    assert got.learning_rates is None and got.rows is None and math.isnan(got.loss) and got.extra == {}


def test_an_extra_too_big_for_the_header_becomes_an_error_entry() -> None:
    """Hook-side values that overflow the header are replaced by an error naming the overflow."""
    channel = Channel(None, 1)
    write_header(channel.headers_view, 0, _snap(), b"x" * HEADER_BYTES)
    errors = read_header(channel.headers_view, 0).extra["errors"]
    assert errors[0]["where"] == "header" and errors[0]["type"] == "OverflowError"


def test_meta_views_are_disjoint_and_sized() -> None:
    """norms, pre_clip, scalars, counts and aux do not overlap in a slot's meta buffer and have their sizes."""
    n_params = 5
    meta = [torch.zeros(meta_size(n_params), dtype=torch.uint8)]
    views = {name: v[0] for name, v in meta_views(meta, n_params).items()}
    norms, pre_clip, scalars, counts, aux = (views[k] for k in ("norms", "pre_clip", "scalars", "counts", "aux"))
    assert (norms.numel(), norms.dtype, pre_clip.numel(), scalars.numel(), counts.numel(), counts.dtype) == (
        n_params, torch.float64, n_params, 3, COUNT_VECTOR_LEN, torch.int64)
    norms.fill_(1.5)
    pre_clip.fill_(4.5)
    scalars.fill_(-2.0)
    counts.fill_(7)
    aux.fill_(9)
    assert norms.tolist() == [1.5] * n_params and pre_clip.tolist() == [4.5] * n_params
    assert scalars.tolist() == [-2.0] * 3
    assert set(counts.tolist()) == {7} and set(aux.tolist()) == {9}


def test_channel_acquire_publish_release_in_order() -> None:
    """Slots are handed out until none is free, published in order, and free again once released."""
    import multiprocessing

    channel = Channel(multiprocessing.get_context("spawn"), 2)
    a, b = channel.acquire(), channel.acquire()
    assert (a, b) == (0, 1) and channel.acquire() is None
    channel.publish(b)
    channel.publish(a)
    assert channel.take_published() == [1, 0] and channel.take_published() == []
    channel.release(1)
    assert channel.acquire() == 1 and channel.acquire() is None


@pytest.mark.parametrize("labels", [torch.tensor([0, 2, 2, 5]), [1, 1, 0], torch.tensor([0.0, 1.0])])
def test_count_vector_round_trip(labels: object) -> None:
    """A rank's label counts and batch size survive the vector (summed over ranks by all_reduce)."""
    flat = torch.as_tensor(labels).to(torch.int64).tolist()
    vec = count_vector(labels, len(flat), torch.device("cpu"))
    counts, size = unpack_count_vector((vec + vec).tolist())  # two identical ranks
    assert size == 2 * len(flat)
    assert counts == {c: 2 * flat.count(c) for c in set(flat)}


def test_count_vector_marks_regression_targets_and_missing_sizes() -> None:
    """Non-class labels give no counts; an unknown batch size gives no size."""
    counts, size = unpack_count_vector(count_vector(torch.tensor([0.5, 1.0]), None, torch.device("cpu")).tolist())
    assert counts is None and size is None
