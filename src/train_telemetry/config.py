"""TelemetryConfig: every setting of a telemetry run, its YAML/dict loading and validation.

Runs in: the training process (and, pickled, in the worker). Imports no torch and no
other module of this package, so configs can be checked where torch is absent.

The seed design's keys keep their names and defaults (``enabled``, ``collect_every_n``,
``output_dir``, ``track_*``, ``holdout_size``); the rest are what the asynchronous design
needs. ``configs/default.yaml`` lists every key with a one-line comment; keep the two in
step (a unit test checks that they agree).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

__all__ = ["MIRROR_NAMES", "TelemetryConfig", "TelemetryConfigError", "Tuning"]


class TelemetryConfigError(ValueError):
    """A setting, a config file or a start-up condition is wrong; the message says the fix."""


DEFAULT_INPUT_KEYS = ("img1", "img2")
DEFAULT_LABEL_KEY = "winner"
# The built-in metrics beyond the seed's five, each turned on and off by its track_<name>
# key like the seed's (train_telemetry.metrics registers each).
BUILTIN_METRICS = ("layers", "activations", "model_mode")
# overhead_budget "auto" with on_full: drop: the share of training time the default may
# cost; chosen on the stress runs of docs/benchmarks.md (issue 14).
AUTO_OVERHEAD_BUDGET = 0.10

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class Tuning(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the worker and the waits are tuned: constants with their reasons, not settings.

    No user should need these. Benchmarks (scripts/stress_test.py sweeps the worker's
    nice value) and tests (short waits, no nice on a loaded machine) change them with
    ``TelemetryConfig(tuning=Tuning(worker_nice=0))`` or a ``tuning:`` mapping in YAML.
    They travel with the config to the worker. Measured figures: docs/benchmarks.md.
    """

    # on_full: block waits at most this long for a slot: a hung worker costs drops, never the run.
    block_timeout_s: PositiveFloat = 60.0
    # spawn is safe after CUDA is initialised, and the worker never re-runs the user's
    # script (worker_handle.without_main_rerun); fork is refused once CUDA is up.
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    # A cold `import torch` in a fresh worker on a loaded node takes tens of seconds.
    start_timeout_s: PositiveFloat = 120.0
    # One torch thread: training keeps its cores (the worker widens to every core only
    # while the trainer waits on it, on_full: block).
    worker_threads: PositiveInt = 1
    # On busy cores the worker yields to training (records are dropped, not steps slowed);
    # 15 rather than 19: 19 starved it (docs/benchmarks.md, the nice sweep).
    worker_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 15
    # SCHED_IDLE: the worker only on CPU time training leaves idle; more drops, off by default.
    worker_sched_idle: bool = False
    # fsync the records file when the worker stops: what stop() returned is on disk.
    fsync: bool = True
    # A dead worker is replaced (and replays what it held) this often per run; a snapshot
    # that kills two workers is recorded as a crash instead.
    max_worker_restarts: NonNegativeInt = 3
    # A full disk: records wait in memory up to this many bytes, then are written when space returns.
    io_buffer_bytes: NonNegativeInt = 4 << 20
    # At stop, mirrors send what they hold for at most half of stop_timeout_s; one whose call
    # has not returned for this long is taken for hung and abandoned sooner (what it held is
    # counted as dropped; the JSONL has it all: `train-telemetry mirror` sends it later). Long
    # enough for a tracker's first call (MLflow creating its sqlite tables: seconds, more on a
    # loaded machine), short enough that a hung one does not make stop() feel stuck.
    mirror_drain_s: PositiveFloat = 10.0


# --- mirrors: each tracker's options (train_telemetry.mirrors: one file per tracker) --------
# Kept here, not beside each tracker, so a typo in a tracker's options fails the config
# where torch and the trackers are absent; mirrors/__init__.py registers one class per name
# and a unit test keeps the two (and the README's sections) equal.


class _MirrorOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Put before every series name, e.g. "telemetry/": keeps ours apart from the user's own
    # metrics in a run we attach to.
    prefix: str = ""


class TensorBoardOptions(_MirrorOptions):
    log_dir: str | None = None  # default: <output_dir>/tensorboard


