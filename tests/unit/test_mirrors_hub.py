"""Mirrors without a tracker or a training run: the config, the hub's isolation (a raising, a
slow and a hung tracker cost their own mirror only) and what a mirror is sent."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from train_telemetry.config import (
    MIRROR_NAMES,
    MIRROR_OPTIONS,
    TelemetryConfig,
    TelemetryConfigError,
)
from train_telemetry.mirrors import MIRRORS, BaseMirror, MirrorContext, MirrorHub, read_stats
from train_telemetry.mirrors.base import record_scalars, record_step
from train_telemetry.records import decode_typed_record
from train_telemetry.testing import make_records

README = Path(__file__).resolve().parents[2] / "README.md"


def records(n: int = 6) -> list[Any]:
    return [decode_typed_record(r) for r in make_records(n=n)]


class Collect(BaseMirror):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = False
        self.diagnoses: list[str] | None = None

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.steps.append(step)

    def log_diagnoses(self, diagnoses: list[dict[str, Any]], text: str) -> None:
        self.diagnoses = [d["code"] for d in diagnoses]

    def close(self) -> None:
        self.closed = True


class Raising(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise ConnectionError("tracker down")


class Slow(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        time.sleep(0.7)


class Hung(BaseMirror):
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        threading.Event().wait()


def hub(tmp_path: Path, **mirrors: Any) -> MirrorHub:
    return MirrorHub([(name, (lambda m=m: m)) for name, m in mirrors.items()],
                     MirrorContext(run_dir=tmp_path, run_name="run"), stats_file=tmp_path / "t.mirrors.json",
                     warn=lambda key, message: None, queue_size=4)


# --- config ---------------------------------------------------------------------------------

def test_mirror_accepts_a_name_a_list_or_a_mapping_with_options() -> None:
    """`mirror:` is a tracker, a list of them, or a mapping of tracker to its options."""
    assert TelemetryConfig(mirror="tensorboard").mirrors == [("tensorboard", {})]
    assert TelemetryConfig(mirror=["tensorboard", "mlflow"]).mirrors == [("tensorboard", {}), ("mlflow", {})]
    config = TelemetryConfig(mirror={"mlflow": {"tracking_uri": "sqlite:///m.db"}, "wandb": None})
    assert config.mirrors == [("mlflow", {"tracking_uri": "sqlite:///m.db"}), ("wandb", {})]
    assert TelemetryConfig.from_dict(config.to_dict()) == config
    assert TelemetryConfig(mirror=[]).mirrors == []


def test_an_unknown_tracker_is_an_error_naming_the_valid_ones() -> None:
    """A typo names the closest tracker and lists every valid one."""
    with pytest.raises(TelemetryConfigError, match=r"unknown tracker 'mlfow'; did you mean 'mlflow'\? valid: "
                       r"tensorboard, mlflow, wandb, trackio, framework"):
        TelemetryConfig(mirror=["mlfow"])


def test_an_unknown_option_names_the_trackers_options() -> None:
    """A tracker's options are checked at config time, with its valid options listed."""
    with pytest.raises(TelemetryConfigError, match=r"mirror.mlflow: unknown option 'tracking_url'; did you mean "
                       r"'tracking_uri'\?"):
        TelemetryConfig(mirror={"mlflow": {"tracking_url": "x"}})
    with pytest.raises(TelemetryConfigError, match=r"mirror.wandb: .*mode"):
        TelemetryConfig(mirror={"wandb": {"mode": "sometimes"}})


def test_a_mirror_class_given_in_python_is_kept_as_its_import_path() -> None:
    """Your own tracker is one class; the config keeps its import path (the worker imports it)."""
    config = TelemetryConfig(mirror={Collect: {}})
    assert config.mirrors == [(f"{__name__}:Collect", {})]


def test_every_tracker_is_registered_has_options_and_a_readme_section() -> None:
    """The registry, the config's option classes and README's mirror sections name the same trackers."""
    assert tuple(MIRRORS) == MIRROR_NAMES == tuple(MIRROR_OPTIONS)
    text = README.read_text(encoding="utf-8")
    sections = re.findall(r"^#### Mirror: `([a-z]+)`", text, re.M)
    assert sections == list(MIRROR_NAMES)
    assert "train-telemetry mirror" in text


