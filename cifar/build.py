"""Build a run's objects from its config: the Accelerator, the run folder, the
batches, the model and the rest of what the loop steps. train.py calls these in
order; each checks what it can refuse with one line (UsageError) before anything
is written or trained. The benchmarks of train.py's loop build it with them too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_compiled_module
from torch import nn
from torch.utils.data import DataLoader, Subset

from cifar import tracking
from cifar.checkpoint import Training
from cifar.config import ConfigError, TrainConfig, UsageError, resolve_mixed_precision
from cifar.data import (
    TRAIN_TRANSFORM_GENERATORS,
    Splits,
    Transformed,
    evaluation_shard,
    test_transform,
    train_transform,
)
from cifar.device_data import DeviceTestBatches, DeviceTrainBatches, normalize
from cifar.lookahead import Lookahead
from cifar.models import SpeedrunNet, build_model
from cifar.optim import build_optimizer
from cifar.outputs import RunFolderError, claim_run_dir, run_dir_of
from repro.audit import audit_model
from repro.augment import SeededAugmentation
from repro.checkpoint import Checkpointer
from repro.distributed import declared_world_size, launcher_world_size
from repro.loader import GlobalBatchSampler, WorkerSeeder
from repro.manifest import CHECKPOINTS_DIR
from repro.seeds import TEST_LOADER_STREAM, TRAIN_LOADER_STREAM, SeedPlan
from repro.stop import JOB_STOP_SIGNALS, IgnoreStopSignals

DYNAMO_VARIABLE = "ACCELERATE_DYNAMO_BACKEND"  # what `accelerate launch` sets from its dynamo setting


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
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
            # Not the launcher's dynamo setting (a user's default accelerate config, or --dynamo_backend):
            # it compiled the model unrecorded, and its checkpoints' names resumed nowhere else.
            dynamo_backend="no",
            log_with=tracker,
            project_dir=tracking.project_dir(tracker, run_dir),
        )
    except ValueError as error:  # accelerate's word on launcher variables that do not fit together
        raise UsageError(f"cannot form the process group: {error}") from None
    if tracker_note is not None:
        accelerator.print(tracker_note)
    launcher_dynamo = os.environ.get(DYNAMO_VARIABLE, "no")
    if launcher_dynamo.lower() != "no":
        accelerator.print(
            f"{DYNAMO_VARIABLE}={launcher_dynamo} ignored: train.py compiles the model itself with "
            "--compile, which its config records"
        )
    declared = launcher_world_size()
    # accelerate's MULTI_CPU launcher without mpirun starts one process and sets
    # only MASTER_ADDR for the others it expects: no rank variable tells.
    if declared is None and "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ:
        raise UsageError(
            "accelerate launch asked for several processes but started one (MULTI_CPU needs mpirun); "
            "use `accelerate launch --config_file configs/accelerate/cpu_gloo.yaml`"
        )
    mismatch = world_size_mismatch(accelerator.num_processes)
    if mismatch is not None:
        raise UsageError(mismatch)
    per_process, remainder = divmod(config.batch_size, accelerator.num_processes)
    if remainder or per_process % config.grad_accum_steps:
        raise UsageError(
            f"--batch-size {config.batch_size} (global) must split evenly over {accelerator.num_processes} "
            f"processes and then into {config.grad_accum_steps} accumulation chunks"
        )
    if config.sync_bn and accelerator.num_processes > 1 and accelerator.device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU")
    return accelerator


def world_size_mismatch(formed: int) -> str | None:
    """The one-line error for processes that formed a group of ``formed`` where a launcher
    variable declared another size, naming the variable and what to do for its launcher;
    ``None`` when no variable declares a size, or this one."""
    declaration = declared_world_size()
    if declaration is None or declaration[1] == formed:
        return None
    variable, declared = declaration
    said = f"{variable}={declared} says {declared} processes but "
    said += "this one is alone" if formed == 1 else f"they formed a group of {formed}"
    if variable == "SLURM_NTASKS":
        # Set for the whole job, the batch script's own process too; accelerate reads no SLURM_* variable.
        return (
            f"{said}: Slurm sets it for the whole job, and srun alone forms no group; train on the allocation "
            "with scripts/slurm_train.sbatch (srun starts `accelerate launch`, which does), or in one "
            "process with `env -u SLURM_NTASKS python train.py ...`"
        )
    return f"{said}; on a CPU-only machine use `accelerate launch --config_file configs/accelerate/cpu_gloo.yaml`"


def claim_run_folder(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Claim the run folder on the main process, which holds its lock until it exits
    (cifar/outputs.py: claim_run_dir), and remove staging folders of interrupted checkpoints.

    Every rank learns the main process's verdict and, if it refused the folder,
    stops with the same one-line error: none waits for a process that gave up.
    """
    run_dir = run_dir_of(config)

    def claim() -> None:
        claim_run_dir(run_dir, config)
        for stale in Checkpointer(run_dir / CHECKPOINTS_DIR).remove_stale_staging():
            accelerator.print(f"removed {stale}, a checkpoint interrupted while being written")

    write_on_main_process(accelerator, claim, "make room, then run the same command again")
    return run_dir


