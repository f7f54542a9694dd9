"""Train a CIFAR classifier whose result reproduces bitwise.

    python train.py --config configs/demo.yaml
    accelerate launch train.py --seed 2333

Read top to bottom: config, distributed setup, seeding, data, model,
optimizer, training loop, evaluation, save. Every random stream comes from
``repro`` (see ../DESIGN notes in README.md), derived from one seed.
"""

import repro.hashseed

# PYTHONHASHSEED is read only when the interpreter starts, so re-execute with
# it set now, before the heavy imports below make the re-execution expensive.
repro.hashseed.ensure_hash_seed()

import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cifar.config import ConfigError, TrainConfig, config_to_dict, parse_config
from cifar.data import DataError, Splits, Transformed, load_splits, test_transform, train_transform
from cifar.models import build_model
from cifar.outputs import MetricsLog, check_output_dir, default_output_dir, write_config, write_json
from repro.audit import audit_model
from repro.augment import SeededAugmentation
from repro.determinism import configure_determinism
from repro.distributed import launcher_world_size
from repro.fingerprint import environment_fingerprint
from repro.loader import GlobalBatchSampler, WorkerSeeder, make_generator
from repro.seeding import seed_everything
from repro.seeds import SeedPlan
from repro.weights import state_dict_sha256

REPO = Path(__file__).resolve().parent


class UsageError(Exception):
    """A mistake in how the run was started: one line on stderr, exit status 2."""


def setup_distributed(config: TrainConfig) -> Accelerator:
    """Create the Accelerator; refuse processes that each believe they are alone."""
    # Without cpu=True on a machine without CUDA, `accelerate launch --multi_gpu`
    # starts processes that each see a world of one and write the same folder.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    declared = launcher_world_size()
    if declared is not None and declared != accelerator.num_processes:
        raise UsageError(
            f"the launcher started {declared} processes but they formed a group of "
            f"{accelerator.num_processes}; on a CPU-only machine use "
            "`accelerate launch --config_file configs/accelerate/cpu_gloo.yaml`"
        )
    if config.batch_size % accelerator.num_processes:
        raise UsageError(
            f"--batch-size {config.batch_size} (global) must divide evenly over {accelerator.num_processes} processes"
        )
    return accelerator


def build_loaders(
    config: TrainConfig, splits: Splits, seeds: SeedPlan, accelerator: Accelerator
) -> tuple[DataLoader, GlobalBatchSampler, DataLoader]:
    """The training loader draws its order and augmentation from the seed plan alone;
    the test loader evaluates this rank's share of the test set, each image once."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    sampler = GlobalBatchSampler(
        len(splits.train), config.batch_size, seeds.order_seed or seeds.seed, rank=rank, world_size=world_size
    )
    train_set = SeededAugmentation(splits.train, train_transform(splits, config.cutout), seeds)
    common = {
        "num_workers": config.num_workers,
        "pin_memory": accelerator.device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
        "worker_init_fn": WorkerSeeder(config.seed, rank),
    }
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, generator=make_generator(config.seed, "train_loader", rank), **common
    )
    test_set = Subset(Transformed(splits.test, test_transform(splits)), range(rank, len(splits.test), world_size))
    test_loader = DataLoader(
        test_set,
        batch_size=config.batch_size // world_size,
        shuffle=False,
        generator=make_generator(config.seed, "test_loader", rank),
        **common,
    )
    return train_loader, sampler, test_loader


def build_model_for(config: TrainConfig, splits: Splits, seeds: SeedPlan) -> nn.Module:
    """Initialise the weights from the model stream: identical on every rank,
    without touching the runtime stream (dropout) of this process."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seeds.model())
        model = build_model(config.model, splits.num_classes)
    if config.determinism == "strict":
        findings = audit_model(model)
        if findings:
            raise UsageError("model has no deterministic CUDA implementation: " + "; ".join(map(str, findings)))
    return model


def build_optimizer(
    config: TrainConfig, model: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with Nesterov momentum, no weight decay on norms and biases, and a
    per-step schedule: linear warm-up, then cosine or linear decay to zero."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
    )
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(1.0 - progress, 0.0)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Test loss and accuracy over the whole test set, each image counted once."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
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


def train(
    config: TrainConfig,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    loaders: tuple[DataLoader, GlobalBatchSampler, DataLoader],
    metrics: MetricsLog,
) -> dict[str, float]:
    """The training loop: one optimizer step per global batch, evaluation each epoch."""
    train_loader, sampler, test_loader = loaders
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    step, start_time, result = 0, time.perf_counter(), {}
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        epoch_start, loss_sum, batches = time.perf_counter(), torch.zeros((), device=accelerator.device), 0
        progress = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not accelerator.is_main_process,
            leave=False,
        )
        for images, labels in progress:
            images = images.to(accelerator.device, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            with accelerator.autocast():
                loss = criterion(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
            batches += 1
            step += 1
            if config.max_steps is not None and step >= config.max_steps:
                break
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(batches, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        result = evaluate(model, test_loader, accelerator)
        seconds = time.perf_counter() - epoch_start
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": train_loss,
            **result,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": batches * config.batch_size / seconds,
            "elapsed_s": time.perf_counter() - start_time,
        }
        if accelerator.is_main_process:
            metrics.append(record)
        accelerator.print(
            f"epoch {epoch + 1}/{config.epochs}  step {step}  train loss {train_loss:.4f}  "
            f"test acc {result['test_accuracy']:.2%}  {record['images_per_s']:.0f} img/s"
        )
        if config.max_steps is not None and step >= config.max_steps:
            break
    return result


def save(
    config: TrainConfig,
    output_dir: Path,
    accelerator: Accelerator,
    model: nn.Module,
    seeds: SeedPlan,
    determinism: dict,
    splits: Splits,
    result: dict[str, float],
) -> None:
    """Write the final weights and the manifest (main process only)."""
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in accelerator.unwrap_model(model).state_dict().items()
    }
    if not accelerator.is_main_process:
        return
    save_file(state, output_dir / "model.safetensors")
    manifest = {
        "format": "repro.manifest",
        "version": 1,
        "seed": config.seed,
        "seeds": seeds.as_dict(),
        "world_size": accelerator.num_processes,
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "weights_sha256": state_dict_sha256(state),
        "determinism": determinism,
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),
        "dataset_sha256": splits.fingerprint(),
        "environment": environment_fingerprint(accelerator.num_processes, REPO),
        "config": config_to_dict(config),
    }
    write_json(output_dir / "manifest.json", manifest)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    determinism = configure_determinism(config.determinism)
    accelerator = setup_distributed(config)
    seeds = SeedPlan(config.seed, config.model_seed, config.order_seed, config.aug_seed)
    seed_everything(config.seed, accelerator.process_index)

    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    check_output_dir(output_dir, config)
    splits = load_splits(config.dataset, config.data_dir, (config.synthetic_train_size, config.synthetic_test_size))
    loaders = build_loaders(config, splits, seeds, accelerator)
    model = build_model_for(config, splits, seeds)
    optimizer, scheduler = build_optimizer(config, model, len(loaders[1]))
    model, optimizer = accelerator.prepare(model, optimizer)

    metrics = MetricsLog(output_dir / "metrics.jsonl")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(output_dir, config)
        metrics.reset()
    accelerator.wait_for_everyone()

    result = train(config, accelerator, model, optimizer, scheduler, loaders, metrics)
    save(config, output_dir, accelerator, model, seeds, determinism, splits, result)
    accelerator.wait_for_everyone()
    accelerator.print(f"final test accuracy {result['test_accuracy']:.2%}")
    accelerator.print(f"run folder: {output_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, UsageError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