# --- what a mirror is sent ------------------------------------------------------------------

def test_scalars_are_exports_columns_and_the_step_is_the_records_step() -> None:
    """Series names are export's columns (numbers only, bookkeeping left out); the step axis is
    the record's step, its batch_idx where it has none."""
    from train_telemetry.analysis.export import flatten_record

    record = records(2)[1]
    scalars = record_scalars(record)
    columns = flatten_record(record)
    assert "gradient_norm.overall" in scalars and "holdout_logits.accuracy" in scalars
    assert all(scalars[k] == columns[k] for k in scalars)
    assert not {"batch_idx", "seq", "schema", "time", "step"} & set(scalars)
    assert record_step(record) == (record.step if "step" in record else record.batch_idx)
    assert all(k.startswith("tt/") for k in record_scalars(record, "tt/"))


# --- isolation ------------------------------------------------------------------------------

def test_a_raising_tracker_costs_its_own_records_only(tmp_path: Path) -> None:
    """Every call raising: counted as failed and dropped; the mirror beside it gets everything."""
    good, h = Collect(), None
    h = hub(tmp_path, good=good, bad=Raising())
    for r in records(3):
        h.feed(r)
    stats = h.close(time.monotonic() + 10)
    assert good.steps == [record_step(r) for r in records(3)] and good.closed
    assert (stats["bad"].sent, stats["bad"].dropped, stats["bad"].failed_calls) == (0, 3, 3)
    assert stats["bad"].error == "ConnectionError: tracker down"
    assert read_stats(tmp_path / "t.mirrors.json") == stats


def test_a_tracker_that_cannot_be_opened_fails_alone(tmp_path: Path) -> None:
    """A tracker that is not installed fails its mirror (state failed), not the others."""
    good = Collect()
    h = MirrorHub([("good", lambda: good), ("missing", lambda: __import__("no_such_tracker_module"))],
                  MirrorContext(run_dir=tmp_path, run_name="run"), warn=lambda k, m: None)
    for r in records(3):
        h.feed(r)
    stats = h.close(time.monotonic() + 10)
    assert stats["missing"].state == "failed" and stats["missing"].dropped == 3
    assert "ModuleNotFoundError" in (stats["missing"].error or "")
    assert len(good.steps) == 3


def test_feed_never_waits_and_a_full_queue_drops_its_oldest(tmp_path: Path) -> None:
    """A hung tracker: feed returns at once, the queue keeps the newest records (oldest dropped),
    and close abandons the mirror at its deadline, counting what it held."""
    h = hub(tmp_path, hung=Hung())
    rs = [decode_typed_record(r) for r in make_records(n=12)]
    t0 = time.perf_counter()
    for r in rs:
        h.feed(r)
    assert time.perf_counter() - t0 < 0.5
    t0 = time.monotonic()
    stats = h.close(time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 2.0
    hung = stats["hung"]
    assert hung.state == "abandoned" and hung.sent == 0 and hung.dropped == 12


def test_a_slow_tracker_is_abandoned_at_the_deadline_with_its_backlog_counted(tmp_path: Path) -> None:
    """700 ms a call: what it could send by the deadline is sent, the rest counted as dropped."""
    h = hub(tmp_path, slow=Slow())
    for r in records(4):
        h.feed(r)
    stats = h.close(time.monotonic() + 1.0)["slow"]
    assert stats.state == "abandoned"
    assert stats.sent + stats.dropped == 4 and stats.sent >= 1


def test_at_close_a_slow_tracker_keeps_its_time_and_a_hung_one_is_abandoned_early(tmp_path: Path) -> None:
    """stall_s: a tracker whose calls return (700 ms each) sends everything; one whose call never
    returns is abandoned after stall_s, long before the deadline."""
    h = hub(tmp_path, slow=Slow(), hung=Hung())
    for r in records(3):
        h.feed(r)
    t0 = time.monotonic()
    stats = h.close(time.monotonic() + 30, stall_s=1.0)
    assert time.monotonic() - t0 < 10
    assert (stats["slow"].sent, stats["slow"].state) == (3, "ok")
    assert (stats["hung"].sent, stats["hung"].dropped, stats["hung"].state) == (0, 3, "abandoned")
