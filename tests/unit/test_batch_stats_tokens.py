"""Batch statistics and train accuracy of token labels: bounded counts, ignored labels, shifted scoring.

Pure functions of metrics/batch.py and collect.py, each checked against an independent
torch computation on the same tensors.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from train_telemetry.collect import labels_are_inputs
from train_telemetry.metrics.batch import (
    MAX_CLASSES,
    LabelCounts,
    batch_accuracy,
    batch_label_stats,
    count_vector,
    label_counts,
    unpack_count_vector,
)

VOCAB = 50257  # GPT-2's


def token_labels(rows: int, length: int, seed: int = 0, ignore_from: int | None = None) -> torch.Tensor:
    """Random GPT-2 ids, skewed so that the top shares are not all ties; -100 from ``ignore_from`` on."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels[:, ::3] = torch.randint(0, 7, (rows, (length + 2) // 3), generator=g)  # a few frequent ids
    if ignore_from is not None:
        labels[:, ignore_from:] = -100
    return labels


def expected_top(labels: torch.Tensor, k: int = 5) -> list[tuple[int, int]]:
    """The k most frequent ids >= 0 (ties: smaller id first), by torch.unique and a sort."""
    ids, counts = torch.unique(labels[labels >= 0], return_counts=True)
    pairs = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    return pairs[:k]


def test_label_counts_count_ids_and_report_the_ignored_ones() -> None:
    """Ids >= 0 are counted as torch.unique counts them; -100 entries are the ignored count."""
    labels = token_labels(4, 32, ignore_from=24)
    counts = label_counts(labels)
    assert counts is not None
    kept = labels[labels >= 0]
    ids, n = torch.unique(kept, return_counts=True)
    assert counts == dict(zip(ids.tolist(), n.tolist(), strict=True))
    assert counts.tokens == kept.numel() == 4 * 24
    assert counts.ignored == int((labels < 0).sum()) == 4 * 8
    assert counts.distinct == ids.numel()
    assert counts.num_classes == int(kept.max()) + 1
    assert counts.per_element


def test_the_hook_summary_keeps_only_the_top_ids_and_stays_small() -> None:
    """top=5 keeps the five largest counts of a 50k-id batch and still describes the whole batch."""
    labels = token_labels(64, 2048, seed=1)
    full, summary = label_counts(labels), label_counts(labels, top=5)
    assert full is not None and summary is not None
    assert list(summary.items()) == expected_top(labels)
    assert (summary.tokens, summary.distinct, summary.num_classes) == (full.tokens, full.distinct, full.num_classes)
    assert len(pickle.dumps(summary, pickle.HIGHEST_PROTOCOL)) < 1024  # the header holds it per step


def test_many_class_batch_stats_are_a_bounded_summary() -> None:
    """[8, 512] random GPT-2 ids: batch_size, tokens, ignored_pct, distinct_labels and the top five shares only."""
    labels = token_labels(8, 512, seed=2, ignore_from=500)
    stats = batch_label_stats(label_counts(labels), 8, "labels", 0)
    kept = labels[labels >= 0]
    top = expected_top(labels)
    assert stats == pytest.approx({
        "batch_size": 8,
        "tokens": kept.numel(),
        "ignored_pct": 100.0 * float((labels < 0).float().mean()),
        "distinct_labels": torch.unique(kept).numel(),
        **{f"labels_{i}_pct": 100.0 * n / kept.numel() for i, n in top},
    })
    assert len(json.dumps(stats)) < 400


def test_classification_keeps_every_class_share_and_adds_tokens_only_for_token_labels() -> None:
    """One label per row: the class shares and batch_size as before; [B, T] labels with -100 add tokens and ignored_pct."""
    rows = torch.tensor([0, 2, 2, 1, 2])
    assert batch_label_stats(label_counts(rows), 5, "y", 4) == pytest.approx(
        {"y_0_pct": 20.0, "y_1_pct": 20.0, "y_2_pct": 60.0, "y_3_pct": 0.0, "batch_size": 5})
    tags = torch.tensor([[0, 3, 3, -100], [1, 3, -100, -100]])
    kept = tags[tags >= 0]
    shares = torch.bincount(kept, minlength=4).double() * 100.0 / kept.numel()
    assert batch_label_stats(label_counts(tags), 2, "labels", 0) == pytest.approx(
        {**{f"labels_{c}_pct": float(v) for c, v in enumerate(shares)}, "batch_size": 2,
         "tokens": kept.numel(), "ignored_pct": 100.0 * 3 / 8})


