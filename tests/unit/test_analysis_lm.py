"""Language-model runs: token holdouts, many-class batch stats, pre-clip gradient norms and the
``unassigned`` group, as report, diagnose, plot, watch, compare and export show them."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.analysis import (
    diagnose,
    load_run,
    render_comparison,
    render_report,
    report_data,
    report_json,
    save_dashboard,
    watch,
)
from train_telemetry.records import nonfinite_keys, validate_record
from train_telemetry.testing import make_summary, write_pathology, write_run

VOCAB = 50257  # GPT-2's
EXAMPLES = 16
MAX_NORM = 1.0


def _lm_meta() -> dict[str, Any]:
    """run.json of a LoRA fine-tune: one trained group, the frozen base in no optimizer group."""
    return {
        "schema": 1,
        # The default label_key: the batch format found "labels" (a Hugging Face batch) itself.
        "config": {"collect_every_n": 20, "label_key": "winner", "holdout_size": EXAMPLES},
        "groups": {
            "lora": {"num_params": 294912, "num_tensors": 24},
            "unassigned": {"num_params": 124439808, "num_tensors": 148},
        },
        "started": "2025-01-01T00:00:00",
        "pid": 4242,
        "torch_version": "2.13.0",
    }


def _lm_records(
    n: int = 20,
    *,
    pre_clip: list[float] | None = None,
    clip: str = "pre_clip",
    holdout_loss: list[float] | None = None,
    train_loss: list[float] | None = None,
    unassigned_grad: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``n`` records of a GPT-2 LoRA fine-tune as the collector writes them.

    ``pre_clip``: the overall gradient norm before clipping at :data:`MAX_NORM`, per record;
    ``clip`` says how it is recorded: "pre_clip" (``gradient_norm_pre_clip``, our clip helper),
    "clipping" (``gradient_clipping`` only, the Hugging Face integration) or "post_only"
    (neither: only the applied norms, which clipping capped at MAX_NORM).
    """
    rng = random.Random(seed)

    def noisy(x: float, spread: float = 0.05) -> float:
        return x * (1 + rng.uniform(-spread, spread))

    start = [noisy(3.4, 0.2) for _ in range(EXAMPLES)]
    records = []
    for i in range(n):
        t = i / max(n - 1, 1)
        loss = holdout_loss[i] if holdout_loss else 3.4 - 0.6 * t
        acc = round(0.30 + 0.1 * (3.4 - loss), 4)
        # Sequence 5 gets worse as the others improve.
        example_loss = [x * (1 + 0.1 * t) if k == 5 else x * loss / 3.4 for k, x in enumerate(start)]
        raw = pre_clip[i] if pre_clip else noisy(0.6)
        applied = min(raw, MAX_NORM)
        lr = 2e-4 * min(1.0, (i + 1) / 3)
        delta = noisy(0.01) if i else None
        record: dict[str, Any] = {
            "schema": 1,
            "batch_idx": i * 20,
            "epoch": 0,
            "seq": i,
            "timestamp": f"2025-01-01T00:00:{i:02d}",
            "time": 1735689600.0 + i,
            "gradient_norm": {"overall": applied, "lora": applied, "unassigned": unassigned_grad},
            "weight_delta": {"overall": delta, "lora": delta, "unassigned": 0.0 if i else None},
            "weight_norm": {"overall": 1061.0, "lora": 4.0, "unassigned": 1061.0},
            "update_ratio": {
                "overall": delta / 1061.0 if delta else None,
                "lora": delta / 4.0 if delta else None,
                "unassigned": 0.0 if i else None,
            },
            "learning_rates": {"group_0": lr, "lora": lr},
            "holdout_logits": {
                "loss": loss,
                "accuracy": acc,
                "perplexity": math.exp(loss),
                "tokens": 1984,
                "example_loss": example_loss,
                "example_accuracy": [acc] * EXAMPLES,
                "scored": "shifted",
            },
            "batch_stats": {
                "batch_size": 8,
                "tokens": 960 + 8 * (i % 5),
                "ignored_pct": 6.25 + (i % 3),
                "distinct_labels": 420 + i,
                "labels_13_pct": 4.5,
                "labels_11_pct": 3.9,
                "labels_262_pct": 3.1,
                "labels_290_pct": 2.2,
                "labels_50256_pct": 1.0 + (i % 2),
            },
            "train": {
                "loss": train_loss[i] if train_loss else noisy(3.5 - 0.6 * t),
                "accuracy": round(noisy(0.3 + 0.06 * t), 4),
            },
            "telemetry": {"hook_ms": noisy(2.0, 0.3), "dropped_before": 0, "dropped_total": 0,
                          "worker_lag_ms": noisy(40.0, 0.3), "built_by": "worker"},
        }
        if clip == "pre_clip":
            record["gradient_norm_pre_clip"] = {"overall": raw, "lora": raw, "unassigned": None}
        if clip in ("pre_clip", "clipping"):
            record["gradient_clipping"] = {"max_norm": MAX_NORM, "pre_clip_norm": raw}
        nonfinite = nonfinite_keys(record)
        if nonfinite:
            record["nonfinite"] = nonfinite
        validate_record(record)
        records.append(record)
    return records


