"""The training configuration: one typed schema, filled from YAML, then the command line.

Every field of :class:`TrainConfig` is a command-line flag (``batch_size`` is
``--batch-size``). A YAML file given with ``--config`` fills the fields first;
flags override it. Unknown keys and values of the wrong type are errors that
name the key: a typo must never be silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.seeds import MAX_USER_SEED


class ConfigError(ValueError):
    """A bad config file, key or value: reported as one line, exit status 2."""


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """All settings of one training run. Learning rates are per global batch."""

    # Randomness. The one seed governs every stream; the overrides vary one alone.
    seed: int = _field(2333, "user seed, 0 to 2**32-1; every random stream is derived from it")
    model_seed: int | None = _field(None, "weight-initialisation seed, as a run with --seed X would have it")
    order_seed: int | None = _field(None, "data-order seed, as a run with --seed X would have it")
    aug_seed: int | None = _field(None, "augmentation seed, as a run with --seed X would have it")
    determinism: Literal["strict", "warn", "off"] = _field(
        "strict", "strict: bitwise reproducible; warn: same but nondeterministic ops warn; off: fast, not reproducible"
    )

    # Data.
    dataset: Literal["synthetic", "cifar10", "cifar100", "imagefolder"] = _field("cifar10", "which dataset")
    data_dir: str = _field("data", "where datasets are read from (and downloaded to, for cifar10/cifar100)")
    synthetic_train_size: int = _field(5000, "images in the synthetic training set")
    synthetic_test_size: int = _field(1000, "images in the synthetic test set")
    data_pipeline: Literal["dataloader", "device"] = _field(
        "dataloader",
        "dataloader: torchvision transforms per sample in worker processes (any transform); "
        "device: the dataset on the device (GPU or CPU), augmented there a batch at a time; no workers",
    )
    num_workers: int = _field(
        2, "DataLoader worker processes per rank; does not change the result (unused with --data-pipeline device)"
    )
    cutout: int = _field(0, "side of the cutout square in pixels; 0 turns cutout off")

    # Model.
    model: Literal["small_cnn", "resnet18", "resnet9"] = _field("resnet18", "network architecture")

    # Optimisation.
    epochs: int = _field(200, "passes over the training set; the schedule spans them all")
    batch_size: int = _field(512, "global batch size in images, split evenly over the processes")
    lr: float = _field(0.4, "peak learning rate for the global batch, reached after warm-up")
    momentum: float = _field(0.9, "SGD Nesterov momentum")
    weight_decay: float = _field(5e-4, "L2 weight decay on weights; norms and biases get none")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing, 0 to 1")
    warmup_epochs: float = _field(1.0, "epochs of linear warm-up from 0 to --lr")
    schedule: Literal["cosine", "onecycle"] = _field("cosine", "decay after warm-up: cosine to 0, or linear to 0")
    grad_accum_steps: int = _field(
        1, "split each process's batch into this many chunks, one backward each, for one optimizer step"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = _field("no", "autocast precision; fp16 adds a loss scaler")
    channels_last: bool = _field(True, "NHWC memory layout on CUDA (faster convolutions); ignored on the CPU")
    sync_bn: bool = _field(False, "synchronise BatchNorm statistics across processes (needs CUDA)")
    compile: bool = _field(False, "torch.compile the model")
    max_steps: int | None = _field(
        None, "stop cleanly after this many optimizer steps; changes neither the schedule nor the data order"
    )

    # Output and fault tolerance.
    output_dir: str | None = _field(None, "run folder; default runs/<dataset>-<model>-seed<seed>")
    overwrite: bool = _field(False, "replace an output folder that holds another run")
    checkpoint_every: int = _field(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    keep_checkpoints: int = _field(3, "newest checkpoints kept, besides the best by test accuracy")
    resume: str | None = _field(
        None, "latest (error if none), auto (resume if a checkpoint exists, else start), or a checkpoint folder"
    )


# Keys that may differ between a run and its resumption, or between two
# invocations that write one run folder: they change neither the trajectory nor
# the result (num_workers does not: augmentation is seeded per sample).
RUN_CONTROL_KEYS = frozenset(
    {
        "output_dir",
        "overwrite",
        "resume",
        "max_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "num_workers",
        "data_dir",
    }
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _allowed(hint: Any) -> tuple[type | None, tuple[Any, ...] | None, bool]:
    """Return (base type, literal choices, optional?) for a field's type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(arguments) < len(typing.get_args(hint))
        hint = arguments[0]
        origin = typing.get_origin(hint)
    if origin is Literal:
        return str, typing.get_args(hint), optional
    return hint, None, optional


def coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the type of field ``key`` and return it; ``ConfigError`` if it does not fit."""
    hints = _field_types()
    if key not in hints:
        raise ConfigError(f"unknown config key {key!r}")
    base, choices, optional = _allowed(hints[key])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} cannot be empty")
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if base is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where 5e-4 (no dot) is a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[base]
    # bool is an int subclass: `epochs: true` must not pass as 1.
    if isinstance(value, accepted) and (base is bool or not isinstance(value, bool)):
        return float(value) if base is float else value
    raise ConfigError(f"config key {key!r} must be {base.__name__}, got {value!r}")


def _parse_flag(key: str, text: str) -> Any:
    """Convert a command-line string to field ``key``'s type (YAML scalar rules)."""
    base, _, optional = _allowed(_field_types()[key])
    if optional and text.lower() in ("none", "null", ""):
        return None
    if base is str:
        return coerce(key, text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return coerce(key, value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no Python objects are ever built)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def validate(config: TrainConfig) -> TrainConfig:
    """Check value ranges that types alone cannot express."""
    for name in ("seed", "model_seed", "order_seed", "aug_seed"):
        value = getattr(config, name)
        if value is not None and not 0 <= value <= MAX_USER_SEED:
            raise ConfigError(f"{name} must be in [0, {MAX_USER_SEED}], got {value}")
    positive = ("epochs", "batch_size", "synthetic_train_size", "synthetic_test_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be positive, got {config.max_steps}")
    if config.num_workers < 0 or config.cutout < 0 or config.checkpoint_every < 0:
        raise ConfigError("num_workers, cutout and checkpoint_every must not be negative")
    if config.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be at least 1, got {config.keep_checkpoints}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps must be positive, got {config.grad_accum_steps}")
    if config.lr <= 0 or config.warmup_epochs < 0 or config.weight_decay < 0:
        raise ConfigError("lr must be positive; warmup_epochs and weight_decay must not be negative")
    return config


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: ``--config`` plus one flag per config field."""
    parser = _Parser(description="Train a CIFAR classifier reproducibly.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of config keys; flags override it")
    hints = _field_types()
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        _, choices, _ = _allowed(hints[spec.name])
        help_text = spec.metadata.get("help", "")
        if hints[spec.name] is bool:
            parser.add_argument(
                flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                dest=spec.name,
                default=None,
                metavar=("{" + ",".join(choices) + "}") if choices else spec.name.upper(),
                help=f"{help_text} (default: {spec.default})",
            )
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Build the config from ``--config`` YAML, then flags. Raises ``ConfigError``."""
    return validate(TrainConfig(**given_values(argv)))


def given_values(argv: list[str] | None = None) -> dict[str, Any]:
    """The values the command line gives, each checked against its field's type:
    the keys of the ``--config`` file, then the flags over them. Raises ``ConfigError``."""
    arguments = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    if arguments.config:
        for key, value in load_yaml(arguments.config).items():
            values[key] = coerce(str(key), value)
    for spec in dataclasses.fields(TrainConfig):
        text = getattr(arguments, spec.name)
        if text is None:
            continue
        values[spec.name] = text if isinstance(text, bool) else _parse_flag(spec.name, text)
    return values


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as a plain dict, in field order."""
    return dataclasses.asdict(config)


def config_differences(previous: dict[str, Any], current: TrainConfig) -> list[str]:
    """The keys, other than run-control keys, whose values differ: ``key: old -> new``."""
    now = config_to_dict(current)
    keys = sorted((set(previous) | set(now)) - RUN_CONTROL_KEYS)
    return [f"{key}: {previous.get(key)!r} -> {now.get(key)!r}" for key in keys if previous.get(key) != now.get(key)]


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from :func:`config_to_dict`'s output, checking every key."""
    return validate(TrainConfig(**{str(key): coerce(str(key), value) for key, value in values.items()}))
