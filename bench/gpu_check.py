"""What only a CUDA GPU can show, checked in one run of a few minutes.

Run it through ``bash bench/gpu_check.sh OUT_DIR [CIFAR_IMAGEFOLDER_DIR]``, which
also keeps the full log. Stages:

a. Strict determinism raises nothing for each shipped model and each config in
   ``configs/``: a few training steps (forward, cross-entropy, backward, SGD)
   in full precision and in bf16 autocast, with train.py's channels_last
   layout, then an evaluation forward; each case runs twice from the same seed
   and must end in the same weights (SHA-256 of the state dict).
b. train.py, strict, same seed, on synthetic data: two runs in full precision
   (``--mixed-precision no``: the default, auto, is bf16 on CUDA) give the same
   ``weights_sha256``; so does a run with another ``--num-workers``, a second
   pair in bf16 autocast, and a full-precision pair with ``--data-pipeline device``.
c. Training throughput of resnet9 and resnet18 (bf16 autocast, channels_last,
   synthetic tensors on the GPU, timed after a warm-up) under strict and off
   determinism, and strict with torch's filling of new tensors, which strict
   mode leaves off (``benchlib.set_determinism``), each mode in its own process
   (``CUBLAS_WORKSPACE_CONFIG`` is read once per process), alternating; the
   figures are strict/off (target >= 0.85). Then train.py's own step rate for
   resnet9 (bf16, device pipeline, strict; the median ``images_per_s`` of
   epochs 2 and 3 of 60 steps) against the bare strict step (target >= 0.9).
d. Whether the DataLoader can feed the GPU: bench/loader_throughput.py's
   images/s of train.py's DataLoader at 0 and half the CPUs' workers and of the
   device pipeline on the GPU, against stage c's resnet9 training images/s.
e. With a CIFAR-10 folder in ``train/<class>/*`` layout: train.py with
   ``configs/cifar10_fast.yaml`` as shipped (the device pipeline, bf16 autocast
   on CUDA) on it, its test accuracy, its training seconds (the epochs'
   ``train_s``, evaluation excluded) and wall time; then the same in full
   precision if at least 200 s of the time budget are left. Last by default,
   with what is left of the budget: a run still going at the deadline is
   stopped.
f. With a CIFAR-10 folder: the speedrun recipe (``configs/cifar10_speedrun.yaml``,
   bf16 autocast, strict) for three seeds and a repeat of the first, and the
   first seed once with determinism off. For each: test accuracy (with its
   test-time augmentation), and GPU seconds as airbench counts them: training
   plus the final evaluation (the epochs' ``train_s`` and the last ``eval_s``;
   both end in a host wait for the GPU, so they time the GPU's work) and the
   whitening layer's initialisation (bench/whitening.py --device cuda: train.py
   computes it on the GPU before its clock starts; airbench times its own), with the
   per-epoch evaluations and data loading left out. Warm-up is excluded, as
   issue 12 measures airbench94: the timed runs follow a warm-up run in the
   same process (bench/train_runs.py; another seed, its figures reported, not
   counted), which takes CUDA's start-up; the repeat runs alone in a process,
   cold. Then the repeat's weights against the first's (bitwise), the
   speedrun network's bare training step at batch 1024 in bf16 strict (as
   stage c measures; its whitening bias without a gradient, as train.py runs
   7 of its 10 epochs) and train.py's rate over epochs 2 on against it (target
   >= 0.9), and the same bare step with determinism off: what determinism
   costs this network without train.py, beside the end-to-end strict/off.
   Last, the bare step with and without the whitening bias's gradient
   (bench/whitening_bias.py), which train.py leaves off after the bias's epochs.

g. Whether the GPU waits for the host in train.py's steps
   (bench/step_timeline.py: a torch.profiler timeline of the speedrun recipe's
   loop on synthetic data, its network at batch 1024, bf16, strict; the steps
   of its third epoch): the fraction of the steps' time the GPU ran work, the
   calls inside the steps that waited for the GPU (there should be none), and
   the longest gaps in the GPU's work with the parts of the step the host was
   in meanwhile; the same network's bare loop over the same batches, profiled
   the same way, beside it; and both loops' time per step unprofiled (train.py's
   second epoch, the bare loop's second pass). train.py's timeline is kept
   (``step_timeline_trace.json.gz``). Then the same at batch 32, where the GPU
   is mostly idle and a step's wall time is the host's (``host_bound/``):
   train.py's host time for the speedrun net's step against the GPU's work
   per step at batch 1024, and which of the two bounds the step. Last, a bare
   speedrun step with its forward and backward replayed as CUDA graphs against
   the same step eager (bench/graphed_step.py), at batch 1024 (the step's
   time) and at batch 32 (the host's): what the graphs save, and whether the
   two copies of the net keep the same bits.
   Not in the default set; 13 s on the H200 before the last two runs were added.
h. Host time per step of train.py's own loop on this machine
   (bench/host_overhead.py: the speedrun recipe's loop, the device pipeline at
   batch 1024, on a one-layer model, so that the GPU's work is negligible and
   what is left is the host's; a CPU smoke run estimates it from a second run
   at batch 8), each part of the step, the same for a bare
   hand-written loop, and a cProfile of one epoch in the log
   (``host_overhead.log``): where the host time that keeps train.py below the
   bare step goes; and train.py's optimizer step against torch's SGD
   (bench/optimizer_step.py): the same bits on this device (the check fails
   otherwise), and its host time; and the host time of a bf16 forward without
   accelerate's forward wrapper, which train.py removes, against one with it
   (bench/forward_wrapper.py; the same bits, or the check fails). Not in the
   default set; about a minute.
i. With a CIFAR-10 folder and ``--airbench94 PATH`` (the published
   airbench94.py, which this project does not ship): airbench94 side by side
   on the same card and data (bench/airbench_baseline.py writes the folder as
   the files its loader reads, runs it for up to 75 s and reads its runs'
   test-time-augmented accuracy and GPU seconds); the mean accuracy and median
   seconds of its runs after the first (cold), and stage f's speedrun GPU
   seconds and mean accuracy against them, when stage f ran before it in the
   same check. Not in the default set; at most 75 s of airbench94 and the
   writing of its data (not yet run on a GPU). On the CPU it writes the data
   files only (airbench94 needs CUDA).

``--stages`` picks the stages and their order (default ``fcbade``: issue 12's
targets first). ``--budget-s`` (default 460) is the check's time: no stage
starts after it. A stage that raises is reported failed and the next one runs;
``gpu_check.json`` is rewritten after every stage, so a check stopped from
outside keeps the figures of the stages it finished.

It installs nothing and needs no network. What is missing is skipped with a
line saying so: stages a and c need only torch, stages b, d and e need train.py's
imports (accelerate, safetensors, pyyaml, tqdm, torchvision, numpy; without
matplotlib it trains and skips only its curves.png).
``--cpu-smoke`` runs every stage for one or two steps on the CPU, to test this
script where there is no GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import benchlib
import torch
from torch import nn

from cifar.loss import label_smoothed_cross_entropy
from cifar.models import MODELS, SpeedrunNet, build_model
from repro.determinism import configure_determinism
from repro.weights import state_dict_sha256

TRAIN_PY_MODULES = ("numpy", "torchvision", "accelerate", "safetensors", "yaml", "tqdm")
SEED = 2333
# Issue 12's targets first (f, c), then the bitwise checks, then what only reports; e takes what is left.
DEFAULT_STAGES = "fcbade"
PRECISIONS = {"no": "fp32", "bf16": "bf16"}  # mixed_precision values checked for every model, and their labels


class Report:
    """The table's rows and the JSON figures, printed as they come."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.figures: dict[str, Any] = {}
        self.failed = False

    def add(self, stage: str, check: str, result: str, detail: str = "") -> None:
        self.rows.append([stage, check, result, detail])
        self.failed |= result == "FAIL"
        print(f"[{stage}] {check}: {result} {detail}".rstrip(), flush=True)


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            missing.append(name)
    return missing


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """train.py's autocast for a ``mixed_precision`` value: auto (bf16 on CUDA), none, bf16 or fp16."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_steps(
    model_name: str, num_classes: int, label_smoothing: float, precision: str, device: torch.device, steps: int
) -> str:
    """Train a fresh model for ``steps`` steps as train.py does; return the weights' SHA-256."""
    torch.manual_seed(SEED)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_model(model_name, num_classes).to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batch_size = 64 if device.type == "cuda" else 4  # small on the CPU: the smoke test checks the code only
    images = torch.randn(steps, batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, num_classes, (steps, batch_size), device=device)
    for step in range(steps):
        with autocast(device, precision):
            logits = model(images[step].contiguous(memory_format=layout))
            loss = label_smoothed_cross_entropy(logits, labels[step], label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()  # and evaluate as train.py does
    with torch.no_grad(), autocast(device, precision):
        logits = model(images[0].contiguous(memory_format=layout))
    nn.functional.cross_entropy(logits.float(), labels[0], reduction="sum").item()
    return state_dict_sha256({k: v.detach().cpu() for k, v in model.state_dict().items()})


def strict_cases(report: Report) -> list[tuple[str, str, int, float, str]]:
    """(name, model, classes, label smoothing, precision) for each model and each config."""
    cases = [
        (f"{name} {label}", name, 10, 0.0, precision) for name in MODELS for precision, label in PRECISIONS.items()
    ]
    missing = missing_modules(("yaml", "numpy"))  # what cifar.config needs to read a config
    if missing:
        report.add("a", "configs", "skipped", f"{', '.join(missing)} missing: the models are checked, not each config")
        return cases
    from cifar.config import load_yaml

    for path in sorted((benchlib.REPO / "configs").glob("*.yaml")):
        config = load_yaml(path)
        classes = 100 if config.get("dataset") == "cifar100" else 10
        cases.append(
            (
                path.name,
                config.get("model", "resnet18"),
                classes,
                float(config.get("label_smoothing", 0.0)),
                config.get("mixed_precision", "auto"),
            )
        )
    return cases


def stage_a(report: Report, device: torch.device, steps: int) -> None:
    """Strict mode raises nothing, and a case run twice ends in the same weights."""
    for name, model_name, classes, smoothing, precision in strict_cases(report):
        try:
            first = train_steps(model_name, classes, smoothing, precision, device, steps)
            second = train_steps(model_name, classes, smoothing, precision, device, steps)
        except RuntimeError as error:
            report.add("a", f"strict {name}", "FAIL", str(error).splitlines()[0][:160])
            continue
        same = first == second
        detail = "raised nothing; " + ("same weights twice" if same else "weights DIFFER between two runs")
        report.add("a", f"strict {name}", "ok" if same else "FAIL", detail)


def child_environment() -> dict[str, str]:
    """The environment of the check's subprocesses: this one's without the
    ``CUBLAS_WORKSPACE_CONFIG`` that its strict mode set, so that each child's
    own determinism mode decides it, and the off-mode baselines run as off mode does."""
    environment = dict(os.environ)
    environment.pop("CUBLAS_WORKSPACE_CONFIG", None)
    return environment


def run_logged(command: list[str], log: Path, timeout: float) -> int | None:
    """Run ``command`` in the repository, its output in ``log``; return its exit status, or
    None when it ran past ``timeout`` seconds (it is killed then)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        try:
            result = subprocess.run(
                command,
                cwd=benchlib.REPO,
                env=child_environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
    return result.returncode


def run_train(arguments: list[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    """Run train.py, its output in ``<run_dir>.log``; return its manifest and wall
    time, or why it did not finish."""
    command = [sys.executable, str(benchlib.REPO / "train.py"), *arguments, "--output-dir", str(run_dir), "--overwrite"]
    log = run_dir.parent / f"{run_dir.name}.log"
    started = time.perf_counter()
    status = run_logged(command, log, timeout)
    wall = time.perf_counter() - started
    if status is None:
        return {"error": f"timed out after {timeout:.0f} s (log: {log})", "wall_s": wall}
    if status != 0:
        last_line = (log.read_text().strip().splitlines() or [""])[-1]
        return {"error": f"exit {status}: {last_line[:160]} (log: {log})", "wall_s": wall}
    return {"manifest": json.loads((run_dir / "manifest.json").read_text()), "wall_s": wall}


def speedrun_dir(out: Path, name: str) -> Path:
    """The run folder of stage f's run ``name``."""
    return out / "runs" / f"f_{name.replace(' ', '_')}"


def run_train_in_one_process(runs: dict[str, list[str]], out: Path, log_name: str, timeout: float) -> dict[str, Any]:
    """Run train.py once for each of ``runs`` (name: arguments), one after the other, in one
    process (bench/train_runs.py), each in ``speedrun_dir(out, name)``, all output in
    ``out/runs/<log_name>.log``; return each run's outcome as ``run_train`` does."""
    run_dirs = {name: speedrun_dir(out, name) for name in runs}
    log = out / "runs" / f"{log_name}.log"
    results_path = log.with_suffix(".json")
    results_path.unlink(missing_ok=True)
    command = [sys.executable, str(benchlib.REPO / "bench" / "train_runs.py"), str(results_path)]
    for name, arguments in runs.items():
        command += [*arguments, "--output-dir", str(run_dirs[name]), "--overwrite", "--"]
    if run_logged(command[:-1], log, timeout) is None:
        why_not = f"not reached: the process timed out after {timeout:.0f} s (log: {log})"
    else:
        why_not = f"no result (log: {log})"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    outcomes: dict[str, Any] = {}
    for index, name in enumerate(runs):
        result = results[index] if index < len(results) else {"error": why_not}
        if "error" not in result and result["status"] != 0:
            result["error"] = f"exit {result['status']} (log: {log})"
        if "error" in result:
            outcomes[name] = {"error": result["error"], "wall_s": result.get("wall_s", 0.0)}
        else:
            manifest = json.loads((run_dirs[name] / "manifest.json").read_text())
            outcomes[name] = {"manifest": manifest, "wall_s": result["wall_s"]}
    return outcomes


def stage_b(report: Report, out: Path, smoke: bool) -> None:
    """train.py: same seed, same weights; also across num_workers, and in bf16."""
    train_size, test_size, batch_size, steps = (64, 16, 16, 2) if smoke else (4096, 256, 256, 8)
    base = ["--dataset", "synthetic", "--synthetic-train-size", str(train_size), "--synthetic-test-size",
            str(test_size), "--batch-size", str(batch_size), "--max-steps", str(steps), "--model", "resnet18",
            "--epochs", "1", "--seed", str(SEED), "--determinism", "strict",
            "--data-pipeline", "dataloader", "--mixed-precision", "no"]  # fmt: skip
    runs = {
        "fp32 a": [*base, "--num-workers", "2"],
        "fp32 b": [*base, "--num-workers", "2"],
        "fp32 0 workers": [*base, "--num-workers", "0"],
        "bf16 a": [*base, "--num-workers", "2", "--mixed-precision", "bf16"],  # the later flag wins
        "bf16 b": [*base, "--num-workers", "2", "--mixed-precision", "bf16"],
        "fp32 device a": [*base, "--data-pipeline", "device"],
        "fp32 device b": [*base, "--data-pipeline", "device"],
    }
    outcomes = {}
    for name, arguments in runs.items():
        outcomes[name] = run_train(
            arguments, out / "runs" / f"b_{name.replace(' ', '_')}", timeout=300 if smoke else 120
        )
        outcome = outcomes[name]
        summary = (
            outcome.get("error") or f"{outcome['manifest']['weights_sha256'][:16]}... in {outcome['wall_s']:.0f} s"
        )
        print(f"[b] train.py {name}: {summary}", flush=True)
    report.figures["b_weights_sha256"] = {
        name: outcome["manifest"]["weights_sha256"] if "manifest" in outcome else outcome["error"]
        for name, outcome in outcomes.items()
    }
    for check, (left, right) in {
        "two strict fp32 runs": ("fp32 a", "fp32 b"),
        "2 workers vs 0 workers": ("fp32 a", "fp32 0 workers"),
        "two strict bf16 runs": ("bf16 a", "bf16 b"),
        "two strict fp32 device-pipeline runs": ("fp32 device a", "fp32 device b"),
    }.items():
        errors = [f"train.py {name}: {outcomes[name]['error']}" for name in (left, right) if "error" in outcomes[name]]
        if errors:
            report.add("b", check, "FAIL", errors[0])
            continue
        same = outcomes[left]["manifest"]["weights_sha256"] == outcomes[right]["manifest"]["weights_sha256"]
        report.add("b", check, "ok" if same else "FAIL", f"weights_sha256 {'equal' if same else 'DIFFER'}")


def images_per_s(model_name: str, device: torch.device, batch_size: int, warmup: int, steps: int) -> float:
    """Training images/s of one model in bf16 autocast and channels_last, timed after a warm-up."""
    torch.manual_seed(SEED)
    model = build_model(model_name, 10).to(device, memory_format=torch.channels_last)
    if isinstance(model, SpeedrunNet):
        # As train.py runs it after the bias's epochs (7 of 10, most of the epochs its rate is taken
        # from): stage f's whitening-bias bench measures the step with the bias's gradient.
        model.whiten.bias.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    for step in range(warmup + steps):
        if step == warmup:  # the warm-up covers cuDNN autotuning (off mode), the allocator, clocks
            synchronize(device)
            started = time.perf_counter()
        with autocast(device, "bf16"):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def throughput_process(args: argparse.Namespace) -> None:
    """In a fresh process: images/s of each model under one determinism mode (JSON on stdout)."""
    benchlib.set_determinism(args.throughput_process)  # first: before CUDA starts
    device = torch.device(args.device)
    figures = {
        name: images_per_s(name, device, args.batch_size, args.warmup, args.steps) for name in args.models.split(",")
    }
    print(json.dumps(figures))


def throughput(
    report: Report, stage: str, mode: str, device: torch.device, models: str, sizes: tuple[int, int, int]
) -> dict[str, float] | None:
    """images/s of each of ``models`` (comma-separated) in a fresh process under determinism ``mode``,
    at ``sizes`` = (batch size, warm-up steps, timed steps); None after reporting why it failed."""
    batch_size, warmup, steps = sizes
    command = [sys.executable, __file__, "--throughput-process", mode, "--device", device.type, "--models",
               models, "--batch-size", str(batch_size), "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
    check = f"throughput {models} {mode}"
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=child_environment(), timeout=240, check=False
        )
    except subprocess.TimeoutExpired:
        report.add(stage, check, "FAIL", "timed out after 240 s")
        return None
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        report.add(stage, check, "FAIL", last_line[:160])
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_c(report: Report, device: torch.device, smoke: bool) -> None:
    """Strict (without and with filling new tensors) against off throughput,
    one process per measurement, each mode twice in ABCCBA order."""
    models = "resnet9,resnet18"
    sizes = (2, 1, 1) if smoke else (512, 15, 60)
    modes = benchlib.DETERMINISM_MODES
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for mode in (*modes, *reversed(modes)):
        figures = throughput(report, "c", mode, device, models, sizes)
        if figures is None:
            return
        results[mode].append(figures)
        print(f"[c] {mode}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in results[mode][-1].items()), flush=True)
    report.figures["c_images_per_s"] = results
    for model_name in models.split(","):
        off = [r[model_name] for r in results["off"]]
        for mode in ("strict", "strict+fill"):
            measured = [r[model_name] for r in results[mode]]
            ratio = benchlib.median_ratio(measured, off)
            report.figures[f"c_ratio_{mode}_{model_name}"] = ratio
            detail = f"{median(measured):.0f} img/s, off {median(off):.0f} img/s, {mode}/off {ratio:.3f}"
            verdict = "ok" if ratio >= 0.85 else "below target"
            report.add("c", f"{model_name} bf16 channels_last {mode}", verdict, detail)


def stage_c_train_py(report: Report, out: Path, smoke: bool) -> None:
    """train.py's own step rate for resnet9 (bf16, device pipeline, strict), against
    stage c's bare strict step: what train.py's host work and augmentation cost."""
    # bf16 convolutions crawl on a CPU: the smoke test runs in full precision.
    batch_size, steps, precision = (8, 2, "no") if smoke else (512, 60, "bf16")
    arguments = ["--dataset", "synthetic", "--synthetic-train-size", str(batch_size * steps), "--synthetic-test-size",
                 str(batch_size), "--batch-size", str(batch_size), "--model", "resnet9", "--epochs", "3",
                 "--mixed-precision", precision, "--data-pipeline", "device", "--determinism", "strict",
                 "--seed", str(SEED)]  # fmt: skip
    run_dir = out / "runs" / "c_train_py_resnet9"
    outcome = run_train(arguments, run_dir, timeout=300 if smoke else 120)
    if "error" in outcome:
        report.add("c", "train.py resnet9 step rate", "FAIL", outcome["error"])
        return
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Epoch 1 pays CUDA's and cuDNN's start-up; the later epochs are the steady state.
    trained = median(record["images_per_s"] for record in records[1:])
    report.figures["c_train_py_resnet9_images_per_s"] = [record["images_per_s"] for record in records]
    bare_runs = report.figures.get("c_images_per_s", {}).get("strict")
    if not bare_runs:
        report.add("c", "train.py resnet9 step rate", "measured", f"{trained:.0f} img/s (no bare step figure)")
        return
    bare = median(r["resnet9"] for r in bare_runs)
    ratio = trained / bare
    report.figures["c_ratio_train_py_resnet9"] = ratio
    verdict = "ok" if ratio >= 0.9 else "below target"
    detail = f"{trained:.0f} img/s, bare step {bare:.0f} img/s, train.py/bare {ratio:.3f} (target >= 0.9)"
    report.add("c", "train.py resnet9 step rate", verdict, detail)


def measured(figures: dict[str, Any]) -> dict[str, Any]:
    """A bench's figures without the environment and settings it also writes: the check's JSON
    records the environment once, and the bench's own JSON, kept in OUT_DIR, its settings."""
    return {key: value for key, value in figures.items() if key not in ("environment", "settings")}


def run_bench(report: Report, stage: str, check: str, out: Path, script: str, arguments: list[str]) -> Any:
    """Run ``bench/SCRIPT.py`` with ``arguments`` and ``--json``, its output kept in
    ``OUT/SCRIPT.log``; return its JSON figures, or None after reporting the check failed."""
    json_path = out / f"{script}.json"
    command = [sys.executable, str(benchlib.REPO / "bench" / f"{script}.py"), *arguments, "--json", str(json_path)]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=child_environment(), timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        report.add(stage, check, "FAIL", f"bench/{script}.py timed out after 300 s")
        return None
    (out / f"{script}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        report.add(stage, check, "FAIL", last_line[:160])
        return None
    return json.loads(json_path.read_text())


def stage_d(report: Report, out: Path, smoke: bool) -> None:
    """The DataLoader and the device pipeline against what resnet9 trains per second."""
    workers = max(2, (os.cpu_count() or 2) // 2)
    arguments = ["--workers", f"0,{workers},device", "--repeats", "1"]
    if smoke:
        arguments += ["--train-size", "1024", "--batches", "1"]
    figures = run_bench(report, "d", "loader throughput", out, "loader_throughput", arguments)
    if figures is None:
        return
    loaders = {name: runs[0]["images_per_s"] for name, runs in figures["results"].items()}
    report.figures["d_loader_images_per_s"] = loaders
    strict = report.figures.get("c_images_per_s", {}).get("strict")
    trained = median(r["resnet9"] for r in strict) if strict else None
    for name, speed in loaders.items():
        if trained is None:
            report.add("d", name, "measured", f"{speed:.0f} img/s (no stage c figure to compare)")
        else:
            verdict = "keeps up" if speed >= trained else "starves the GPU"
            report.add("d", name, verdict, f"{speed:.0f} img/s; resnet9 bf16 strict trains {trained:.0f} img/s")


def stage_g(report: Report, out: Path, smoke: bool) -> None:
    """Whether the GPU waits for the host during train.py's steps (bench/step_timeline.py): the
    fraction of the steps' time the GPU was busy, the waits inside the steps, the longest gap;
    then whether the host or the GPU bounds the step, and what CUDA graphs save a bare step.
    Each of its runs is reported whether or not the others failed."""
    arguments = ["--trace", str(out / "step_timeline_trace.json.gz")]
    if smoke:
        arguments += ["--steps", "2", "--batch-size", "16"]
    figures = run_bench(report, "g", "GPU busy in train.py's steps", out, "step_timeline", arguments)
    if figures is not None:
        report.figures["g_step_timeline"] = measured(figures)
        report.add("g", "GPU busy in train.py's steps", "measured", timeline_summary(figures))
    stage_g_host_time(report, out, smoke, figures)
    stage_g_graphs(report, out, smoke)


HOST_BOUND_BATCH = 32  # the speedrun net's GPU work at this batch is a fraction of the host's
HOST_BOUND_MAX_BUSY = 0.5  # above it the GPU's work shares a step's wall time with the host's
BOUND_MARGIN = 0.1  # within it, host time and GPU work are too close to say which bounds the step


def stage_g_host_time(report: Report, out: Path, smoke: bool, recipe_batch: dict[str, Any] | None) -> None:
    """Stage g's second run: the same loops at a batch so small that the GPU's work is a fraction
    of the host's, so that a step's wall time is the host's time for it; set against the GPU's
    work per step at the recipe's batch (``recipe_batch``, the first run's figures, if it ran),
    it says which of the two bounds train.py's step there."""
    small = ["--batch-size", "2" if smoke else str(HOST_BOUND_BATCH), "--steps", "2" if smoke else "48"]
    host_out = out / "host_bound"  # the same bench's files, beside the first run's
    host_out.mkdir(exist_ok=True)
    host = run_bench(report, "g", "host time of the steps", host_out, "step_timeline", small)
    if host is None:
        return
    report.figures["g_host_bound"] = measured(host)
    report.add("g", f"host time of the steps, batch {host['settings']['batch_size']}", "measured",
               host_time_summary(host, recipe_batch))  # fmt: skip


def host_time_summary(host: dict[str, Any], recipe_batch: dict[str, Any] | None) -> str:
    """One line: the three loops' unprofiled µs a step at a small batch (the host's time, where
    the GPU is mostly idle), and train.py's against the GPU's work for train.py's step at the
    recipe's batch (its profiled steps' busy time there)."""
    train_py, bare = host["unprofiled_us_per_step"], host["bare"]
    detail = (f"unprofiled µs a step: train.py {train_py:.0f}, the bare loop {bare['unprofiled_us_per_step']:.0f}, "
              f"with the recipe's optimizer and lookahead {bare['recipe_unprofiled_us_per_step']:.0f}")  # fmt: skip
    if not host["gpu_activity_recorded"]:
        return f"no GPU activity recorded; {detail}"
    # The GPU's work (its busy time, profiled) as a share of the unprofiled step it is set against.
    busy = host["gpu_busy_us_per_step"] / train_py
    detail += f"; the GPU's work {busy:.0%} of that step"
    if busy > HOST_BOUND_MAX_BUSY:
        return f"{detail}: too much for these to be the host's times"
    if recipe_batch is None or not recipe_batch["gpu_activity_recorded"]:
        return f"{detail}; no GPU work measured at the recipe's batch to set them against"
    gpu_work = recipe_batch["gpu_busy_us_per_step"]
    ratio = train_py / gpu_work
    if ratio > 1 + BOUND_MARGIN:
        bound = "the host bounds it"
    elif ratio < 1 - BOUND_MARGIN:
        bound = "the GPU bounds it"
    else:
        bound = f"within {BOUND_MARGIN:.0%}: neither clearly bounds it"
    return (f"{detail}; train.py's against the GPU's {gpu_work:.0f} µs of work a step at batch "
            f"{recipe_batch['settings']['batch_size']}: {ratio:.2f}, {bound}")  # fmt: skip


def stage_g_graphs(report: Report, out: Path, smoke: bool) -> None:
    """Stage g's last runs (bench/graphed_step.py): the speedrun step with its forward and backward
    replayed as CUDA graphs against the same step eager, at the recipe's batch (the step's time)
    and at a small batch (the host's), and whether the graphs keep the eager step's bits."""
    for batch in (4, 2) if smoke else (1024, HOST_BOUND_BATCH):
        check = f"forward and backward as CUDA graphs, batch {batch}"
        arguments = ["--batch-size", str(batch), *(["--steps", "2", "--repeats", "1"] if smoke else [])]
        graphs_out = out / f"graphed_batch_{batch}"
        graphs_out.mkdir(exist_ok=True)
        graphs = run_bench(report, "g", check, graphs_out, "graphed_step", arguments)
        if graphs is None:
            continue
        if not graphs["cuda"]:
            report.add("g", check, "skipped", "CUDA only")
            continue
        report.figures[f"g_graphed_step_{batch}"] = measured(graphs)
        report.add("g", check, "measured", graphs_summary(graphs))


def graphs_summary(graphs: dict[str, Any]) -> str:
    """One line of bench/graphed_step.py's figures."""
    steps = graphs["us_per_step"]
    return (f"eager {median(steps['eager']):.0f} µs a step, graphed {median(steps['graphed']):.0f}: "
            f"{graphs['eager_over_graphed']:.2f}x; bits after {graphs['steps']} steps "
            f"{'equal' if graphs['bitwise_equal'] else 'DIFFER'}")  # fmt: skip


def timeline_summary(figures: dict[str, Any]) -> str:
    """One line of bench/step_timeline.py's figures: the GPU's busy share of train.py's steps first."""
    bare = figures["bare"]
    waits = figures["waiting_calls"] or "none"
    wall = figures["wall_us_per_step"]
    detail = f"{wall:.0f} µs a step, {wall / bare['wall_us_per_step']:.2f} x the bare loop's; waits inside: {waits}"
    unprofiled, bare_unprofiled = figures["unprofiled_us_per_step"], bare["unprofiled_us_per_step"]
    detail += f"; unprofiled {unprofiled:.0f} µs a step, {unprofiled / bare_unprofiled:.2f} x the bare loop's"
    recipe = bare["recipe_unprofiled_us_per_step"]
    detail += f", {unprofiled / recipe:.2f} x the bare loop with the recipe's optimizer and lookahead"
    if not figures["gpu_activity_recorded"]:
        return f"no GPU activity recorded; {detail}"
    detail += f"; the bare loop's GPU busy {bare['gpu_busy_fraction']:.1%}"
    if figures["longest_gaps"]:
        longest = figures["longest_gaps"][0]
        during = ", ".join(f"{name} {time:.0f}" for name, time in list(longest["during_us"].items())[:2])
        detail += f"; longest idle {longest['us']:.0f} µs (host in {during or 'no labelled part'})"
    return f"{figures['gpu_busy_fraction']:.1%} ({figures['gpu_busy_us_per_step']:.0f} µs a step); {detail}"


WRAPPED = "accelerate's wrapper"  # bench/forward_wrapper.py's name for the model accelerate prepared


def stage_h(report: Report, out: Path, smoke: bool) -> None:
    """train.py's host time per step (bench/host_overhead.py), its parts, and a cProfile in the log."""
    arguments = ["--profile", "40"]
    if smoke:
        arguments += ["--steps", "3", "--repeats", "1", "--batch-size", "64"]
    figures = run_bench(report, "h", "host time per step", out, "host_overhead", arguments)
    if figures is None:
        return
    epochs = figures["us_per_step"]
    parts = {name: median(epoch.get(name, 0.0) for epoch in epochs) for name in epochs[0]}
    bare = median(figures["bare_us_per_step"])
    report.figures["h_host_us_per_step"] = {**parts, "bare loop": bare}
    whole = parts.pop("whole step")
    parts.pop("finish_epoch", None)  # the epoch's evaluation and checkpoint, once an epoch: not the step's
    largest = ", ".join(f"{name} {value:.0f}" for name, value in sorted(parts.items(), key=lambda item: -item[1])[:4])
    host = f"{figures['host_us_per_step']:.0f} µs of host time ({figures['host_method']}; target <= 1000)"
    detail = f"{host}; the whole step {whole:.0f} µs, {whole / bare:.2f} x a bare loop's {bare:.0f}; {largest}"
    report.add("h", "host time per step", "measured", detail)
    smoke_arguments = ["--steps", "5", "--repeats", "1"] if smoke else []
    figures = run_bench(report, "h", "optimizer step", out, "optimizer_step", smoke_arguments)
    if figures is not None:
        step_us = {kind: median(values) for kind, values in figures["us_per_step"].items()}
        report.figures["h_optimizer_step_us"] = step_us
        ours = step_us.pop("NesterovSGD")
        others = ", ".join(f"{kind} {value:.0f} ({value / ours:.2f} x)" for kind, value in step_us.items())
        detail = f"the same bits as torch's SGD; speedrun groups: NesterovSGD {ours:.0f} µs; {others}"
        report.add("h", "optimizer step", "measured", detail)
    figures = run_bench(report, "h", "forward wrapper", out, "forward_wrapper", smoke_arguments or ["--steps", "200"])
    if figures is not None:
        parts = {
            part: {name: median(values) for name, values in ways.items()}
            for part, ways in figures["us_per_step"].items()
        }
        report.figures["h_forward_wrapper_us"] = parts
        detail = "; ".join(
            f"{part}: {ways['prepare_model']:.0f} µs, accelerate's wrapper {ways[WRAPPED]:.0f}"
            for part, ways in parts.items()
        )
        report.add("h", "forward without accelerate's wrapper", "measured", f"the same bits; {detail}")


def stage_i(report: Report, out: Path, data: Path, script: Path | None, smoke: bool) -> None:
    """airbench94 on the same card and data (bench/airbench_baseline.py), and the speedrun
    recipe's GPU seconds and accuracy against it when stage f ran earlier in this check."""
    if script is None:
        report.add("i", "airbench94", "skipped", "no --airbench94 PATH given (AIRBENCH94= for gpu_check.sh)")
        return
    if not script.is_file():
        report.add("i", "airbench94", "FAIL", f"--airbench94 {script}: no such file")
        return
    # airbench94's working folder holds 180 MB of data files: outside OUT, which a device session brings back.
    with tempfile.TemporaryDirectory(prefix="airbench94-") as workdir:
        arguments = ["--data-dir", str(data), "--out", workdir, "--script", str(script)]
        if smoke:
            arguments.append("--data-only")
        figures = run_bench(report, "i", "airbench94", out, "airbench_baseline", arguments)
    if figures is None:
        return
    if smoke:
        report.add("i", "airbench94's data files", "measured", f"{figures['images']} (airbench94 runs on CUDA only)")
        return
    report.figures["i_airbench94"] = measured(figures)
    if "median_seconds" not in figures:
        report.add("i", "airbench94", "FAIL", f"{len(figures['runs'])} runs finished: none after the cold one")
        return
    seconds, accuracy = figures["median_seconds"], figures["mean_tta_val_acc"]
    report.add("i", f"airbench94, {figures['warm_runs']} warm runs", "measured",
               f"{accuracy:.2%} mean; GPU {seconds:.2f} s median "
               f"({figures['seconds_range'][0]:.2f}-{figures['seconds_range'][1]:.2f} s)")  # fmt: skip
    if "f_median_gpu_s" in report.figures:
        ratio = report.figures["i_speedrun_over_airbench94_s"] = report.figures["f_median_gpu_s"] / seconds
        difference = report.figures["f_mean_accuracy"] - accuracy
        met = ratio <= 1.5 and difference >= -0.002
        report.add("i", "speedrun against airbench94", "ok" if met else "below target",
                   f"GPU time {ratio:.2f} of airbench94's (target <= 1.5, goal 1.0); accuracy "
                   f"{difference * 100:+.2f} points (target >= -0.2)")  # fmt: skip


FP32_RUN_MIN_S = 200  # stage e's full-precision run: 113 s of training on the H100 (issue 12), and 24 evaluations


def stage_e(report: Report, out: Path, data: Path, smoke: bool, deadline: float) -> None:
    """The fast config on CIFAR-10 images as shipped (``mixed_precision: auto``: bf16 on
    CUDA) and, if the time budget allows, in full precision: test accuracy, training
    seconds, wall time."""
    for label, precision in (("as shipped", []), ("fp32", ["--mixed-precision", "no"])):
        name = f"cifar10_fast.yaml {label}"
        left = deadline - time.perf_counter()
        if precision and left < FP32_RUN_MIN_S:
            report.add("e", name, "skipped", f"{max(left, 0):.0f} s of the time budget left")
            return
        arguments = ["--config", str(benchlib.REPO / "configs" / "cifar10_fast.yaml"), "--dataset", "imagefolder",
                     "--data-dir", str(data), *precision]  # fmt: skip
        if smoke:
            arguments += ["--max-steps", "1", "--batch-size", "16", "--mixed-precision", "no"]
        key = f"e_fast_{label.replace(' ', '_')}"
        run_dir = out / "runs" / key
        outcome = run_train(arguments, run_dir, timeout=max(left, 60.0))
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        figures = report.figures[key] = {"wall_s": outcome["wall_s"], "records": records}
        if "error" in outcome:
            reached = f"; {records[-1]['test_accuracy']:.2%} after epoch {records[-1]['epoch']}" if records else ""
            report.add("e", name, "FAIL", outcome["error"] + reached)
            return
        manifest = outcome["manifest"]
        training_s = sum(record["train_s"] for record in records)
        figures.update(
            test_accuracy=manifest["test_accuracy"], training_s=training_s, mixed_precision=manifest["mixed_precision"]
        )
        ran_in = PRECISIONS.get(manifest["mixed_precision"], manifest["mixed_precision"])
        detail = (f"{ran_in}: test accuracy {manifest['test_accuracy']:.2%}; "
                  f"{training_s:.1f} s training, {outcome['wall_s']:.0f} s wall")  # fmt: skip
        report.add("e", name, "ok", detail)


SPEEDRUN_SEEDS = (2333, 1, 2)
WARM_UP_SEED = 0  # the warm-up run's: its figures are reported, not counted


def gpu_seconds(records: list[dict[str, Any]]) -> float:
    """Seconds of a run's GPU work as airbench counts its own, but for the whitening layer's
    initialisation: the epochs' training and the final evaluation."""
    return sum(record["train_s"] for record in records) + records[-1]["eval_s"]


def stage_f(report: Report, device: torch.device, out: Path, data: Path, smoke: bool) -> None:
    """The speedrun recipe: accuracy and GPU seconds for three seeds, a bitwise repeat,
    determinism off, and train.py's step rate against the bare step. A run that fails
    is reported and the figures of the others still are."""
    base = ["--config", str(benchlib.SPEEDRUN_CONFIG), "--dataset", "imagefolder",
            "--data-dir", str(data), "--mixed-precision", "bf16"]  # fmt: skip
    if smoke:
        base += ["--max-steps", "1", "--batch-size", "16", "--mixed-precision", "no"]
    first_seed = ["--seed", str(SPEEDRUN_SEEDS[0])]
    warm_up = ["--seed", str(WARM_UP_SEED)]
    off = ["--determinism", "off"]
    # Each process starts with a warm-up run (issue 12 times with warm-up excluded), in the mode of the
    # runs it warms up for (off mode autotunes cuDNN in its first run). The repeat runs in a
    # process of its own, so that its weights are compared across processes too.
    processes = {
        "strict": {"warm-up": warm_up, **{f"seed {seed}": ["--seed", str(seed)] for seed in SPEEDRUN_SEEDS}},
        "repeat": {f"seed {SPEEDRUN_SEEDS[0]} repeat": first_seed},
        "off": {"warm-up off": [*warm_up, *off], f"seed {SPEEDRUN_SEEDS[0]} off": [*first_seed, *off]},
    }
    first_in_process = {next(iter(runs)) for runs in processes.values()}  # CUDA's start-up included
    outcomes: dict[str, dict[str, Any]] = {}
    for process, runs in processes.items():
        arguments = {name: [*base, *extra] for name, extra in runs.items()}
        timeout = (600 if smoke else 150) * len(runs)
        outcomes.update(run_train_in_one_process(arguments, out, f"f_{process}", timeout))
    # train.py sets the whitening layer before its clock starts; airbench times its own.
    whitening_arguments = ["--repeats", "1" if smoke else "3", "--device", device.type]
    whitening = run_bench(report, "f", "whitening", out, "whitening", whitening_arguments)
    whitening_s = whitening["median_init_whitening_s"] if whitening else 0.0
    if whitening:
        report.figures["f_whitening_s"] = whitening_s
        detail = f"{whitening_s:.3f} s on {device.type} (5,000 images), added to each run's GPU time"
        if not whitening["covariances_bitwise_equal"]:
            difference = whitening["covariances_largest_relative_difference"]
            detail += f"; the two covariance layouts differ in rounding ({difference:.2g})"
        report.add("f", "whitening layer's initialisation", "measured", detail)
    finished: dict[str, dict[str, Any]] = {}
    for name, outcome in outcomes.items():
        if "error" in outcome:
            report.add("f", f"speedrun {name}", "FAIL", outcome["error"])
            continue
        records = [json.loads(line) for line in (speedrun_dir(out, name) / "metrics.jsonl").read_text().splitlines()]
        steady = [record["images_per_s"] for record in records[1:]] or [records[0]["images_per_s"]]
        training_s = gpu_seconds(records)
        outcome.update(
            accuracy=outcome["manifest"]["test_accuracy"],
            weights_sha256=outcome["manifest"]["weights_sha256"],
            training_and_evaluation_s=training_s,
            gpu_s=training_s + whitening_s,
            images_per_s=median(steady),
        )
        finished[name] = outcome
        report.figures[f"f_speedrun {name}"] = {key: value for key, value in outcome.items() if key != "manifest"}
        start = "cold: first in its process" if name in first_in_process else "warm"
        detail = (f"test accuracy {outcome['accuracy']:.2%}; GPU {outcome['gpu_s']:.2f} s "
                  f"({training_s:.2f} s training and evaluation; {start}); "
                  f"{outcome['images_per_s']:.0f} img/s; {outcome['wall_s']:.0f} s wall")  # fmt: skip
        report.add("f", f"speedrun {name}", "measured", detail)
    seeds = [finished[f"seed {seed}"] for seed in SPEEDRUN_SEEDS if f"seed {seed}" in finished]
    if seeds:
        mean_accuracy = report.figures["f_mean_accuracy"] = sum(o["accuracy"] for o in seeds) / len(seeds)
        median_s = report.figures["f_median_gpu_s"] = median(o["gpu_s"] for o in seeds)
        report.figures["f_median_training_and_evaluation_s"] = median(o["training_and_evaluation_s"] for o in seeds)
        report.add("f", f"speedrun mean of {len(seeds)} seeds", "measured",
                   f"{mean_accuracy:.2%}; GPU {median_s:.2f} s (median, warm)")  # fmt: skip
    first = finished.get(f"seed {SPEEDRUN_SEEDS[0]}")
    repeat, off_run = finished.get(f"seed {SPEEDRUN_SEEDS[0]} repeat"), finished.get(f"seed {SPEEDRUN_SEEDS[0]} off")
    if first and repeat:
        same = first["weights_sha256"] == repeat["weights_sha256"]
        detail = f"weights_sha256 {'equal' if same else 'DIFFER'} (after a warm-up run; alone in a process)"
        report.add("f", "speedrun strict repeat", "ok" if same else "FAIL", detail)
    if first and off_run:
        # The whitening layer's time is the same code in both modes: the ratio leaves it out.
        ratio = off_run["training_and_evaluation_s"] / first["training_and_evaluation_s"]
        report.figures["f_strict_over_off_end_to_end"] = ratio
        report.add("f", "speedrun strict/off end to end", "ok" if ratio >= 0.95 else "below target",
                   f"{ratio:.3f} (warm training and evaluation seconds, off "
                   f"{off_run['training_and_evaluation_s']:.2f} s)")  # fmt: skip
    sizes = (2, 1, 1) if smoke else (1024, 15, 60)
    bare_run = throughput(report, "f", "strict", device, "speedrun", sizes)
    if bare_run is None:
        return
    bare = report.figures["f_bare_step_images_per_s"] = bare_run["speedrun"]
    # What determinism itself costs this network, to set against the end-to-end strict/off above.
    bare_off_run = throughput(report, "f", "off", device, "speedrun", sizes)
    if bare_off_run is not None:
        bare_off = report.figures["f_bare_step_off_images_per_s"] = bare_off_run["speedrun"]
        report.figures["f_bare_step_strict_over_off"] = bare / bare_off
        report.add("f", "speedrun bare step strict/off", "measured",
                   f"{bare / bare_off:.3f} (strict {bare:.0f} img/s, off {bare_off:.0f} img/s)")  # fmt: skip
    sizes_arguments = (
        ["--batch-size", "8", "--steps", "1", "--rounds", "1"] if smoke else ["--batch-size", "1024", "--steps", "40"]
    )
    bias_arguments = ["--device", device.type, *sizes_arguments]
    bias = run_bench(report, "f", "whitening bias's gradient", out, "whitening_bias", bias_arguments)
    if bias is not None:
        report.figures["f_step_without_over_with_whitening_bias_gradient"] = bias["without_over_with"]
        report.add("f", "speedrun step without/with the whitening bias's gradient", "measured",
                   f"{bias['without_over_with']:.3f} (bare steps, strict; train.py switches it off "
                   "after the bias's training epochs)")  # fmt: skip
    if first is None:
        report.add("f", "speedrun bare step", "measured", f"{bare:.0f} img/s (no train.py run to compare)")
        return
    step_ratio = first["images_per_s"] / bare
    report.figures["f_train_py_over_bare_step"] = step_ratio
    report.add("f", "speedrun train.py/bare step", "ok" if step_ratio >= 0.9 else "below target",
               f"{step_ratio:.3f} (train.py {first['images_per_s']:.0f} img/s, bare {bare:.0f} img/s)")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the JSON figures and train.py's runs")
    parser.add_argument("data", nargs="?", type=Path, help="CIFAR-10 in train/<class>/ and test/<class>/ layout")
    parser.add_argument("--cpu-smoke", action="store_true", help="each stage for 1-2 steps on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="seconds for the whole check: no stage starts after this deadline, and stage e's runs stop at it "
        "(default 460; 3600 with --cpu-smoke, where the figures mean nothing)",
    )
    parser.add_argument(
        "--stages", default=DEFAULT_STAGES, help=f"which stages to run, in this order (default {DEFAULT_STAGES})"
    )
    parser.add_argument("--airbench94", type=Path, help="stage i: the published airbench94.py, brought by you")
    parser.add_argument("--throughput-process", choices=benchlib.DETERMINISM_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is None and args.throughput_process is None:
        parser.error("OUT_DIR is required")
    if args.budget_s is None:
        args.budget_s = 3600 if args.cpu_smoke else 460
    return args


def main() -> int:
    args = parse_args()
    if args.throughput_process:
        throughput_process(args)
        return 0
    started = time.perf_counter()
    # Before CUDA is touched: strict mode sets CUBLAS_WORKSPACE_CONFIG, read when CUDA starts.
    configure_determinism("strict")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-smoke to test the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report()
    report.figures["environment"] = benchlib.environment()
    report.figures["cpu_smoke"] = args.cpu_smoke
    benchlib.print_environment(report.figures["environment"])
    missing = missing_modules(TRAIN_PY_MODULES)
    for name in missing:
        print(f"skipped: {name} missing")

    def stage_c_both() -> None:
        stage_c(report, device, args.cpu_smoke)
        if missing:
            report.add("c", "train.py resnet9 step rate", "skipped", f"train.py needs {', '.join(missing)} (missing)")
        else:
            stage_c_train_py(report, args.out, args.cpu_smoke)

    stages = {
        "a": lambda: stage_a(report, device, steps=1 if args.cpu_smoke else 3),
        "b": lambda: stage_b(report, args.out, args.cpu_smoke),
        "c": stage_c_both,
        "d": lambda: stage_d(report, args.out, args.cpu_smoke),
        "e": lambda: stage_e(report, args.out, args.data, args.cpu_smoke, deadline=started + args.budget_s),
        "f": lambda: stage_f(report, device, args.out, args.data, args.cpu_smoke),
        "g": lambda: stage_g(report, args.out, args.cpu_smoke),
        "h": lambda: stage_h(report, args.out, args.cpu_smoke),
        "i": lambda: stage_i(report, args.out, args.data, args.airbench94, args.cpu_smoke),
    }
    unknown = set(args.stages) - set(stages)
    if unknown:
        print(f"gpu_check: unknown stages {''.join(sorted(unknown))}; stages are {''.join(stages)}", file=sys.stderr)
        return 2
    stage_seconds = report.figures["stage_s"] = {}  # what each stage costs of the check's 8 minutes
    for stage in args.stages:
        stage_started = time.perf_counter()
        if stage in "bdefghi" and missing:
            report.add(stage, "train.py", "skipped", f"train.py needs {', '.join(missing)} (missing)")
        elif stage in "efi" and args.data is None:
            report.add(stage, "CIFAR-10 runs", "skipped", "no CIFAR-10 folder given")
        elif stage_started > started + args.budget_s:
            report.add(stage, "stage", "skipped", f"the {args.budget_s:.0f} s budget is spent")
        else:
            run_stage(report, stage, stages[stage])
        stage_seconds[stage] = time.perf_counter() - stage_started
        report.figures["total_s"] = time.perf_counter() - started
        write_figures(report, args.out)  # after every stage: a check stopped from outside keeps what it measured

    print()
    benchlib.print_table(["stage", "check", "result", "detail"], report.rows)
    note = "  (CPU smoke test: the figures mean nothing)" if args.cpu_smoke else ""
    by_stage = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stage_seconds.items())
    print(f"total {report.figures['total_s']:.0f} s ({by_stage}){note}")
    return 1 if report.failed else 0


def run_stage(report: Report, stage: str, run: Callable[[], None]) -> None:
    """Run one stage; an error in it fails that stage, with its traceback in the log, and the
    check goes on to the next: one device session has to bring back every stage it can."""
    try:
        run()
    except Exception as error:
        traceback.print_exc()
        report.add(stage, "stage", "FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:160])


def write_figures(report: Report, out: Path) -> None:
    """The figures so far and the table's rows, as ``OUT/gpu_check.json``."""
    (out / "gpu_check.json").write_text(json.dumps({**report.figures, "rows": report.rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