def write_on_main_process(accelerator: Accelerator, write: Callable[[], None], advice: str) -> None:
    """Call ``write`` (files of the run folder) on the main process; when it fails there
    (a full disk, a folder made read-only, a folder refused), every rank stops with the
    same one-line :class:`ConfigError`, an ``OSError``'s ending in ``advice``.

    When: wherever the main process writes the run folder between collectives, on
    every rank at the same point (a collective under torch.distributed). Without it
    the main process died with a traceback and the others with a lost connection.
    """
    failure = None
    if accelerator.is_main_process:
        try:
            write()
        except ConfigError as error:
            failure = str(error)
        except OSError as error:
            failure = f"cannot write the run folder ({error.strerror or error}: {error.filename}); {advice}"
    [failure] = broadcast_object_list([failure])
    if failure is not None:
        raise RunFolderError(failure)


Batches = DataLoader | DeviceTrainBatches | DeviceTestBatches


def build_loaders(
    config: TrainConfig, splits: Splits, seeds: SeedPlan, accelerator: Accelerator
) -> tuple[Batches, GlobalBatchSampler, Batches]:
    """The training batches draw their order and augmentation from the seed plan alone;
    the test batches are this rank's share of the test set, each image once."""
    if config.batch_size > len(splits.train):
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(splits.train)} images)"
        )
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if len(splits.test) < world_size:
        # A rank with no test image would skip the evaluation's forward pass, and with it DDP's
        # broadcast of the BatchNorm buffers that the other ranks wait in: the run would hang.
        images = "1 image" if len(splits.test) == 1 else f"{len(splits.test)} images"
        raise UsageError(
            f"the test set has {images}, fewer than the {world_size} processes: "
            "each process evaluates a share of it and needs at least one image"
        )
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
            memory_format=memory_format(config, accelerator),
        )
        test_batches = DeviceTestBatches(splits.test, rank, world_size, config.batch_size // world_size, *stats, device)
        return train_batches, sampler, test_batches
    transform = train_transform(splits, config.cutout, config.crop_padding, config.padding_mode)
    train_set = SeededAugmentation(splits.train, transform, seeds, generators=TRAIN_TRANSFORM_GENERATORS)
    common = {
        "num_workers": config.num_workers,
        "pin_memory": accelerator.device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
        # A stop signal sent to the process group must not kill the workers: the run stops after its step.
        "worker_init_fn": IgnoreStopSignals(WorkerSeeder(seeds, rank), JOB_STOP_SIGNALS),
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
    stream chooses, on the run's device: airbench counts its whitening in its
    time, and at the host's one thread it took 0.6 s (BENCHMARKS.md, section 7.1)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seeds.model())
        model = build_model(config.model, splits.num_classes)
    if isinstance(model, SpeedrunNet):
        chooser = torch.Generator().manual_seed(seeds.whitening())
        count = min(WHITENING_IMAGES, len(splits.train))
        chosen = torch.randperm(len(splits.train), generator=chooser)[:count].sort().values
        device = accelerator.device
        stats = [torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (splits.mean, splits.std)]
        model.init_whitening(normalize(splits.train.images[chosen].to(device), *stats))
    if config.determinism == "strict":
        findings = audit_model(model)
        if findings:
            raise UsageError("model has no deterministic CUDA implementation: " + "; ".join(map(str, findings)))
    if config.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if memory_format(config, accelerator) == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def prepare_training(
    config: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    model: nn.Module,
    sampler: GlobalBatchSampler,
    splits: Splits,
    environment: dict[str, Any],
) -> Training:
    """Give ``model`` its optimizer and schedule, let accelerate prepare the model and the
    optimizer (not the loaders: they shard themselves), and add the lookahead if the config
    has one: the objects the loop steps and a checkpoint saves. Call it after building the
    model and the loaders; ``environment`` is the fingerprint taken as the run started."""
    optimizer, scheduler = build_optimizer(config, model, len(sampler))
    model, optimizer = prepare_model(accelerator, model, optimizer)
    lookahead = None
    if config.lookahead_every:
        total_steps = config.epochs * len(sampler)
        lookahead = Lookahead(accelerator.unwrap_model(model), config.lookahead_every, total_steps)
    return Training(
        config, run_dir, accelerator, model, optimizer, scheduler, sampler, splits.fingerprint(), environment, lookahead
    )


def prepare_model(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """accelerate's ``prepare`` of the model and its optimizer, without the wrapper it puts
    around the model's forward in mixed precision.

    That wrapper runs the forward in an autocast of its own and casts the outputs to
    float32. train.py runs the model under autocast already (``training_step``,
    ``evaluate``), and its loss and test-time augmentation cast the logits to float32:
    the wrapper changes no value (``tests/test_loss.py``, bf16) and costs host time at
    every forward (BENCHMARKS.md, section 8). Call the returned model inside
    ``accelerator.autocast()``, as train.py does. The model's forward becomes what it
    was before ``prepare``, its own decorators kept; a compiled model keeps the wrapper.
    """
    compiled = is_compiled_module(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not compiled:
        inner = accelerator.unwrap_model(model)  # out of DDP, with accelerate's wrapper still on
        # accelerate keeps the forward it wrapped on the model: putting it back undoes just that wrapping.
        original = vars(inner).pop("_original_forward", None)
        if original is not None:
            inner.forward = original
    return model, optimizer


def memory_format(config: TrainConfig, accelerator: Accelerator) -> torch.memory_format:
    """The model's and its inputs' memory layout: channels_last only on CUDA, where it is faster."""
    on_cuda = accelerator.device.type == "cuda"
    return torch.channels_last if config.channels_last and on_cuda else torch.contiguous_format


def to_device(
    images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device, in the model's memory layout."""
    images = images.to(accelerator.device, non_blocking=True)
    images = images.contiguous(memory_format=memory_format(config, accelerator))
    return images, labels.to(accelerator.device, non_blocking=True)