class MlflowOptions(_MirrorOptions):
    tracking_uri: str | None = None  # default: MLflow's own (MLFLOW_TRACKING_URI, else ./mlruns)
    experiment: str | None = None  # default: MLflow's default experiment
    run_name: str | None = None  # default: output_dir's name
    run_id: str | None = None  # log into this run (default: the active run at start(), else a new one)


class WandbOptions(_MirrorOptions):
    project: str | None = None  # default: WANDB_PROJECT, else "train-telemetry"
    entity: str | None = None
    name: str | None = None  # default: output_dir's name
    group: str | None = None
    mode: Literal["online", "offline"] | None = None  # default: WANDB_MODE, else wandb's default
    dir: str | None = None  # where wandb keeps its run files (default: output_dir)
    run_id: str | None = None  # attach to this run (default: the active wandb.run at start())


class TrackioOptions(_MirrorOptions):
    project: str | None = None  # default: output_dir's name
    name: str | None = None  # default: output_dir's name
    group: str | None = None


MIRROR_OPTIONS: dict[str, type[_MirrorOptions]] = {
    "tensorboard": TensorBoardOptions,
    "mlflow": MlflowOptions,
    "wandb": WandbOptions,
    "trackio": TrackioOptions,
}
MIRROR_NAMES = tuple(MIRROR_OPTIONS)
# ``mirror: framework``: the trackers the Hugging Face Trainer (report_to) or Lightning
# (its loggers) is configured with, resolved by the integration's callback.
FRAMEWORK_MIRROR = "framework"


def mirror_specs(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """``mirror`` as (name, options) pairs: a name or a list of names (options defaulted), or a
    mapping of name to options. A name is a tracker of MIRROR_NAMES, ``framework``, or your
    own class as ``"package.module:Class"`` (its options are its keyword arguments)."""
    if value is None:
        return []
    if isinstance(value, (str, type)):
        value = [value]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(name, {}) for name in value]
    else:
        raise TelemetryConfigError(
            f"mirror: {value!r} is not valid: expected {_ALLOWED['mirror']}")
    specs = []
    for name, options in items:
        if isinstance(name, type):  # your own Mirror class, given in Python
            name = f"{name.__module__}:{name.__qualname__}"
        if not isinstance(name, str):
            raise TelemetryConfigError(f"mirror: {name!r} is not valid: expected {_ALLOWED['mirror']}")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TelemetryConfigError(
                f"mirror.{name}: {options!r} is not valid: expected a mapping of the tracker's options")
        specs.append((name, dict(options)))
    return specs


