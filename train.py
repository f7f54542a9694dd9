"""Train a CIFAR classifier whose result reproduces bitwise.

    python train.py --config configs/demo.yaml
    accelerate launch train.py --seed 2333

Read main() top to bottom: config, distributed setup, seeding, data, model,
optimizer, resume, the training loop (evaluation and a checkpoint at each
epoch end), save. The pieces live in cifar/ (this pipeline) and repro/ (the
library); every random stream is derived from one seed (README.md, Guarantees).
"""

import sys

import repro.hashseed

if __name__ == "__main__":
    # PYTHONHASHSEED is read only when the interpreter starts, so re-execute with
    # it set now, before the heavy imports below make the re-execution expensive.
    # Importing this module (a benchmark, your own script) re-executes nothing.
    try:
        repro.hashseed.ensure_hash_seed()
    except RuntimeError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from cifar import data_cache, tracking
from cifar.build import (
    Batches,
    build_loaders,
    build_model_for,
    claim_run_folder,
    make_accelerator,
    prepare_training,
    to_device,
    write_on_main_process,
)
from cifar.checkpoint import Progress, Training, resume, save_checkpoint
from cifar.config import RESULT_NEUTRAL_KEYS, ConfigError, TrainConfig, UsageError, config_to_dict
from cifar.data import DataError, load_splits_on_every_rank
from cifar.loss import label_smoothed_cross_entropy
from cifar.optim import set_whitening_bias_training
from cifar.outputs import (
    MetricsLog,
    RunFolderError,
    clear_run_dir,
    remove_final_files,
    resolve_config,
    run_dir_of,
    write_config,
    write_weights,
)
from cifar.plots import plot_curves
from cifar.tta import tta_logits
from repro.checkpoint import CheckpointError
from repro.determinism import configure_determinism
from repro.distributed import LauncherVariableError, get_rank, leave_process_group
from repro.fingerprint import environment_fingerprint
from repro.manifest import CURVES_FILE, METRICS_FILE, RESUMED_ELSEWHERE, WEIGHTS_FILE, write_manifest
from repro.seeding import seed_everything
from repro.seeds import SeedPlan
from repro.stop import JOB_STOP_SIGNALS, GracefulStop
from repro.trace import StepTracer, TraceSettingError
from repro.weights import state_dict_sha256

REPO = Path(__file__).resolve().parent  # its git state goes into the environment fingerprint


def main(argv: list[str] | None = None) -> int:
    """Train one run, or continue it; returns the exit status (128 + N when signal N stopped it)."""
    config = resolve_config(argv)  # YAML, then flags; a resumed run starts from its saved config.yaml
    # CPU kernels split their sums by thread, so the count changes the weights: it comes
    # from the config, not from the launcher (python takes every core, accelerate launch one).
    torch.set_num_threads(config.cpu_threads)
    tracer = StepTracer.from_environment(get_rank())
    if tracer is not None:  # under `python -m repro verify`: a short run in the verifier's folder
        if get_rank() == 0:
            print(tracer.takeover_note(), file=sys.stderr)
        config = replace(config, output_dir=str(tracer.run_dir), max_steps=tracer.steps, overwrite=True, resume=None)
    determinism = configure_determinism(config.determinism)

    accelerator = make_accelerator(config, run_dir_of(config))
    # Taken once, before the data loads: the commit of the code this process runs, whatever
    # the checkout holds by the time a checkpoint or the manifest records it.
    environment = environment_fingerprint(accelerator.num_processes, REPO)
    seeds = SeedPlan(config.seed, config.model_seed, config.order_seed, config.aug_seed)
    seed_everything(seeds, accelerator.process_index)
    run_dir = claim_run_folder(config, accelerator)

    sizes = (config.synthetic_train_size, config.synthetic_test_size)
    splits = load_splits_on_every_rank(config.dataset, config.data_dir, sizes, data_cache.cache_dir(config.data_cache))
    if splits.source:
        accelerator.print(splits.source)
    train_batches, sampler, test_batches = build_loaders(config, splits, seeds, accelerator)
    last_step = config.epochs * len(sampler)
    if config.max_steps is not None and config.max_steps >= last_step:
        # It stops nothing: the run records null, as one never stopped does (for compare, and a resume).
        config = replace(config, max_steps=None)
    model = build_model_for(config, splits, seeds, accelerator)
    # The optimizer, its schedule and the lookahead; the model and optimizer prepared by accelerate.
    training = prepare_training(config, run_dir, accelerator, model, sampler, splits, environment)
    again = "make room, then run the same command again"
    if config.overwrite:  # only now: a run refused above (its data, its batch size) deletes nothing
        write_on_main_process(accelerator, lambda: clear_run_dir(run_dir), again)

    metrics = MetricsLog(run_dir / METRICS_FILE)
    progress, loss_sum = resume(training)
    trains_on = progress.step < (config.max_steps or last_step)
    write_on_main_process(accelerator, lambda: start_run_files(run_dir, config, metrics, progress, trains_on), again)
    tracking.init_trackers(accelerator, run_dir, progress.step)
    accelerator.wait_for_everyone()

    # A scheduler's SIGTERM (or the SIGUSR1 it sends first), Ctrl-C and SIGHUP stop the run after its
    # current step, with a checkpoint.
    with GracefulStop(signals=JOB_STOP_SIGNALS) as stop:
        result, stopped_by = train(training, train_batches, test_batches, metrics, progress, loss_sum, tracer, stop)
    if stopped_by is None:
        save(training, seeds, determinism, result, progress)
        accelerator.wait_for_everyone()
        accelerator.print(f"final test accuracy {result['test_accuracy']:.2%}")
        accelerator.print(f"run folder: {run_dir}")
    else:
        accelerator.print(
            f"stopped by {stopped_by.name} at step {progress.step}; checkpoint written; "
            f"continue with --resume latest --output-dir {run_dir}"
        )
    # Destroy the process groups on every path: a gloo worker thread still alive when the
    # interpreter shuts down can abort the process (SIGABRT) as it lets go of a tensor.
    tracking.finish_trackers(accelerator)
    accelerator.end_training()
    return 0 if stopped_by is None else 128 + stopped_by


