"""Your own model and data, trained with accelerate and repro: the same seed gives the same weights.

    accelerate launch --config_file configs/accelerate/cpu_gloo.yaml examples/accelerate_train.py

The rule: GlobalBatchSampler already gives each rank its share of every global
batch, so its DataLoader is NOT passed to ``accelerator.prepare`` (accelerate
would shard it a second time; repro raises if it does). Prepare the model and
the optimizer, and move each batch to ``accelerator.device`` yourself.
"""

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from repro import GlobalBatchSampler, SeededAugmentation, SeedPlan, WorkerSeeder, seed_everything, state_dict_sha256

EPOCHS, GLOBAL_BATCH = 2, 32


def jitter(inputs: torch.Tensor) -> torch.Tensor:
    """A random augmentation: it draws from torch's generator, which repro reseeds per sample."""
    return inputs + 0.1 * torch.randn_like(inputs)


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world_size = accelerator.process_index, accelerator.num_processes
    plan = SeedPlan(2333)  # the one seed; every stream below derives from it
    torch.manual_seed(plan.model())  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    seed_everything(plan, rank)  # dropout: a different, reproducible stream per rank

    data = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 8, generator=data)
    dataset = TensorDataset(inputs, (inputs.sum(dim=1) > 0).long())
    # The sampler yields (epoch, index) keys: SeededAugmentation looks the sample up and augments it.
    train_set = SeededAugmentation(dataset, jitter, plan, generators=("torch",))
    sampler = GlobalBatchSampler(len(dataset), GLOBAL_BATCH, plan, rank=rank, world_size=world_size)
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=1,
        worker_init_fn=WorkerSeeder(plan, rank),
        generator=plan.generator("train_loader", rank),
    )

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)  # not the loader
    samples = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        model.train()
        for batch_inputs, targets in loader:
            batch_inputs, targets = batch_inputs.to(accelerator.device), targets.to(accelerator.device)
            loss = nn.functional.cross_entropy(model(batch_inputs), targets)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            samples += len(targets)
    print(f"rank {rank} trained on {samples} samples", flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"weights sha256 {state_dict_sha256(accelerator.unwrap_model(model).state_dict())}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
