"""What the benchmarks share: the repository on ``sys.path``, a description of
the machine they ran on, the median-of-ratios summary, a bitwise comparison of tensors,
and the argument types of their counts.

Import it before anything from the repository: ``python bench/X.py`` puts only
``bench/`` on ``sys.path``, and ``cifar/`` is not an installed package.

Every benchmark reports speed as a ratio of two configurations measured in one
run, in alternating repetitions, so that load from other processes on a shared
machine falls on both sides; the median of the per-repetition ratios is the
figure. Absolute images/s are printed too, but they vary with that load.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cifar.build import Batches
    from cifar.checkpoint import Training

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SPEEDRUN_CONFIG = REPO / "configs" / "cifar10_speedrun.yaml"

DETERMINISM_MODES = ("strict", "off", "strict+fill")  # what set_determinism accepts


def positive_int(text: str) -> int:
    """An argparse type for a count that must be at least 1 (steps, repeats, a batch size):
    a bad value is a one-line usage error (exit status 2), not a traceback deep in the bench."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type for a count that may be 0 (DataLoader workers, warm-up steps)."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and hardware, for the report of a benchmark run."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_runtime": torch.version.cuda,  # what this torch was built with; None for a CPU build
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    for name in ("torchvision", "accelerate", "numpy"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None  # the GPU check runs where some may be missing
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def start(determinism: str) -> dict[str, Any]:
    """Set the determinism mode as train.py does first, then describe the machine and print
    that; returns the description. In this order: strict mode sets CUBLAS_WORKSPACE_CONFIG,
    which must come before CUDA starts, and the description names the GPU, which starts it."""
    from repro.determinism import configure_determinism

    configure_determinism(determinism)
    info = environment()
    print_environment(info)
    return info


def print_environment(info: dict[str, Any]) -> None:
    print(
        f"# {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), torchvision {info['torchvision']}, Python {info['python']}, "
        f"commit {info['git_commit']}, load average at start {info['load_average_at_start']}"
    )


def alternate(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each timer once per round, in turn, for ``repeats`` rounds: each's figures, by name.
    Alternating spreads a shared machine's slow spells over all of them."""
    figures: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, run in timers.items():
            figures[name].append(run())
    return figures


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values bit for bit: same dtype and shape, and equal as
    integers of their element size, so that two NaNs of the same bits are equal (``torch.equal``
    calls them unequal) and -0.0 differs from 0.0 (``torch.equal`` calls them equal)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.detach().view(integer), b.detach().view(integer)
    return torch.equal(a, b)


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over repetitions of numerator/denominator, pairing repetition i with i."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain, aligned text table."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write the benchmark's figures as JSON when ``--json PATH`` was given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"figures written to {path}")


def run_process(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure show its error output and stop."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}")
    return result


def train_py_objects(arguments: list[str], run_dir: Path) -> tuple[Training, Batches, Batches]:
    """train.py's training objects for its command-line ``arguments``, built in ``run_dir`` as its
    ``main`` builds them (cifar/build.py): the Training, the training batches, the test batches.
    Unlike a run, it claims no run folder and seeds no global generator."""
    from cifar import data_cache
    from cifar.build import build_loaders, build_model_for, make_accelerator, prepare_training
    from cifar.config import parse_config
    from cifar.data import load_splits
    from repro.fingerprint import environment_fingerprint
    from repro.seeds import SeedPlan

    config = parse_config([*arguments, "--output-dir", str(run_dir), "--log-with", "none"])
    run_dir.mkdir(parents=True)
    accelerator = make_accelerator(config, run_dir)
    seeds = SeedPlan(config.seed, config.model_seed, config.order_seed, config.aug_seed)
    sizes = (config.synthetic_train_size, config.synthetic_test_size)
    splits = load_splits(config.dataset, config.data_dir, sizes, data_cache.cache_dir(config.data_cache))
    train_batches, sampler, test_batches = build_loaders(config, splits, seeds, accelerator)
    model = build_model_for(config, splits, seeds, accelerator)
    environment = environment_fingerprint(accelerator.num_processes, REPO)
    training = prepare_training(config, run_dir, accelerator, model, sampler, splits, environment)
    return training, train_batches, test_batches


def set_determinism(mode: str) -> None:
    """Apply ``repro.determinism.configure_determinism(mode)``, or for
    ``"strict+fill"``, strict mode with torch's filling of uninitialised memory.

    With ``torch.utils.deterministic.fill_uninitialized_memory`` True (torch's
    default) deterministic mode fills every tensor that ``torch.empty`` and its
    kin create (with NaN, or an integer type's largest value), so that code
    reading memory it never wrote behaves the same in every run. Strict mode
    turns it off; the third mode, strict mode before that change, measures
    what the filling costs.
    """
    import torch

    from repro.determinism import configure_determinism

    configure_determinism("off" if mode == "off" else "strict")
    torch.utils.deterministic.fill_uninitialized_memory = mode == "strict+fill"