def start_run_files(
    run_dir: Path, config: TrainConfig, metrics: MetricsLog, progress: Progress, trains_on: bool
) -> None:
    """Write what a starting or resumed run keeps in its folder: its config, and the metrics
    records its checkpoint holds; one that ``trains_on`` first removes the files of its old end."""
    if trains_on:
        # Training on, the run leaves the end its manifest describes: a kill from here on
        # must leave no manifest beside the checkpoints, metrics and config of another end.
        remove_final_files(run_dir)
    write_config(run_dir, config)
    metrics.rewrite(progress.records)  # a resumed run drops the lines logged after its checkpoint


@dataclass
class EpochClock:
    """When the run and the current epoch started, and the batch the epoch started from
    (a resumed epoch starts part-way): what the epoch's record times."""

    run_start: float
    epoch_start: float
    first_position: int


def train(
    training: Training,
    train_batches: Batches,
    test_batches: Batches,
    metrics: MetricsLog,
    progress: Progress,
    loss_sum: torch.Tensor,
    tracer: StepTracer | None,
    stop: GracefulStop,
) -> tuple[dict[str, float], signal.Signals | None]:
    """One optimizer step per global batch, from where ``progress`` stands; at each epoch end
    an evaluation, a metrics record and a checkpoint.

    The loop has one exit: after the last epoch, at ``--max-steps``, or after the step in
    which a signal reached any rank. Returns the last evaluation and that signal, if any.
    """
    config, accelerator, model, sampler = training.config, training.accelerator, training.model, training.sampler
    # accelerate's optimizer wrapper adds more host time per step than the SGD step it wraps
    # takes (BENCHMARKS.md, section 8); without a gradient scaler it only passes the calls on.
    optimizer = training.optimizer.optimizer if accelerator.scaler is None else training.optimizer
    unwrapped, lookahead, step_log = accelerator.unwrap_model(model), training.lookahead, tracking.StepLog()
    now = time.perf_counter()
    clock = EpochClock(now, now, progress.position)
    # Resumed from the last epoch's checkpoint, a run has no epoch left to evaluate:
    # its result is that epoch's evaluation.
    result = {key: progress.records[-1][key] for key in EVALUATION_KEYS} if progress.records else {}
    if progress.step == config.max_steps:
        # Resumed where --max-steps stopped it: nothing to train. Inside an epoch, that stop
        # evaluated what it trained, and so does this.
        if progress.position:
            result = finish_epoch(training, test_batches, metrics, progress, loss_sum, step_log, clock)
        return result, None
    if tracer is not None:  # a traced run starts fresh: its initial weights, before step 1
        tracer.record_start(unwrapped)
    stopped_by = None
    for images, labels in remaining_batches(train_batches, training, progress):
        loss = training_step(model, images, labels, config, accelerator)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step applies, before the scheduler moves it
        optimizer.step()
        training.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss
        progress.position += 1
        progress.step += 1
        step_log.record(progress.step, loss, lr)
        if lookahead is not None:
            lookahead.after_step(progress.step)
        if tracer is not None:
            tracer.record(progress.step, loss.item(), unwrapped)
        stopped_by = stop.agreed()
        stopping = progress.step == config.max_steps or stopped_by is not None
        epoch_done = progress.position == len(sampler)
        periodic = config.checkpoint_every and progress.step % config.checkpoint_every == 0
        if not epoch_done and (stopping or periodic):
            step_log.flush(accelerator)
            save_checkpoint(training, progress, loss_sum)
        # --max-steps inside an epoch evaluates what it trained; a signal inside one only checkpoints.
        if epoch_done or (stopping and stopped_by is None):
            result = finish_epoch(training, test_batches, metrics, progress, loss_sum, step_log, clock)
        if stopping:
            break
    return result, stopped_by


