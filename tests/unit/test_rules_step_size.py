"""lr_too_high on synthetic runs: a group whose steps move its weights by a large share of their
norm is named with its LR; the healthy run, and a single large first step, are not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train_telemetry.analysis import Diagnosis, diagnose, load_run
from train_telemetry.testing import make_meta, make_records, make_summary, write_run


def judge(tmp_path: Path, records: list[dict[str, Any]]) -> list[Diagnosis]:
    directory = write_run(tmp_path / "run", records, meta=make_meta(), summary=make_summary(len(records)))
    return [d for d in diagnose(load_run(directory)) if d.code == "lr_too_high"]


def test_a_group_whose_steps_rewrite_its_weights_is_named_with_its_lr(tmp_path: Path) -> None:
    records = make_records("healthy", n=12, every=1)
    for i, r in enumerate(records[2:6], 2):
        r["update_ratio"]["head"] = 0.5 + 0.1 * i  # the head's LR 100x too high
    [found] = judge(tmp_path, records)
    assert found.severity == "serious" and "group 'head'" in found.title
    # the first record has no update ratio (nothing to measure from)
    assert "in 4 of 11 records" in found.title and "up to 1 at step 5" in found.title, found.title
    assert "at LR 0.01" in found.title and "first at step 2" in found.title
    assert all(e.values["update_ratio_per_step.head"] >= 0.3 for e in found.evidence)
    assert "lower group 'head''s LR" in found.hint


def test_a_ratio_over_many_steps_is_read_per_step(tmp_path: Path) -> None:
    """Collected every 20 steps, a 0.9 change between records is 0.045 a step: not too high."""
    records = make_records("healthy", n=12, every=20)
    for r in records[2:8]:
        r["update_ratio"]["head"] = 0.9
    assert not judge(tmp_path, records)
    for r in records[2:8]:
        r["update_ratio"]["head"] = 9.0  # 0.45 a step
    [found] = judge(tmp_path / "b", records)
    assert "per step up to 0.45" in found.title, found.title


def test_healthy_steps_and_one_large_first_step_are_not_named(tmp_path: Path) -> None:
    assert not judge(tmp_path / "a", make_records("healthy", n=12, every=1))
    records = make_records("healthy", n=12, every=1)
    records[0]["update_ratio"]["head"] = 1.2  # Adam's first step on a fresh layer: once is no pattern
    records[1]["update_ratio"]["head"] = 0.4
    assert not judge(tmp_path / "b", records)