def _write(directory: Path, records: list[dict[str, Any]]) -> Path:
    return write_run(directory, records, meta=_lm_meta(), summary=make_summary(len(records)))


def _spikes(n: int = 20) -> list[float]:
    """Pre-clip norms around 0.6 with spikes to 50 at three late records."""
    rng = random.Random(1)
    return [50.0 if i in (11, 14, 17) else 0.6 * (1 + rng.uniform(-0.1, 0.1)) for i in range(n)]


def test_lm_report_reads_as_a_language_model(tmp_path: Path) -> None:
    """A 50k-vocab run's report shows per-token loss, perplexity, accuracy and sequences, in a handful of lines."""
    data = report_data(load_run(_write(tmp_path / "run", _lm_records())))
    text = render_report(data)
    lines = text.splitlines()
    assert len(lines) < 80, text
    for needle in (
        "holdout (16 sequences, 1984 tokens scored)",
        "scored: the next token at each position (the labels are the inputs, shifted by the model)",
        "per-token loss      3.4 -> 2.8 (best 2.8 at step 380)",
        "perplexity          30 -> 16.4",
        "per-token accuracy  0.3 -> 0.36",
        "per sequence, step 0 -> 380: 15 better, 1 worse, 0 unchanged of 16",
        "worse most: #5",
        "batch tokens ('labels', 8 sequences per batch, 20 batches recorded)",
        "labelled tokens per batch",
        "distinct labels per batch 430 mean (420..439)",
        "most common labels (each batch's top 5, pooled): 13: 4.5%",
        "'unassigned': parameters not in any optimizer group (frozen)",
        "gradient norm (pre-clip)",
        "clipping at max_norm 1: 0 of 20 records clipped",
    ):
        assert needle in text, f"{needle!r} not in\n{text}"
    assert "class" not in text.replace("single-class", "")
    assert "chance" not in text
    assert data["serious"] is False, text
    assert [d["code"] for d in data["diagnoses"]] == [], text


def test_lm_report_json_is_strict_and_says_sequence(tmp_path: Path) -> None:
    """--json carries the token holdout's perplexity and per-sequence changes, and the batch token counts."""
    data = report_data(load_run(_write(tmp_path / "run", _lm_records())))
    parsed = json.loads(report_json(data))
    holdout = parsed["summary"]["holdout"]
    assert holdout["kind"] == "sequence" and holdout["scored"] == "shifted"
    assert holdout["perplexity"]["last"] == pytest.approx(math.exp(2.8))
    assert holdout["per_example"]["worst"][0]["example"] == 5
    batches = parsed["summary"]["batches"]
    assert batches["kind"] == "tokens" and batches["label_key"] == "labels"
    assert list(batches["top_label_pct"])[:2] == ["13", "11"]