def remaining_batches(train_batches: Batches, training: Training, progress: Progress) -> Iterator[tuple]:
    """The training batches from where ``progress`` stands to the run's last epoch, with a
    progress bar per epoch; as each epoch starts, its order is set on the sampler and the
    whitening bias's gradient switched on or off."""
    config, accelerator = training.config, training.accelerator
    unwrapped = accelerator.unwrap_model(training.model)
    # DDP and fp16's gradient scaler see every gradient: for them the whitening bias keeps its own.
    keep_bias_gradient = accelerator.num_processes > 1 or accelerator.scaler is not None
    for epoch in range(progress.epoch, config.epochs):
        training.sampler.set_epoch(epoch, progress.position)
        set_whitening_bias_training(unwrapped, epoch, config, always=keep_bias_gradient)
        description = f"epoch {epoch + 1}/{config.epochs}"
        with tqdm(train_batches, desc=description, disable=not accelerator.is_main_process) as bar:
            yield from bar


def finish_epoch(
    training: Training,
    test_batches: Batches,
    metrics: MetricsLog,
    progress: Progress,
    loss_sum: torch.Tensor,
    step_log: tracking.StepLog,
    clock: EpochClock,
) -> dict[str, float]:
    """Close the epoch (or the part of it a ``--max-steps`` run trained): its mean training loss,
    an evaluation (with test-time augmentation after the last epoch) and a metrics record; for a
    whole epoch also the tracker's record and a checkpoint. Returns the evaluation."""
    config, accelerator = training.config, training.accelerator
    epoch = progress.epoch
    train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(progress.position, 1)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
    train_seconds = time.perf_counter() - clock.epoch_start  # .item() above waited for the device
    tta_level = config.tta_level if epoch == config.epochs - 1 else 0
    result = evaluate(training.model, test_batches, config, accelerator, tta_level)
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "train_loss": train_loss,
        **result,
        "lr": training.optimizer.param_groups[0]["lr"],
        # Timing fields end in _s; `python -m repro compare` leaves them out.
        "images_per_s": (progress.position - clock.first_position) * config.batch_size / train_seconds,
        "train_s": train_seconds,
        "eval_s": time.perf_counter() - clock.epoch_start - train_seconds,
        "elapsed_s": time.perf_counter() - clock.run_start,
    }
    step_log.flush(accelerator)  # after the timings: writing to the tracker is neither training nor evaluation
    accelerator.print(
        f"epoch {epoch + 1}/{config.epochs}  step {progress.step}  train loss {train_loss:.4f}  "
        f"test acc {result['test_accuracy']:.2%}  {record['images_per_s']:.0f} img/s"
    )
    if progress.position == len(training.sampler):
        # Only a whole epoch's record goes to the tracker: a resumed run would not log a partial one again.
        tracking.log(accelerator, {k: v for k, v in record.items() if k not in ("epoch", "step")}, progress.step)
        progress.records.append(record)
        progress.epoch, progress.position = epoch + 1, 0
        loss_sum.zero_()
        save_checkpoint(training, progress, loss_sum, test_accuracy=result["test_accuracy"])
        clock.epoch_start, clock.first_position = time.perf_counter(), 0
    # Only now, a checkpoint of this step written: a folder whose metrics.jsonl holds a record
    # but that has no checkpoint is one whose checkpoints were deleted (cifar/outputs.py: run_result_file).
    resume_command = f"python train.py --resume latest --output-dir {training.run_dir}"
    advice = f"the checkpoint holds the record: make room, then {resume_command}"
    write_on_main_process(accelerator, lambda: metrics.append(record), advice)
    return result


