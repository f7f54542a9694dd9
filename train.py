"""Train a CIFAR classifier whose result reproduces bitwise.

    python train.py --config configs/demo.yaml
    accelerate launch train.py --seed 2333

Read top to bottom: config, distributed setup, seeding, data, model,
optimizer, training loop, evaluation, save. Every random stream comes from
``repro/``, derived from one seed (README.md explains the streams).
"""

import repro.hashseed

if __name__ == "__main__":
    # PYTHONHASHSEED is read only when the interpreter starts, so re-execute with
    # it set now, before the heavy imports below make the re-execution expensive.
    # Importing this module (a benchmark, your own script) re-executes nothing.
    repro.hashseed.ensure_hash_seed()

import contextlib
import functools
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cifar import checkpoint, tracking
from cifar.config import (
    RESULT_NEUTRAL_KEYS,
    ConfigError,
    TrainConfig,
    config_differences,
    config_to_dict,
    resolve_mixed_precision,
)
from cifar.data import (
    TRAIN_TRANSFORM_GENERATORS,
    DataError,
    Splits,
    Transformed,
    evaluation_shard,
    load_splits,
    test_transform,
    train_transform,
)
from cifar.device_data import DeviceTestBatches, DeviceTrainBatches, normalize
from cifar.lookahead import Lookahead
from cifar.models import SpeedrunNet, build_model
from cifar.optim import build_optimizer
from cifar.outputs import (
    MetricsLog,
    claim_run_dir,
    resolve_config,
    run_dir_of,
    write_config,
    write_weights,
)
from cifar.plots import plot_curves
from cifar.tta import tta_logits
from repro.audit import audit_model
from repro.augment import SeededAugmentation
from repro.checkpoint import Checkpoint, Checkpointer, CheckpointError
from repro.determinism import configure_determinism
from repro.distributed import get_rank, launcher_world_size
from repro.fingerprint import compare_fingerprints, environment_fingerprint
from repro.loader import GlobalBatchSampler, WorkerSeeder
from repro.manifest import CHECKPOINTS_DIR, CURVES_FILE, METRICS_FILE, WEIGHTS_FILE, write_manifest
from repro.seeding import seed_everything
from repro.seeds import TEST_LOADER_STREAM, TRAIN_LOADER_STREAM, SeedPlan
from repro.stop import GracefulStop
from repro.trace import StepTracer
from repro.weights import state_dict_sha256

REPO = Path(__file__).resolve().parent


class UsageError(Exception):
    """A mistake in how the run was started: one line on stderr, exit status 2."""


def setup_distributed(config: TrainConfig, run_dir: Path) -> Accelerator:
    """Create the Accelerator in the resolved precision; refuse processes that each believe they are alone."""
    tracker, tracker_note = tracking.choose_tracker(config.log_with)
    cuda = torch.cuda.is_available()
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        accelerator = Accelerator(
            # Without cpu=True on a machine without CUDA, `accelerate launch --multi_gpu`
            # starts processes that each see a world of one and write the same folder.
            cpu=not cuda,
            mixed_precision=resolve_mixed_precision(config.mixed_precision, cuda, native_bf16),
            log_with=tracker,
            project_dir=tracking.project_dir(tracker, run_dir),
        )
    except ValueError as error:  # accelerate's word on launcher variables that do not fit together
        raise UsageError(f"cannot form the process group: {error}") from None
    if tracker_note is not None:
        accelerator.print(tracker_note)
    declared = launcher_world_size()
    # accelerate's MULTI_CPU launcher without mpirun starts one process and sets
    # only MASTER_ADDR for the others it expects: no rank variable tells.
    if declared is None and "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ:
        raise UsageError(
            "accelerate launch asked for several processes but started one (MULTI_CPU needs mpirun); "
            "use `accelerate launch --config_file configs/accelerate/cpu_gloo.yaml`"
        )
    if declared is not None and declared != accelerator.num_processes:
        raise UsageError(
            f"the launcher started {declared} processes but they formed a group of "
            f"{accelerator.num_processes}; on a CPU-only machine use "
            "`accelerate launch --config_file configs/accelerate/cpu_gloo.yaml`"
        )
    per_process, remainder = divmod(config.batch_size, accelerator.num_processes)
    if remainder or per_process % config.grad_accum_steps:
        raise UsageError(
            f"--batch-size {config.batch_size} (global) must split evenly over {accelerator.num_processes} "
            f"processes and then into {config.grad_accum_steps} accumulation chunks"
        )
    if config.sync_bn and accelerator.num_processes > 1 and accelerator.device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU")
    return accelerator


