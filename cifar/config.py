"""The training configuration: one typed schema, filled from YAML, then the command line.

Every field of :class:`TrainConfig` is a command-line flag (``batch_size`` is
``--batch-size``). A YAML file given with ``--config`` fills the fields first;
flags override it. Unknown keys and values of the wrong type are errors that
name the key: a typo must never be silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cifar import data_cache, tta
from cifar.data import IMAGE_SIZE
from cifar.models import model_names
from repro.files import DECIMAL_FLOAT, DECIMAL_INT, RunFileError, parse_yaml_mapping
from repro.report import short
from repro.seeds import check_seed


class ConfigError(ValueError):
    """A bad config file, key or value: reported as one line, exit status 2."""


class UsageError(Exception):
    """A mistake in how the run was started (launcher, folder, data, checkpoint of another run):
    reported as one line, exit status 2."""


# A config is a short flat mapping; a larger file is a mistake or an attack, refused before it is read.
MAX_CONFIG_BYTES = 1 << 20

# torch accepts any positive count, but crashed (segmentation fault) on the first
# operation at 10**6 threads; 1024 ran. More than a CPU has only slows a run down.
MAX_CPU_THREADS = 1024

# A synthetic image is 3 KB of pixels: a million of them (20 times CIFAR-10's training
# set) take 3 GB; numpy fails with a MemoryError long before 10**12.
MAX_SYNTHETIC_IMAGES = 10**6

# Longer than any run's warm-up can be; a float near 1e308 overflowed the step count.
MAX_WARMUP_EPOCHS = 10**6


def _field(default: Any, help: str, choices: Callable[[], tuple[str, ...]] | None = None) -> Any:
    """A config field. ``choices`` gives a ``str`` field's allowed values when they are not a
    fixed ``Literal``: it is called at each check, so values registered after import count."""
    return field(default=default, metadata={"help": help, "choices": choices})


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
    cpu_threads: int = _field(
        1,
        "torch threads for CPU operations; the count changes CPU sums and so the weights, "
        "so it is a setting and not whatever the launcher chose",
    )

    # Data.
    dataset: Literal["synthetic", "cifar10", "cifar100", "imagefolder"] = _field("cifar10", "which dataset")
    data_dir: str = _field("data", "where datasets are read from (and downloaded to, for cifar10/cifar100)")
    data_cache: str = _field(
        "auto",
        "folder where imagefolder datasets are kept decoded, found again by their files' SHA-256, so later runs "
        "skip decoding; auto: $XDG_CACHE_HOME/repro or ~/.cache/repro; none: decode every run",
    )
    synthetic_train_size: int = _field(5000, "images in the synthetic training set")
    synthetic_test_size: int = _field(1000, "images in the synthetic test set")
    data_pipeline: Literal["dataloader", "device"] = _field(
        "device",
        "device: the dataset (every dataset here is loaded into memory) on the device (GPU or CPU), augmented "
        "there many batches at once, no workers: it keeps a GPU fed; dataloader: torchvision transforms per sample "
        "in worker processes, for transforms of your own",
    )
    num_workers: int = _field(
        2, "DataLoader worker processes per rank; does not change the result (unused with --data-pipeline device)"
    )
    cutout: int = _field(0, "side of the cutout square in pixels; 0 turns cutout off")
    crop_padding: int = _field(4, "random translation: pixels of padding on each side before the random crop")
    padding_mode: Literal["zeros", "reflect"] = _field("zeros", "what fills the crop padding")
    flip: Literal["random", "alternating"] = _field(
        "random",
        "random: each sample flipped with probability 1/2 in each epoch; alternating: a random half in the "
        "first epoch, and each sample the other way from its previous epoch after that (device pipeline only)",
    )
    tta_level: int = _field(
        0, "test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts"
    )

    # Model.
    model: str = _field("resnet18", "network architecture, a name in cifar.models.MODELS", choices=model_names)
    whiten_bias_epochs: int = _field(
        3, "speedrun model: epochs in which the whitening layer's bias trains (its weights never do)"
    )

    # Optimisation.
    epochs: int = _field(200, "passes over the training set; the schedule spans them all")
    batch_size: int = _field(512, "global batch size in images, split evenly over the processes")
    lr: float = _field(0.4, "peak learning rate for the global batch, reached after warm-up")
    momentum: float = _field(0.9, "SGD Nesterov momentum")
    weight_decay: float = _field(5e-4, "L2 weight decay on weights (norms and biases: see --decay-norms-and-biases)")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing, 0 to 1")
    warmup_epochs: float = _field(1.0, "epochs of linear warm-up from --warmup-start-factor x --lr to --lr")
    warmup_start_factor: float = _field(0.0, "learning rate at the start of warm-up, as a fraction of --lr")
    schedule: Literal["cosine", "onecycle"] = _field(
        "cosine", "decay after warm-up to --final-lr-factor x --lr: cosine, or linear (onecycle)"
    )
    final_lr_factor: float = _field(0.0, "learning rate at the last step, as a fraction of --lr")
    norm_bias_lr_scale: float = _field(
        1.0, "learning-rate multiplier for BatchNorm biases; their weight decay is divided by it (airbench: 64)"
    )
    decay_norms_and_biases: bool = _field(False, "apply --weight-decay to norm parameters and biases too")
    lookahead_every: int = _field(0, "optimizer steps between lookahead (slow weights) updates; 0 turns it off")
    grad_accum_steps: int = _field(
        1, "split each process's batch into this many chunks, one backward each, for one optimizer step"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _field(
        "auto",
        "autocast precision; auto: bf16 on a CUDA device with native bf16, else no (fp32); "
        "fp16 (with a loss scaler) needs CUDA. The manifest records what ran",
    )
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
    log_with: Literal["tensorboard", "wandb", "mlflow", "aim", "none"] = _field(
        "tensorboard",
        "experiment tracker for per-step loss and learning rate and per-epoch metrics, through accelerate; "
        "tensorboard writes <run>/tensorboard/ and is skipped with a note when not installed, another that is "
        "not installed is an error; none: metrics.jsonl only",
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
        "data_cache",
        "log_with",
    }
)

# The run-control keys that change neither the weights nor the metrics, which the manifest records
# for `python -m repro compare`. Not max_steps: a run it stops early ends with other weights.
RESULT_NEUTRAL_KEYS = RUN_CONTROL_KEYS - {"max_steps"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


@functools.cache
def _field_types() -> types.MappingProxyType[str, Any]:
    # Resolving the hints evaluates every annotation string: about 1 ms a call, and a parse makes a hundred.
    return types.MappingProxyType(typing.get_type_hints(TrainConfig))


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


def _choices(key: str) -> tuple[Any, ...] | None:
    """The values field ``key`` accepts when it is a choice (its ``Literal``'s, or its registry's names), else None."""
    _, choices, _ = _allowed(_field_types()[key])
    registry = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}[key].metadata["choices"]
    return registry() if registry is not None else choices


def coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the type of field ``key`` and return it; ``ConfigError`` if it does not fit."""
    hints = _field_types()
    if key not in hints:
        raise ConfigError(f"unknown config key {short(key)}")
    base, _, optional = _allowed(hints[key])
    choices = _choices(key)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} cannot be empty")
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {short(value)}")
        return value
    if base is float and isinstance(value, str) and DECIMAL_FLOAT.fullmatch(value):
        # PyYAML follows YAML 1.1, where 5e-4 (no dot) is a string, not a float.
        return float(value)
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[base]
    # bool is an int subclass: `epochs: true` must not pass as 1.
    if isinstance(value, accepted) and (base is bool or not isinstance(value, bool)):
        return float(value) if base is float else value
    raise ConfigError(f"config key {key!r} must be {base.__name__}, got {short(value)}")