def test_pre_clip_spikes_are_exploding_but_post_clip_norms_cannot_show_them(tmp_path: Path) -> None:
    """Pre-clip spikes to 50 with max_norm 1 are flagged; the same run's applied norms alone (all <= 1) are not."""
    pre = load_run(_write(tmp_path / "pre", _lm_records(pre_clip=_spikes())))
    found = [d for d in diagnose(pre) if d.code == "exploding_gradients"]
    assert [d.subject for d in found] == ["lora"]
    assert "pre-clip gradient norm spiked to 50" in found[0].title
    assert "clipping at max_norm 1 hid them" in found[0].title
    assert found[0].evidence[0].values == {
        "gradient_norm_pre_clip": 50.0, "gradient_norm": MAX_NORM, "lr": pytest.approx(2e-4)
    }

    post = load_run(_write(tmp_path / "post", _lm_records(pre_clip=_spikes(), clip="post_only")))
    assert max(v for _, v in post.series("gradient_norm", "overall")) <= MAX_NORM
    assert [d.code for d in diagnose(post) if d.code == "exploding_gradients"] == []


def test_hugging_face_pre_clip_norm_is_read_for_each_group(tmp_path: Path) -> None:
    """With gradient_clipping alone (the HF integration), each group's norm is scaled back to before clipping."""
    run = load_run(_write(tmp_path / "run", _lm_records(pre_clip=_spikes(), clip="clipping")))
    assert run.gradient_norm_source("lora") == "gradient_clipping.pre_clip_norm"
    assert max(v for _, v in run.gradient_norm_series("lora")) == pytest.approx(50.0)
    assert [d.subject for d in diagnose(run) if d.code == "exploding_gradients"] == ["lora"]
    text = render_report(report_data(run))
    assert "gradient norm (pre-clip)" in text
    assert "clipping at max_norm 1: 3 of 20 records clipped, pre-clip norm up to 50" in text


def test_one_pre_clip_spike_that_settles_is_not_flagged(tmp_path: Path) -> None:
    """A single clipped spike is left alone, as a single spike is without clipping."""
    pre = [50.0 if i == 12 else 0.6 for i in range(20)]
    run = load_run(_write(tmp_path / "run", _lm_records(pre_clip=pre)))
    assert [d.code for d in diagnose(run) if d.code == "exploding_gradients"] == []


def test_unassigned_group_without_gradients_is_not_frozen_group(tmp_path: Path) -> None:
    """The frozen base (no optimizer group, null gradients, zero delta) raises no frozen_group."""
    run = load_run(_write(tmp_path / "run", _lm_records()))
    assert "unassigned" in run.groups
    assert [d for d in diagnose(run) if d.code in ("frozen_group", "vanishing_gradients")] == []


def test_unassigned_group_receiving_gradients_is_a_warning(tmp_path: Path) -> None:
    """Parameters in no optimizer group that still get gradients are named, as a warning."""
    run = load_run(_write(tmp_path / "run", _lm_records(unassigned_grad=0.3)))
    found = [d for d in diagnose(run) if d.code == "frozen_group"]
    assert [(d.subject, d.severity) for d in found] == [("unassigned", "warning")]
    assert "receive gradients" in found[0].title
    assert "yet gradients reached them in 20 records" in render_report(report_data(run))


def test_lm_holdout_loss_rising_while_train_falls_is_overfitting(tmp_path: Path) -> None:
    """A token holdout whose loss rises again while the train loss falls is overfitting, in loss and perplexity."""
    holdout = [3.4 - 0.1 * i if i < 8 else 2.6 + 0.08 * (i - 8) for i in range(20)]
    run = load_run(_write(tmp_path / "run", _lm_records(holdout_loss=holdout)))
    found = [d for d in diagnose(run) if d.code == "overfitting"]
    assert len(found) == 1 and found[0].severity == "serious"
    assert "holdout per-token loss rose from" in found[0].title
    assert "perplexity" in found[0].title