Batches = DataLoader | DeviceTrainBatches | DeviceTestBatches


def build_loaders(
    config: TrainConfig, splits: Splits, seeds: SeedPlan, accelerator: Accelerator
) -> tuple[Batches, GlobalBatchSampler, Batches]:
    """The training batches draw their order and augmentation from the seed plan alone;
    the test batches are this rank's share of the test set, each image once."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    sampler = GlobalBatchSampler(len(splits.train), config.batch_size, seeds, rank=rank, world_size=world_size)
    if config.data_pipeline == "device":
        device, stats = accelerator.device, (splits.mean, splits.std)
        train_batches = DeviceTrainBatches(
            splits.train,
            sampler,
            seeds,
            *stats,
            config.cutout,
            device,
            padding=config.crop_padding,
            padding_mode=config.padding_mode,
            flip=config.flip,
        )
        test_batches = DeviceTestBatches(splits.test, rank, world_size, config.batch_size // world_size, *stats, device)
        return train_batches, sampler, test_batches
    transform = train_transform(splits, config.cutout, config.crop_padding, config.padding_mode)
    train_set = SeededAugmentation(splits.train, transform, seeds, generators=TRAIN_TRANSFORM_GENERATORS)
    common = {
        "num_workers": config.num_workers,
        "pin_memory": accelerator.device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
        "worker_init_fn": WorkerSeeder(seeds, rank),
    }
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, generator=seeds.generator(TRAIN_LOADER_STREAM, rank), **common
    )
    test_shard = evaluation_shard(len(splits.test), rank, world_size)
    test_set = Subset(Transformed(splits.test, test_transform(splits)), test_shard)
    test_loader = DataLoader(
        test_set,
        batch_size=config.batch_size // world_size,
        shuffle=False,
        generator=seeds.generator(TEST_LOADER_STREAM, rank),
        **common,
    )
    return train_loader, sampler, test_loader


WHITENING_IMAGES = 5000  # training images the whitening layer is computed from, as airbench


def build_model_for(config: TrainConfig, splits: Splits, seeds: SeedPlan, accelerator: Accelerator) -> nn.Module:
    """Initialise the weights from the model stream: identical on every rank,
    without touching the runtime stream (dropout) of this process. The speedrun
    net's whitening layer is computed from training images that the whitening
    stream chooses."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seeds.model())
        model = build_model(config.model, splits.num_classes)
    if isinstance(model, SpeedrunNet):
        chooser = torch.Generator().manual_seed(seeds.whitening())
        count = min(WHITENING_IMAGES, len(splits.train))
        chosen = torch.randperm(len(splits.train), generator=chooser)[:count].sort().values
        stats = [torch.tensor(values).view(1, -1, 1, 1) for values in (splits.mean, splits.std)]
        model.init_whitening(normalize(splits.train.images[chosen], *stats))
    if config.determinism == "strict":
        findings = audit_model(model)
        if findings:
            raise UsageError("model has no deterministic CUDA implementation: " + "; ".join(map(str, findings)))
    if config.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last(config, accelerator):
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def channels_last(config: TrainConfig, accelerator: Accelerator) -> bool:
    return config.channels_last and accelerator.device.type == "cuda"


def to_device(
    images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device, in the model's memory layout."""
    memory_format = torch.channels_last if channels_last(config, accelerator) else torch.contiguous_format
    images = images.to(accelerator.device, non_blocking=True).contiguous(memory_format=memory_format)
    return images, labels.to(accelerator.device, non_blocking=True)


EVALUATION_KEYS = ("test_loss", "test_accuracy", "test_images")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Batches, config: TrainConfig, accelerator: Accelerator, tta_level: int = 0
) -> dict[str, float]:
    """Test loss and accuracy over the whole test set, each image counted once, with
    test-time augmentation of ``tta_level`` (cifar/tta.py)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        images, labels = to_device(images, labels, config, accelerator)
        with accelerator.autocast():
            logits = tta_logits(model, images, tta_level)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        totals += torch.stack(
            [
                loss.double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(len(labels), dtype=torch.float64, device=accelerator.device),
            ]
        )
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    loss_sum, correct, count = totals.tolist()
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count, "test_images": int(count)}


@dataclass
class Progress:
    """Where the run is: all a resumed run needs besides weights, optimizer and RNG."""

    epoch: int = 0  # the epoch being trained (0-based)
    position: int = 0  # global batches of that epoch already trained
    step: int = 0  # optimizer steps since the run began
    records: list[dict] = field(default_factory=list)  # metrics of completed epochs


@dataclass
class Training:
    """One run's training objects: what the loop steps and a checkpoint saves and restores."""

    config: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: GlobalBatchSampler
    dataset_sha256: str  # Splits.fingerprint(): a checkpoint resumes only on the data it was trained on
    lookahead: Lookahead | None = None