def _decimal_int(text: str) -> int:
    """``int(text)`` for text that matched ``DECIMAL_INT``; Python refuses more than 4300 digits."""
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{short(text)} has too many digits") from None


def _parse_flag(key: str, text: str) -> Any:
    """Convert a command-line string to field ``key``'s type.

    Only plain spellings are read: decimal numbers (inf and nan too, which
    :func:`validate` then refuses), true/false, the field's choices, and
    none/null for an optional field. Anything else is an error, never a
    YAML reading of it (``--seed 010`` is seed 10, ``--seed 0x10`` an error).
    """
    base, _, optional = _allowed(_field_types()[key])
    # An empty value is refused (validate), not read as unset: `--output-dir "$DIR"` with DIR unset
    # would otherwise pick the default run folder, and --overwrite would replace the run there.
    if optional and text.lower() in ("none", "null"):
        return None
    if base is str:
        return coerce(key, text)
    if base is int and DECIMAL_INT.fullmatch(text):
        return coerce(key, _decimal_int(text))
    if base is float and DECIMAL_FLOAT.fullmatch(text):
        return coerce(key, float(text))
    if base is bool and text.lower() in ("true", "false"):
        return coerce(key, text.lower() == "true")
    spelling = "true or false" if base is bool else "in plain decimal"
    raise ConfigError(f"config key {key!r} must be {base.__name__} ({spelling}), got {short(text)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file: a flat YAML mapping of plain values, at most ``MAX_CONFIG_BYTES`` of UTF-8.

    Parsed by repro's YAML reader, flat: a safe loader (it builds no Python objects) that also refuses
    anchors, aliases, nesting, duplicate keys and numbers that are not plain decimals
    (:func:`repro.files.parse_yaml_mapping`).
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            # Read one byte past the limit rather than trust the size: /dev/zero has size 0.
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.start}: 0x{data[error.start]:02x})"
        ) from None
    try:
        return parse_yaml_mapping(text, f"config file {path}", flat=True)
    except RunFileError as error:
        raise ConfigError(str(error)) from None