def test_the_ddp_vector_counts_ignored_labels_and_drops_shares_beyond_it() -> None:
    """-100 is ignored, not uncounted; ids past MAX_CLASSES keep tokens and ignored_pct, without class shares."""
    cpu = torch.device("cpu")
    small = torch.tensor([[3, 70, -100], [70, 70, -100]])  # a character vocabulary (> 64 ids)
    counts, size = unpack_count_vector((count_vector(small, 2, cpu) * 2).tolist())  # two identical ranks
    assert size == 4 and counts == {3: 2, 70: 6} and (counts is not None and counts.ignored == 4)
    assert batch_label_stats(counts, size, "y", 0) == pytest.approx(
        {"batch_size": 4, "tokens": 8, "ignored_pct": 100.0 * 4 / 12, "distinct_labels": 2, "y_70_pct": 75.0, "y_3_pct": 25.0})
    big = token_labels(2, 16, seed=3, ignore_from=12)
    assert int(big.max()) >= MAX_CLASSES
    counts, size = unpack_count_vector(count_vector(big, 2, cpu).tolist())
    assert isinstance(counts, LabelCounts) and not counts.known
    assert batch_label_stats(counts, size, "y", 0) == pytest.approx(
        {"batch_size": 2, "tokens": 24, "ignored_pct": 100.0 * 8 / 32, "distinct_labels": None})


def test_accuracy_leaves_out_ignored_labels() -> None:
    """[B, T, V] logits against [B, T] labels with -100: the share right among the scored positions."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, 7, generator=g)
    labels = torch.randint(0, 7, (3, 10), generator=g)
    labels[logits.argmax(-1) == labels] = -100  # every right prediction ignored, some wrong ones kept
    labels[:, :2] = logits.argmax(-1)[:, :2]  # ... and six right ones scored
    scored = labels >= 0
    want = float((logits.argmax(-1) == labels)[scored].float().mean())
    assert float(batch_accuracy(logits, labels)) == pytest.approx(want)
    assert want == pytest.approx(6 / int(scored.sum()))


def test_shifted_accuracy_scores_each_position_against_the_next_label() -> None:
    """shift=True compares logits[:, :-1] with labels[:, 1:], ignoring -100, as a causal LM's loss does."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 9, 5, generator=g)
    labels = torch.randint(0, 5, (2, 9), generator=g)
    labels[:, 1:][logits[:, :-1].argmax(-1) == labels[:, 1:]] = -100
    labels[:, 1:4] = logits[:, :3].argmax(-1)  # three right next-token predictions per row
    labels[1, 7:] = -100  # padding
    target = labels[:, 1:]
    want = float((logits[:, :-1].argmax(-1) == target)[target >= 0].float().mean())
    assert float(batch_accuracy(logits, labels, shift=True)) == pytest.approx(want)
    assert float(batch_accuracy(logits, labels, shift=True)) != pytest.approx(float(batch_accuracy(logits, labels)))


def test_accuracy_with_every_label_ignored_is_nan() -> None:
    """No scored label: NaN (recorded as null), not 0."""
    assert torch.isnan(batch_accuracy(torch.randn(2, 4, 3), torch.full((2, 4), -100)))


def test_labels_are_inputs_only_for_a_dict_whose_labels_are_its_input_ids() -> None:
    """A Hugging Face causal LM batch shifts; nanoGPT's shifted targets and (x, y) tuples do not."""
    ids = torch.randint(0, 50, (2, 8))
    logits = torch.randn(2, 8, 50)
    hf_labels = ids.masked_fill(torch.arange(8) >= 6, -100)
    assert labels_are_inputs({"input_ids": ids, "attention_mask": torch.ones(2, 8), "labels": hf_labels},
                             hf_labels, logits)
    targets = torch.roll(ids, -1, dims=1)
    assert not labels_are_inputs({"input_ids": ids, "labels": targets}, targets, logits)
    assert not labels_are_inputs((ids, ids), ids, logits)
    assert not labels_are_inputs({"input_ids": ids, "labels": ids}, ids, torch.randn(2, 50))  # no per-position logits