def checkpoints(training: Training) -> Checkpointer:
    """The run's checkpoints (repro/checkpoint.py): the newest --keep-checkpoints and the best."""
    return Checkpointer(
        training.run_dir / CHECKPOINTS_DIR,
        training.config.keep_checkpoints,
        best_key="test_accuracy",
        log=lambda note: training.accelerator.print(f"resume: {note}"),
    )


def lookahead_tensors(training: Training) -> dict[str, dict[str, torch.Tensor]]:
    return {checkpoint.LOOKAHEAD_KEY: training.lookahead.slow} if training.lookahead is not None else {}


def save_checkpoint(
    training: Training, progress: Progress, loss_sum: torch.Tensor, test_accuracy: float | None = None
) -> None:
    """Write a checkpoint atomically: every rank its RNG state and loss sum, the main process the rest.

    A write that fails stops every rank with a one-line CheckpointError naming the
    folder; the checkpoints written before stay as they were.
    """
    config, accelerator, sampler = training.config, training.accelerator, training.sampler
    checkpoints(training).save(
        progress.step,
        model=accelerator.unwrap_model(training.model),
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        sampler=sampler,
        batches_consumed=progress.position - sampler.start_batch,
        progress={
            "epoch": progress.epoch,
            "position": progress.position,
            "records": progress.records,
            "test_accuracy": test_accuracy,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "config": config_to_dict(config),
            "environment": environment_fingerprint(accelerator.num_processes, REPO),
            "dataset_sha256": training.dataset_sha256,
        },
        rank_progress={"loss_sum": loss_sum.item()},
        tensors=lookahead_tensors(training),
    )


def check_continues_run(training: Training, found: Checkpoint) -> None:
    """Check, before anything is applied, that the checkpoint continues this run: the same
    config (up to run-control keys) and data, and counters that fit this run's epochs.

    Raises UsageError for an intact checkpoint of another run or other data (``--resume auto``
    must not start afresh over it), CheckpointError for one that is damaged or altered.
    """
    config, accelerator = training.config, training.accelerator
    checkpoint.check_schema(found)
    changed = config_differences(found.state["config"], config)
    if changed:
        raise UsageError(f"cannot resume {found.path} with a different config: {'; '.join(changed)}")
    if found.state["dataset_sha256"] != training.dataset_sha256:
        raise UsageError(
            f"cannot resume {found.path} on other data: it was trained on data with fingerprint "
            f"{found.state['dataset_sha256'][:12]}, the {config.dataset} data loaded now "
            f"(--data-dir {config.data_dir}) has {training.dataset_sha256[:12]}"
        )
    scaler_state = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    checkpoint.check_counters(found, len(training.sampler), training.sampler.state_dict(0), scaler_state)


def resume(training: Training, metrics: MetricsLog) -> tuple[Progress, torch.Tensor]:
    """Restore everything from the checkpoint `--resume` names, or start afresh."""
    config, accelerator = training.config, training.accelerator
    loss_sum = torch.zeros((), device=accelerator.device)
    if config.resume is None:
        return Progress(), loss_sum
    restored = checkpoints(training).restore(
        config.resume,
        model=accelerator.unwrap_model(training.model),
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        sampler=training.sampler,
        tensors=lookahead_tensors(training),
        check=functools.partial(check_continues_run, training),
    )
    if restored is None:
        accelerator.print("resume: no checkpoint yet; starting from scratch")
        return Progress(), loss_sum
    state = restored.progress
    for difference in compare_fingerprints(
        state["environment"], environment_fingerprint(accelerator.num_processes, REPO)
    ):
        warnings.warn(f"environment differs, bitwise equality is no longer promised: {difference}", stacklevel=1)
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if restored.rank_progress is not None:
        loss_sum = torch.tensor(restored.rank_progress["loss_sum"], device=accelerator.device)
    progress = Progress(state["epoch"], state["position"], restored.step, state["records"])
    if accelerator.is_main_process:
        metrics.rewrite(progress.records)
    accelerator.print(f"resumed from {restored.path} at step {progress.step} (epoch {progress.epoch + 1})")
    return progress, loss_sum


