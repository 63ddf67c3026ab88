"""TelemetryConfig: the seed's keys and defaults, loading from dict/YAML, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train_telemetry import TelemetryConfig, TelemetryConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_seed_keys_keep_their_names_and_defaults() -> None:
    """Every key of the seed design exists with the seed's default."""
    c = TelemetryConfig()
    assert (c.enabled, c.collect_every_n, c.output_dir, c.holdout_size) == (True, 200, None, 50)
    assert c.track_gradients and c.track_weight_delta and c.track_learning_rates
    assert c.track_holdout_logits and c.track_batch_stats
    assert (c.input_keys, c.label_key, c.mode, c.on_full) == (["img1", "img2"], "winner", "auto", "drop")


def test_default_yaml_lists_every_key_with_its_default() -> None:
    """configs/default.yaml names every field, and loading it gives the defaults."""
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["telemetry"]
    assert sorted(data) == sorted(TelemetryConfig.field_names())
    assert TelemetryConfig.from_yaml(ROOT / "configs" / "default.yaml") == TelemetryConfig()


def test_from_yaml_accepts_a_top_level_mapping_or_a_telemetry_section(tmp_path: Path) -> None:
    """The keys may sit at the top of the file or under `telemetry:`."""
    top = tmp_path / "top.yaml"
    top.write_text("collect_every_n: 7\noutput_dir: out\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: {depth: 3}\ntelemetry:\n  collect_every_n: 7\n  output_dir: out\n")
    assert TelemetryConfig.from_yaml(top) == TelemetryConfig.from_yaml(nested) == TelemetryConfig(collect_every_n=7, output_dir="out")


def test_unknown_key_names_the_closest_valid_key() -> None:
    """A typo is an error that names it and suggests the key meant (the seed silently dropped it)."""
    with pytest.raises(TelemetryConfigError, match=r"unknown key 'collect_every'.*did you mean 'collect_every_n'"):
        TelemetryConfig.from_dict({"collect_every": 10})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"collect_every_n": 0}, r"collect_every_n: 0 .*an integer >= 1"),
        ({"collect_every_n": "10"}, r"collect_every_n: '10' .*an integer >= 1"),
        ({"mode": "threaded"}, r"mode: 'threaded' .*one of 'auto', 'async', 'sync'"),
        ({"track_gradients": "yes"}, r"track_gradients: 'yes' .*true or false"),
        ({"holdout_size": 2.5}, r"holdout_size: 2.5 "),
        ({"input_keys": []}, r"input_keys: \[\]"),
    ],
)
def test_wrong_values_name_the_field_the_value_and_what_is_allowed(changes: dict, pattern: str) -> None:
    """A bad value raises an error with the field, the value and the allowed values."""
    with pytest.raises(TelemetryConfigError, match=pattern):
        TelemetryConfig.from_dict(changes)
    with pytest.raises(TelemetryConfigError, match=pattern):
        TelemetryConfig(**changes)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    """Errors from a file start with the file's path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("telemetry:\n  on_full: wait\n")
    with pytest.raises(TelemetryConfigError, match=rf"^{bad}: on_full: 'wait'"):
        TelemetryConfig.from_yaml(bad)


def test_output_dir_accepts_a_path() -> None:
    """output_dir may be given as a pathlib.Path, as in the seed's example."""
    assert TelemetryConfig(output_dir=Path("a") / "b").output_dir == str(Path("a") / "b")  # type: ignore[arg-type]


def test_config_module_imports_no_torch() -> None:
    """config and records load without torch, so runs and configs can be read anywhere."""
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import train_telemetry.config, train_telemetry.records; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