def test_lm_holdout_loss_that_does_not_move_is_no_learning(tmp_path: Path) -> None:
    """A token holdout loss and train loss that stay put is no_learning (no chance level needed)."""
    flat = [3.4] * 20
    run = load_run(_write(tmp_path / "run", _lm_records(holdout_loss=flat, train_loss=flat)))
    codes = [d.code for d in diagnose(run)]
    assert "no_learning" in codes and "overfitting" not in codes


def test_no_holdout_note_names_set_holdout_data(tmp_path: Path) -> None:
    """A run without a holdout tells users to call set_holdout_data()."""
    records = _lm_records(n=4)
    for record in records:
        del record["holdout_logits"]
    text = render_report(report_data(load_run(_write(tmp_path / "run", records))))
    assert "call set_holdout_data() to track fixed examples" in text
    assert "set_holdout()" not in text


def test_lm_dashboard_is_drawn_without_a_class_per_token(tmp_path: Path) -> None:
    """plot on LM records writes the image, with tokens per batch and per-sequence loss panels, all with data."""
    pytest.importorskip("matplotlib")
    run = load_run(_write(tmp_path / "run", _lm_records(pre_clip=_spikes())))
    info = save_dashboard(run, tmp_path / "dash.png", dpi=50)
    assert info.path.stat().st_size > 0
    assert {"batch tokens", "holdout loss per sequence"} <= set(info.panels)
    assert "batch balance" not in info.panels
    assert info.empty_panels == []


def test_watch_compare_and_export_show_token_holdouts(tmp_path: Path) -> None:
    """watch prints holdout loss and perplexity, compare a perplexity row, export one row per sequence."""
    lm = _write(tmp_path / "lm", _lm_records(pre_clip=_spikes()))
    out = io.StringIO()
    watch(lm, out=out, once=True, tail=1)
    assert "holdout loss 2.8 ppl 16.4 acc 0.36" in out.getvalue()
    assert "| pre-clip lora 0.5" in out.getvalue()
    classifier = write_pathology(tmp_path / "clf", "healthy")
    table = render_comparison([report_data(load_run(lm)), report_data(load_run(classifier))])
    assert "holdout perplexity" in table
    pd = pytest.importorskip("pandas")
    from train_telemetry.analysis import holdout_dataframe, to_dataframe

    examples = holdout_dataframe(load_run(lm))
    assert isinstance(examples, pd.DataFrame)
    assert len(examples) == 20 * EXAMPLES and {"loss", "accuracy"} <= set(examples.columns)
    assert "holdout_logits.example_loss" not in to_dataframe(load_run(lm)).columns


def test_token_classification_batches_show_tokens_and_skip_the_imbalance_warning(tmp_path: Path) -> None:
    """Per-token class labels (a tagger, "O" at 85%) show tokens per batch and are not called imbalanced."""
    records = _lm_records()
    for i, record in enumerate(records):
        record["batch_stats"] = {
            "batch_size": 8, "tokens": 900 + i, "ignored_pct": 10.0,
            "labels_0_pct": 85.0, "labels_1_pct": 10.0, "labels_2_pct": 5.0,
        }
    run = load_run(_write(tmp_path / "run", records))
    text = render_report(report_data(run))
    assert "batch balance ('labels', batch size 8, 20 batches recorded)" in text
    assert "labelled tokens per batch 910 mean (900..919); ignored (label < 0) 10.0% mean" in text
    assert "0: 85.0%  1: 10.0%  2: 5.0%" in text
    assert [d.code for d in diagnose(run) if d.code == "data_imbalance"] == []