def training_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module,
    config: TrainConfig,
    accelerator: Accelerator,
) -> torch.Tensor:
    """Forward and backward over this process's batch, in `grad_accum_steps` chunks;
    gradients are all-reduced once, after the last chunk. Returns the mean loss."""
    images, labels = to_device(images, labels, config, accelerator)
    chunks = config.grad_accum_steps
    total = torch.zeros((), device=accelerator.device)
    for index, (image_chunk, label_chunk) in enumerate(zip(images.chunk(chunks), labels.chunk(chunks), strict=True)):
        last = index == chunks - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            loss = criterion(model(image_chunk), label_chunk) / chunks
        accelerator.backward(loss)
        total += loss.detach().float()
    return total


def train(
    training: Training,
    train_batches: Batches,
    test_batches: Batches,
    metrics: MetricsLog,
    progress: Progress,
    loss_sum: torch.Tensor,
    tracer: StepTracer | None,
    stop_request: GracefulStop,
) -> tuple[dict[str, float], int | None]:
    """One optimizer step per global batch; evaluation and a checkpoint at each epoch end.

    Returns the last evaluation and the signal that stopped the run, if one did.
    """
    config, accelerator, model, sampler = training.config, training.accelerator, training.model, training.sampler
    # accelerate's optimizer wrapper adds more host time per step than the SGD step it wraps
    # takes (BENCHMARKS.md, section 8); without a gradient scaler it only passes the calls on.
    optimizer = training.optimizer.optimizer if accelerator.scaler is None else training.optimizer
    scheduler = training.scheduler
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    unwrapped, lookahead = accelerator.unwrap_model(model), training.lookahead
    step_log = tracking.StepLog()
    start_time, stopped_by = time.perf_counter(), None
    # Resumed from the last epoch's checkpoint, a run has no epoch left to evaluate:
    # its result is that epoch's evaluation.
    result = {key: progress.records[-1][key] for key in EVALUATION_KEYS} if progress.records else {}
    for epoch in range(progress.epoch, config.epochs):
        sampler.set_epoch(epoch, progress.position)
        epoch_start, first_position = time.perf_counter(), progress.position
        stopping = False
        bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not accelerator.is_main_process)
        for images, labels in bar:
            loss = training_step(model, images, labels, criterion, config, accelerator)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies, before the scheduler moves it
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss
            progress.position += 1
            progress.step += 1
            step_log.record(progress.step, loss, lr)
            if lookahead is not None:
                lookahead.after_step(progress.step)
            if tracer is not None:
                tracer.record(progress.step, loss.item(), unwrapped)
            stopped_by = stop_request.agreed()
            stopping = progress.step == config.max_steps or stopped_by is not None
            epoch_done = progress.position == len(sampler)
            periodic = config.checkpoint_every and progress.step % config.checkpoint_every == 0
            if not epoch_done and (stopping or periodic):
                step_log.flush(accelerator)
                save_checkpoint(training, progress, loss_sum)
            if stopping:
                break
        bar.close()
        if stopped_by is not None and progress.position < len(sampler):
            return result, stopped_by
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(progress.position, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        train_seconds = time.perf_counter() - epoch_start  # .item() above waited for the device
        last_epoch = epoch == config.epochs - 1
        result = evaluate(model, test_batches, config, accelerator, config.tta_level if last_epoch else 0)
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": train_loss,
            **result,
            "lr": optimizer.param_groups[0]["lr"],
            # Timing fields end in _s; `python -m repro compare` leaves them out.
            "images_per_s": (progress.position - first_position) * config.batch_size / train_seconds,
            "train_s": train_seconds,
            "eval_s": time.perf_counter() - epoch_start - train_seconds,
            "elapsed_s": time.perf_counter() - start_time,
        }
        step_log.flush(accelerator)  # after the timings: writing to the tracker is neither training nor evaluation
        if accelerator.is_main_process:
            metrics.append(record)
        accelerator.print(
            f"epoch {epoch + 1}/{config.epochs}  step {progress.step}  train loss {train_loss:.4f}  "
            f"test acc {result['test_accuracy']:.2%}  {record['images_per_s']:.0f} img/s"
        )
        if progress.position < len(sampler):
            break  # stopped by --max-steps inside the epoch: its checkpoint is already written
        # Only a whole epoch's record goes to the tracker: a resumed run would not log this partial one again.
        accelerator.log({k: v for k, v in record.items() if k not in ("epoch", "step")}, step=progress.step)
        progress.records.append(record)
        progress.epoch, progress.position = epoch + 1, 0
        loss_sum.zero_()
        save_checkpoint(training, progress, loss_sum, test_accuracy=result["test_accuracy"])
        if stopping:
            return result, stopped_by
    return result, None


