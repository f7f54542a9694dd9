"""Your own model, data and loop, with repro's guarantees: seeded streams, workers that do
not change the result, exact resume after kill -9, and the run-twice verifier's tracer.

    python examples/plain_train.py --out runs/plain --stop-at 5    # stops after step 5
    python examples/plain_train.py --out runs/plain                # resumes at step 5
    python -m repro verify --steps 6 -- python examples/plain_train.py --out runs/plain
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from repro.augment import SeededAugmentation
from repro.checkpoint import Checkpointer
from repro.loader import GlobalBatchSampler, WorkerSeeder
from repro.manifest import CHECKPOINTS_DIR
from repro.seeding import seed_everything
from repro.seeds import SeedPlan
from repro.trace import StepTracer
from repro.weights import state_dict_sha256

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--stop-at", type=int, help="stop after this step, as a preempted run would")
args = parser.parse_args()

torch.set_num_threads(1)  # CPU kernels split their sums by thread: the count is part of the result
seeds = SeedPlan(2333)  # the one seed; every stream below is derived from it
seed_everything(seeds, rank=0)  # the runtime stream: dropout
tracer = StepTracer.from_environment(rank=0)  # set under `python -m repro verify`, else None
run_dir, stop_at = (tracer.run_dir, tracer.steps) if tracer else (args.out, args.stop_at)

inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
data = TensorDataset(inputs, (inputs.sum(1) > 0).long())
# The sampler yields (epoch, index) keys: SeededAugmentation seeds each sample's noise from them.
train_set = SeededAugmentation(data, lambda x: x + 0.1 * torch.randn_like(x), seeds, generators=("torch",))
sampler = GlobalBatchSampler(len(data), batch_size=16, seed=seeds)
loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, worker_init_fn=WorkerSeeder(seeds),
                    generator=seeds.generator("train_loader"), persistent_workers=args.workers > 0)  # fmt: skip

with torch.random.fork_rng(devices=[]):  # the weights come from the model stream alone
    torch.manual_seed(seeds.model())
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
total = args.epochs * len(sampler)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler}

checkpoints = Checkpointer(run_dir / CHECKPOINTS_DIR, keep=2)
restored = checkpoints.restore("auto", **state)  # None on the first start
step = restored.step if restored else 0
while step < total and step != stop_at:
    epoch, start = divmod(step, len(sampler))
    sampler.set_epoch(epoch, start)
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if tracer:
            tracer.record(step, loss.item(), model)
        consumed = step - epoch * len(sampler) - start
        checkpoints.save(step, **state, batches_consumed=consumed, progress={"loss": loss.item()})
        if step == stop_at:
            break
print(f"step {step} weights {state_dict_sha256(model.state_dict())}")