def check_mirror(name: str, options: dict[str, Any]) -> None:
    """Raise TelemetryConfigError naming the valid trackers (or options) if ``name`` is neither a
    tracker, ``framework``, nor a ``module:Class`` path, or an option is not the tracker's."""
    if name == FRAMEWORK_MIRROR:
        if options:
            raise TelemetryConfigError("mirror.framework takes no options: the framework's own configuration is used")
        return
    if ":" in name and all(part.replace(".", "").replace("_", "").isalnum() for part in name.split(":", 1)):
        return  # your own Mirror class: its options are checked when it is made
    kind = MIRROR_OPTIONS.get(name)
    if kind is None:
        close = difflib.get_close_matches(name, [*MIRROR_NAMES, FRAMEWORK_MIRROR], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TelemetryConfigError(
            f"mirror: unknown tracker {name!r}; {hint}valid: {', '.join(MIRROR_NAMES)}, "
            f"{FRAMEWORK_MIRROR} (the Trainer's / Lightning's own trackers), or your own class as "
            "'package.module:Class'")
    fields = [f.name for f in msgspec.structs.fields(kind)]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TelemetryConfigError(
                f"mirror.{name}: unknown option {key!r}{hint} ({name} options: {', '.join(fields)})")
    try:
        msgspec.convert(options, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise TelemetryConfigError(f"mirror.{name}: {exc}") from None


# Top-level keys of earlier versions that are Tuning fields now: a config that sets one
# gets an error naming where it went.
MOVED_TO_TUNING = tuple(f.name for f in msgspec.structs.fields(Tuning))


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to collect, how often, where to write it, and how the worker behaves.

    Build it directly, with :meth:`from_dict`, or with :meth:`from_yaml`. Every field is
    validated on construction; a wrong value raises :class:`TelemetryConfigError`.
    """

    # --- the seed's keys -------------------------------------------------------------
    enabled: bool = True
    collect_every_n: PositiveInt = 200
    output_dir: str | None = None
    track_gradients: bool = True
    track_weight_delta: bool = True
    track_learning_rates: bool = True
    track_holdout_logits: bool = True
    track_batch_stats: bool = True
    holdout_size: PositiveInt = 50

    # --- what the batches look like --------------------------------------------------
    # Keys of a dict batch or positions (ints) in a tuple batch. Left at the seed's
    # defaults, a batch without these keys is recognised by its shape (batches.py).
    input_keys: list[str | int] = msgspec.field(default_factory=lambda: list(DEFAULT_INPUT_KEYS))
    label_key: str | int = DEFAULT_LABEL_KEY

    # --- metrics beyond the seed's five, chosen the seed's way (track_*) ---------------
    track_layers: bool = True  # layers: the per-group numbers per module
    track_activations: bool = True  # activations: statistics of the holdout forward (needs the holdout)
    track_model_mode: bool = True  # model_mode: model.training and BatchNorm running-stat movement
    layer_depth: Annotated[int, msgspec.Meta(ge=0)] = 0  # layers: module-name components kept (0: whole name)

    # --- how collection runs ---------------------------------------------------------
    # Where records are built. async: in the worker process; sync: inline on the training
    # thread (the seed's design). auto (the default): the worker where it has a core of its
    # own (the model on an accelerator, or training's torch threads leave a core idle), inline
    # where training's threads take every core (a CPU trainer): there a worker only takes
    # CPU from training, at a worse rate (measured in docs/benchmarks.md). Telemetry.mode and
    # run.json say what auto chose and why; each record's telemetry.built_by who built it.
    mode: Literal["auto", "async", "sync"] = "auto"
    on_full: Literal["drop", "block"] = "drop"
    num_slots: PositiveInt = 2
    # An escape hatch users have a reason for: how long stop() (and the at-exit stop) may
    # wait for queued records on a slow disk or under a scheduler's short grace period.
    stop_timeout_s: PositiveFloat = 60.0
    # Fraction of training time telemetry may cost (e.g. 0.05); over it, due collections are
    # skipped evenly (every 2nd, 4th, 8th ...), each counted as a drop. "auto" (the default):
    # AUTO_OVERHEAD_BUDGET (0.10) where records are given up anyway to keep training fast
    # (on_full drop, mode auto or async): they are then given up evenly and the cost is
    # bounded; off with on_full block and in mode sync, where every record was asked for. null: off.
    overhead_budget: Annotated[float, msgspec.Meta(gt=0, le=1)] | Literal["auto"] | None = "auto"
    # Rows per holdout forward: a user's reason is memory (long sequences, a large vocabulary).
    eval_batch_size: PositiveInt = 256

    # --- surviving faults ------------------------------------------------------------
    overwrite: bool = False  # output_dir holds an earlier run: replace it (default: append a new segment, same model only)
    sigterm_drain_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0  # on SIGTERM, write what is queued for at most this long (0: leave SIGTERM alone)

    # --- distributed (torch.distributed) ---------------------------------------------
    per_rank: bool = False

    # --- what the groups are meant to be, for the report's diagnoses -----------------
    # e.g. {backbone: 1, head: 10}: the LR of each group relative to the others.
    expected_lr_ratios: dict[str, PositiveFloat] | None = None

    # --- mirrors: the records also sent to trackers, off the training path (mirrors/) ---
    # [tensorboard, mlflow], or {mlflow: {tracking_uri: ...}} with each tracker's options
    # (MIRROR_OPTIONS), or framework (the integrations: the framework's own trackers).
    mirror: list[Any] | dict[str, Any] | str | None = None

    # --- not settings: the constants the worker and the waits run with (see Tuning) ---
    tuning: Tuning = msgspec.field(default_factory=Tuning)

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, Path):  # accept Path as the seed's API did
            self.output_dir = str(self.output_dir)
        self.tuning = _checked_tuning(self.tuning)
        if self.mirror is not None:
            specs = mirror_specs(self.mirror)
            for name, options in specs:
                check_mirror(name, options)
            # A class given in Python is kept as its import path: the worker imports it by name.
            self.mirror = {name: options for name, options in specs} if specs else None
        for field in msgspec.structs.fields(self):
            if field.name in ("tuning", "mirror"):
                continue
            value = getattr(self, field.name)
            try:
                msgspec.convert(value, field.type, strict=True)
            except msgspec.ValidationError as exc:
                where, bad = _locate(field.name, value, field.type, exc)
                raise TelemetryConfigError(
                    f"{where}: {bad!r} is not valid: {_allowed(field.name, exc)}"
                ) from None
        if not self.input_keys:
            raise TelemetryConfigError(
                "input_keys: [] is not valid: name at least one batch key to feed the model"
            )

    @property
    def effective_overhead_budget(self) -> float | None:
        """The overhead budget in force: ``overhead_budget`` with "auto" resolved (AUTO_OVERHEAD_BUDGET
        with on_full drop in mode auto or async, else None: off)."""
        if self.overhead_budget == "auto":
            return AUTO_OVERHEAD_BUDGET if self.mode != "sync" and self.on_full == "drop" else None
        return self.overhead_budget

    # The tuning constants, read where they are used (worker, sinks, the facade's waits).
    @property
    def block_timeout_s(self) -> float:
        return self.tuning.block_timeout_s

    @property
    def start_method(self) -> str:
        return self.tuning.start_method

    @property
    def start_timeout_s(self) -> float:
        return self.tuning.start_timeout_s

    @property
    def worker_threads(self) -> int:
        return self.tuning.worker_threads

    @property
    def worker_nice(self) -> int:
        return self.tuning.worker_nice

    @property
    def worker_sched_idle(self) -> bool:
        return self.tuning.worker_sched_idle

    @property
    def fsync(self) -> bool:
        return self.tuning.fsync

    @property
    def max_worker_restarts(self) -> int:
        return self.tuning.max_worker_restarts

    @property
    def io_buffer_bytes(self) -> int:
        return self.tuning.io_buffer_bytes

    @property
    def mirror_drain_s(self) -> float:
        return self.tuning.mirror_drain_s

    @property
    def mirrors(self) -> list[tuple[str, dict[str, Any]]]:
        """The trackers the records are mirrored to: (name, options) pairs."""
        return mirror_specs(self.mirror)

    @property
    def keys_are_default(self) -> bool:
        """Whether input_keys/label_key are the seed's defaults (then other batch shapes are recognised)."""
        return tuple(self.input_keys) == DEFAULT_INPUT_KEYS and self.label_key == DEFAULT_LABEL_KEY

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], *, source: str | None = None) -> TelemetryConfig:
        """Build a config from a dict (e.g. a YAML section); unknown keys are errors.

        ``source`` names where the dict came from, for error messages.
        """
        where = f"{source}: " if source else ""
        if not isinstance(config_dict, dict):
            raise TelemetryConfigError(
                f"{where}expected a mapping of telemetry settings, got {type(config_dict).__name__}"
            )
        valid = cls.field_names()
        for key in config_dict:
            if key in MOVED_TO_TUNING:
                default = getattr(Tuning(), str(key))
                raise TelemetryConfigError(
                    f"{where}{key!r} is no longer a setting: it is a tuning constant ({key} = {default!r}, "
                    f"its reason beside it in train_telemetry.config.Tuning). Remove it; a benchmark that "
                    f"must change it sets tuning: {{{key}: ...}}")
            if key == "metrics":
                raise TelemetryConfigError(
                    f"{where}'metrics' is no longer a key: every metric is chosen the seed's way, "
                    f"{', '.join(f'track_{m}' for m in BUILTIN_METRICS)} (true or false, all on by default) "
                    "beside track_gradients and the others; your own metrics: Telemetry(config, metrics=[...])")
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TelemetryConfigError(
                    f"{where}unknown key {key!r}{hint} (valid keys: {', '.join(valid)})"
                )
        try:
            return cls(**config_dict)
        except TelemetryConfigError as exc:
            raise TelemetryConfigError(f"{where}{exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TelemetryConfig:
        """Load a YAML file whose top level, or whose ``telemetry:`` section, holds the keys."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TelemetryConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TelemetryConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if isinstance(data, dict) and "telemetry" in data:
            data = data["telemetry"] or {}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in msgspec.structs.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def replace(self, **changes: Any) -> TelemetryConfig:
        """A copy with some fields changed (validated like a new config)."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)


def _checked_tuning(value: Any) -> Tuning:
    """``tuning`` as a Tuning, each field validated like a setting (``tuning.worker_nice: 25 ...``)."""
    given = msgspec.structs.asdict(value) if isinstance(value, Tuning) else value
    if not isinstance(given, dict):
        raise TelemetryConfigError(f"tuning: expected a mapping of tuning constants, got {type(given).__name__}")
    fields = {f.name: f.type for f in msgspec.structs.fields(Tuning)}
    for key, item in given.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TelemetryConfigError(f"tuning: unknown key {key!r}{hint} (tuning keys: {', '.join(fields)})")
        try:
            msgspec.convert(item, fields[key], strict=True)
        except msgspec.ValidationError as exc:
            raise TelemetryConfigError(f"tuning.{key}: {item!r} is not valid: {_allowed(key, exc)}") from None
    return value if isinstance(value, Tuning) else msgspec.convert(given, Tuning, strict=True)


_ALLOWED: dict[str, str] = {
    "collect_every_n": "an integer >= 1",
    "holdout_size": "an integer >= 1",
    "num_slots": "an integer >= 1",
    "worker_threads": "an integer >= 1",
    "eval_batch_size": "an integer >= 1",
    "overhead_budget": "a fraction of training time in (0, 1], e.g. 0.05, 'auto' (0.10 with on_full: drop, else off) or null (off)",
    "max_worker_restarts": "an integer >= 0",
    "io_buffer_bytes": "an integer >= 0 (bytes)",
    "sigterm_drain_s": "a number of seconds >= 0 (0: telemetry leaves SIGTERM alone)",
    "worker_nice": "an integer from 0 to 19",
    "block_timeout_s": "a number of seconds > 0",
    "start_timeout_s": "a number of seconds > 0",
    "stop_timeout_s": "a number of seconds > 0",
    "mode": "one of 'auto', 'async', 'sync'",
    "on_full": "one of 'drop', 'block'",
    "start_method": "one of 'spawn', 'forkserver', 'fork'",
    "output_dir": "a directory path (string) or null",
    "input_keys": "a list of batch keys (strings) or tuple positions (integers)",
    "label_key": "a batch key (string) or a tuple position (integer)",
    "layer_depth": "an integer >= 0 (0: the whole module name)",
    "expected_lr_ratios": "a mapping of group name to a number > 0, or null",
    "mirror": "a tracker name, a list of them, or a mapping of name to options (tensorboard, mlflow, wandb, trackio, framework, or 'package.module:Class')",
    "mirror_drain_s": "a number of seconds > 0",
}


def _locate(name: str, value: Any, type_: Any, exc: msgspec.ValidationError) -> tuple[str, Any]:
    """The failing element of a list or mapping field (``input_keys[1]``, ``expected_lr_ratios.head``).

    msgspec's path names a list index but not a mapping key (``$[...]``), so for a
    mapping the entries are checked one by one to find the culprit.
    """
    path = str(exc).partition(" - at `$")[2].rstrip("`")
    if isinstance(value, list) and path.startswith("[") and path[1:].split("]")[0].isdigit():
        i = int(path[1:].split("]")[0])
        if i < len(value):
            return f"{name}[{i}]", value[i]
    if isinstance(value, dict):
        for key, item in value.items():
            try:
                msgspec.convert({key: item}, type_, strict=True)
            except msgspec.ValidationError:
                return f"{name}.{key}", item
    return name, value


def _allowed(name: str, exc: msgspec.ValidationError) -> str:
    allowed = _ALLOWED.get(name)
    if allowed is None and name.startswith(("enabled", "track_", "fsync", "per_rank", "worker_sched_idle", "overwrite")):
        allowed = "true or false"
    detail = str(exc).split(" - at ")[0]
    return f"expected {allowed} ({detail})" if allowed else detail