def validate(config: TrainConfig) -> TrainConfig:
    """Check value ranges that types alone cannot express: every float finite, every count in range."""
    for name, hint in _field_types().items():
        value = getattr(config, name)
        if _allowed(hint)[0] is float and value is not None and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    for name in ("seed", "model_seed", "order_seed", "aug_seed"):
        value = getattr(config, name)
        if value is not None:
            try:
                check_seed(value, name)
            except ValueError as error:
                raise ConfigError(str(error)) from None
    positive = ("epochs", "batch_size", "synthetic_train_size", "synthetic_test_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be positive, got {short(getattr(config, name))}")
    for name in ("synthetic_train_size", "synthetic_test_size"):
        if getattr(config, name) > MAX_SYNTHETIC_IMAGES:
            raise ConfigError(f"{name} must be at most {MAX_SYNTHETIC_IMAGES}, got {short(getattr(config, name))}")
    for name in ("output_dir", "resume", "data_dir"):
        value = getattr(config, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{name} is empty (an unset shell variable?); leave it out for the default")
    if config.dataset == "synthetic" and config.batch_size > config.synthetic_train_size:
        raise ConfigError(
            f"batch_size {short(config.batch_size)} is larger than the training set "
            f"({config.synthetic_train_size} synthetic images)"
        )
    try:
        data_cache.cache_dir(config.data_cache)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not 1 <= config.cpu_threads <= MAX_CPU_THREADS:
        raise ConfigError(f"cpu_threads must be in [1, {MAX_CPU_THREADS}], got {short(config.cpu_threads)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be positive, got {short(config.max_steps)}")
    if config.num_workers < 0 or config.cutout < 0 or config.checkpoint_every < 0:
        raise ConfigError("num_workers, cutout and checkpoint_every must not be negative")
    if config.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be at least 1, got {short(config.keep_checkpoints)}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    # Nesterov SGD has no momentum-free form (torch refuses 0); 1 and above never decay.
    if not 0 < config.momentum < 1:
        raise ConfigError(f"momentum must be in (0, 1), got {config.momentum}")
    if config.grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps must be positive, got {short(config.grad_accum_steps)}")
    if config.lr <= 0 or config.warmup_epochs < 0 or config.weight_decay < 0:
        raise ConfigError("lr must be positive; warmup_epochs and weight_decay must not be negative")
    if config.warmup_epochs > MAX_WARMUP_EPOCHS:
        raise ConfigError(f"warmup_epochs must be at most {MAX_WARMUP_EPOCHS}, got {config.warmup_epochs}")
    if config.crop_padding < 0 or config.whiten_bias_epochs < 0 or config.lookahead_every < 0:
        raise ConfigError("crop_padding, whiten_bias_epochs and lookahead_every must not be negative")
    if not 0 <= config.tta_level <= tta.MAX_LEVEL:
        raise ConfigError(f"tta_level must be in [0, {tta.MAX_LEVEL}], got {config.tta_level}")
    for name in ("warmup_start_factor", "final_lr_factor"):
        if not 0 <= getattr(config, name) <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(config, name)}")
    if config.norm_bias_lr_scale <= 0:
        raise ConfigError(f"norm_bias_lr_scale must be positive, got {config.norm_bias_lr_scale}")
    if config.flip == "alternating" and config.data_pipeline != "device":
        raise ConfigError("flip: alternating needs data_pipeline: device (the DataLoader's transforms see no epoch)")
    # More padding than the image side crops pure padding (and reflect padding cannot reach that far).
    if config.crop_padding >= IMAGE_SIZE:
        raise ConfigError(
            f"crop_padding must be under the {IMAGE_SIZE}-pixel image side, got {short(config.crop_padding)}"
        )
    return config


def resolve_mixed_precision(requested: str, cuda: bool, native_bf16: bool) -> str:
    """The precision a run trains in, for accelerate: ``no``, ``bf16`` or ``fp16``.

    ``auto`` is bf16 on a CUDA device that computes it natively, else fp32
    (``no``). fp16 on the CPU is refused: accelerate accepted it and trained in
    fp32 (measured: the weights equal the fp32 run's) while the run recorded fp16.
    bf16 on the CPU stays allowed: autocast runs it there (the weights differ from fp32's).
    """
    if requested == "auto":
        return "bf16" if cuda and native_bf16 else "no"
    if requested == "fp16" and not cuda:
        raise ConfigError("mixed_precision fp16 needs CUDA: on the CPU it would train in fp32; use bf16 or no")
    return requested


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: ``--config`` plus one flag per config field."""
    parser = _Parser(description="Train a CIFAR classifier reproducibly.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of config keys; flags override it")
    hints = _field_types()
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        choices = _choices(spec.name)
        help_text = spec.metadata.get("help", "")
        if hints[spec.name] is bool:
            on_or_off = "on" if spec.default else "off"
            parser.add_argument(
                flag,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {on_or_off})",
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