def save(
    config: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    model: nn.Module,
    seeds: SeedPlan,
    determinism: dict,
    splits: Splits,
    result: dict[str, float],
    progress: Progress,
) -> None:
    """Write the final weights, the manifest and the training curves (main process only)."""
    model_state = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    if not accelerator.is_main_process:
        return
    write_weights(run_dir / WEIGHTS_FILE, model_state)
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
        "dataset_sha256": splits.fingerprint(),
        "environment": environment_fingerprint(accelerator.num_processes, REPO),
        "config": config_to_dict(config),
    }
    write_manifest(run_dir, manifest, RESULT_NEUTRAL_KEYS)
    if progress.records and not plot_curves(progress.records, run_dir / CURVES_FILE):
        print(f"{CURVES_FILE} not written: matplotlib is not installed")


def prepare_run_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Claim the run folder on the main process, which holds its lock until it exits
    (cifar/outputs.py: claim_run_dir), and remove staging folders of interrupted checkpoints.

    Every rank learns the main process's verdict and, if it refused the folder,
    stops with the same one-line error: none waits for a process that gave up.
    """
    run_dir = run_dir_of(config)
    refusal = None
    if accelerator.is_main_process:
        try:
            claim_run_dir(run_dir, config)
        except ConfigError as error:
            refusal = str(error)
        else:
            for stale in Checkpointer(run_dir / CHECKPOINTS_DIR).remove_stale_staging():
                accelerator.print(f"removed {stale}, a checkpoint interrupted while being written")
    [refusal] = broadcast_object_list([refusal])
    if refusal is not None:
        raise UsageError(refusal)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    config = resolve_config(argv)
    # CPU kernels split their sums by thread, so the count changes the weights: it comes
    # from the config, not from the launcher (python takes every core, accelerate launch one).
    torch.set_num_threads(config.cpu_threads)
    tracer = StepTracer.from_environment(get_rank())
    if tracer is not None:  # under `python -m repro verify`: a short run in the verifier's folder
        config = replace(config, output_dir=str(tracer.run_dir), max_steps=tracer.steps, overwrite=True, resume=None)
    determinism = configure_determinism(config.determinism)
    accelerator = setup_distributed(config, run_dir_of(config))
    seeds = SeedPlan(config.seed, config.model_seed, config.order_seed, config.aug_seed)
    seed_everything(seeds, accelerator.process_index)

    run_dir = prepare_run_dir(config, accelerator)
    splits = load_splits(config.dataset, config.data_dir, (config.synthetic_train_size, config.synthetic_test_size))
    if config.batch_size > len(splits.train):
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(splits.train)} images)"
        )
    train_batches, sampler, test_batches = build_loaders(config, splits, seeds, accelerator)
    model = build_model_for(config, splits, seeds, accelerator)
    optimizer, scheduler = build_optimizer(config, model, len(sampler))
    model, optimizer = accelerator.prepare(model, optimizer)
    lookahead = None
    if config.lookahead_every:
        total_steps = config.epochs * len(sampler)
        lookahead = Lookahead(accelerator.unwrap_model(model), config.lookahead_every, total_steps)
    training = Training(
        config, run_dir, accelerator, model, optimizer, scheduler, sampler, splits.fingerprint(), lookahead
    )

    metrics = MetricsLog(run_dir / METRICS_FILE)
    progress, loss_sum = resume(training, metrics)
    if accelerator.is_main_process:
        write_config(run_dir, config)
        if progress.step == 0:
            metrics.rewrite([])
    tracking.init_trackers(accelerator, run_dir, progress.step)
    accelerator.wait_for_everyone()

    # SIGTERM (a scheduler's preemption) and SIGINT stop the run after its current step, with a checkpoint.
    with GracefulStop() as stop:
        result, stopped_by = train(training, train_batches, test_batches, metrics, progress, loss_sum, tracer, stop)
    if stopped_by is not None:
        accelerator.print(
            f"stopped by {signal.Signals(stopped_by).name} at step {progress.step}; checkpoint written; "
            f"continue with --resume latest --output-dir {run_dir}"
        )
        # Destroy the process groups here too: a gloo worker thread still alive when the
        # interpreter shuts down can abort the process (SIGABRT) as it lets go of a tensor.
        accelerator.end_training()
        return 128 + stopped_by
    save(config, run_dir, accelerator, model, seeds, determinism, splits, result, progress)
    accelerator.wait_for_everyone()
    accelerator.print(f"final test accuracy {result['test_accuracy']:.2%}")
    accelerator.print(f"run folder: {run_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, UsageError, CheckpointError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
