"""Every invalid config file gives one error that names the file, the field, the bad value and what is allowed.

The files are ``tests/data/invalid_*.yaml``; each must have a row in ``EXPECTED`` below, so
a new invalid file cannot go unchecked. No torch needed (config.py imports none).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from train_telemetry.config import TelemetryConfig, TelemetryConfigError

DATA = Path(__file__).resolve().parent.parent / "data"

# file -> fragments the error message must contain: (field, bad value, what is allowed)
EXPECTED: dict[str, tuple[str, ...]] = {
    "invalid_unknown_key.yaml": ("unknown key 'colect_every_n'", "did you mean 'collect_every_n'", "valid keys:"),
    "invalid_wrong_type.yaml": ("collect_every_n:", "'ten'", "expected an integer >= 1"),
    "invalid_negative_interval.yaml": ("collect_every_n:", "-5", "expected an integer >= 1"),
    "invalid_bad_enum.yaml": ("on_full:", "'wait'", "expected one of 'drop', 'block'"),
    "invalid_bool.yaml": ("track_gradients:", "'maybe'", "expected true or false"),
    "invalid_negative_timeout.yaml": ("stop_timeout_s:", "-1", "expected a number of seconds > 0"),
    "invalid_out_of_range.yaml": ("tuning.worker_nice:", "25", "expected an integer from 0 to 19"),
    "invalid_moved_key.yaml": ("'worker_nice' is no longer a setting", "tuning constant (worker_nice = 15",
                               "config.Tuning", "tuning: {worker_nice: ...}"),
    "invalid_float_for_int.yaml": ("num_slots:", "1.5", "expected an integer >= 1"),
    "invalid_metrics_list.yaml": ("'metrics' is no longer a key", "track_layers, track_activations, track_model_mode",
                                  "Telemetry(config, metrics=[...])"),
    "invalid_start_method.yaml": ("tuning.start_method:", "'thread'", "expected one of 'spawn', 'forkserver', 'fork'"),
    "invalid_lr_ratio.yaml": ("expected_lr_ratios.head:", "-10", "a number > 0"),
    "invalid_empty_input_keys.yaml": ("input_keys:", "[]", "name at least one batch key"),
    "invalid_not_a_mapping.yaml": ("expected a mapping of telemetry settings", "got list"),
    "invalid_syntax.yaml": ("not valid YAML", "line 3"),
}


def test_every_invalid_file_has_an_expected_error() -> None:
    """Each tests/data/invalid_*.yaml is covered by a row of EXPECTED, and each row by a file."""
    assert sorted(p.name for p in DATA.glob("invalid_*.yaml")) == sorted(EXPECTED)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_config_file_error_names_file_field_value_and_allowed(name: str) -> None:
    """Loading the invalid file raises TelemetryConfigError naming the file, the field, the value and what is allowed."""
    path = DATA / name
    with pytest.raises(TelemetryConfigError) as info:
        TelemetryConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in EXPECTED[name]:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    # One message, not a msgspec/yaml traceback chained in front of it.
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


@pytest.mark.timeout(30)
def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    """A config path that does not exist gives an error naming it, not a bare FileNotFoundError."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(TelemetryConfigError, match=rf"{path}: cannot read config file"):
        TelemetryConfig.from_yaml(path)


@pytest.mark.timeout(30)
def test_invalid_values_in_code_are_rejected_like_files() -> None:
    """The same checks guard TelemetryConfig(...) and from_dict(...): nothing invalid gets past construction."""
    with pytest.raises(TelemetryConfigError, match=r"collect_every_n: 0 is not valid: expected an integer >= 1"):
        TelemetryConfig(collect_every_n=0)
    with pytest.raises(TelemetryConfigError, match=r"input_keys\[1\]: 3.5 is not valid: expected a list of batch keys"):
        TelemetryConfig.from_dict({"input_keys": ["img1", 3.5]})
    with pytest.raises(TelemetryConfigError, match=r"^my.yaml: mode: 'fast' is not valid: expected one of 'auto', 'async', 'sync'"):
        TelemetryConfig.from_dict({"mode": "fast"}, source="my.yaml")