def training_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    accelerator: Accelerator,
) -> torch.Tensor:
    """Forward and backward over this process's batch, in `grad_accum_steps` chunks;
    gradients are all-reduced once, after the last chunk. Returns the mean loss."""
    images, labels = to_device(images, labels, config, accelerator)
    chunks = config.grad_accum_steps
    # One chunk is the batch itself: no split dispatched at every step.
    pieces = zip(images.chunk(chunks), labels.chunk(chunks), strict=True) if chunks > 1 else [(images, labels)]
    total = None  # the first chunk's loss itself: no zero tensor made and added to every step
    for index, (image_chunk, label_chunk) in enumerate(pieces):
        last = index == chunks - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            loss = label_smoothed_cross_entropy(model(image_chunk), label_chunk, config.label_smoothing)
        if chunks > 1:
            loss = loss / chunks
        if accelerator.scaler is None:
            # accelerate's backward divides by its own accumulation count (1: train.py
            # accumulates itself) before this call: an operation and its gradient every step.
            loss.backward()
        else:
            accelerator.backward(loss)
        chunk_loss = loss.detach().float()
        total = chunk_loss if total is None else total + chunk_loss
    return total


EVALUATION_KEYS = ("test_loss", "test_accuracy", "test_images")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Batches, config: TrainConfig, accelerator: Accelerator, tta_level: int = 0
) -> dict[str, float]:
    """Test loss and accuracy over the whole test set, each image counted once, with
    test-time augmentation of ``tta_level`` (cifar/tta.py)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss, correct
    images_seen = 0  # counted on the host: a count made into a device tensor per batch would wait for the GPU
    for images, labels in loader:
        images, labels = to_device(images, labels, config, accelerator)
        with accelerator.autocast():
            logits = tta_logits(model, images, tta_level)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(1) == labels).sum().double()])
        images_seen += len(labels)
    totals = accelerator.reduce(torch.cat([sums, sums.new_tensor([images_seen])]), reduction="sum")
    model.train()
    loss_sum, correct, count = totals.tolist()
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count, "test_images": int(count)}


def save(
    training: Training,
    seeds: SeedPlan,
    determinism: dict,
    result: dict[str, float],
    progress: Progress,
) -> None:
    """Write the final weights, the manifest and the training curves (main process only)."""
    config, run_dir, accelerator = training.config, training.run_dir, training.accelerator
    unwrapped = accelerator.unwrap_model(training.model)
    model_state = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
    if not accelerator.is_main_process:
        return
    manifest = {
        "seed": config.seed,
        "seeds": seeds.as_dict(),
        "world_size": accelerator.num_processes,
        "step": progress.step,
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "test_images": result["test_images"],
        "weights_sha256": state_dict_sha256(model_state),
        "determinism": determinism,
        "mixed_precision": accelerator.mixed_precision,  # what ran: the config may say auto
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),
        "dataset_sha256": training.dataset_sha256,
        "environment": training.environment,
        "config": config_to_dict(config),
    }
    if progress.resumed_elsewhere:
        manifest[RESUMED_ELSEWHERE] = progress.resumed_elsewhere
    try:
        write_weights(run_dir / WEIGHTS_FILE, model_state)
        write_manifest(run_dir, manifest, RESULT_NEUTRAL_KEYS)
        curves_written = not progress.records or plot_curves(progress.records, run_dir / CURVES_FILE)
    except OSError as error:  # a full disk: the last checkpoint holds the result, and a resume writes it
        raise RunFolderError(
            f"cannot write the run's final files in {run_dir} ({error.strerror or error}); its last checkpoint "
            f"holds the result: make room, then python train.py --resume latest --output-dir {run_dir}"
        ) from None
    if not curves_written:
        print(f"{CURVES_FILE} not written: matplotlib is not installed")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, UsageError, CheckpointError, TraceSettingError, LauncherVariableError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C before the training loop, or after it: the loop itself stops at a step, with a checkpoint.
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        # After an error too: a gloo group left alive aborted one exit (SIGABRT) in place of status 2.
        leave_process_group()
