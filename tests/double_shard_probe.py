"""Pass a DataLoader on GlobalBatchSampler to accelerator.prepare, the mistake repro refuses.

    accelerate launch --config_file configs/accelerate/cpu_gloo.yaml tests/double_shard_probe.py

Each rank prints one line: ``rank R refused: MESSAGE`` when drawing the first
batch raises, or ``rank R drew N samples`` when it does not (accelerate 1.15
draws 0 with 2 processes: it shards the per-rank batches a second time).
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from repro import GlobalBatchSampler, SeededAugmentation, SeedPlan

accelerator = Accelerator(cpu=True)
plan = SeedPlan(1)
dataset = SeededAugmentation(TensorDataset(torch.arange(64.0)), lambda x: x, plan, generators=("torch",))
sampler = GlobalBatchSampler(64, 16, plan, rank=accelerator.process_index, world_size=accelerator.num_processes)
loader = accelerator.prepare(DataLoader(dataset, batch_sampler=sampler))
try:
    drawn = sum(len(batch[0]) for batch in loader)
except RuntimeError as error:
    line = f"rank {accelerator.process_index} refused: {error}\n"
else:
    line = f"rank {accelerator.process_index} drew {drawn} samples\n"
sys.stdout.write(line)  # one write, so that the other rank's line cannot split it
sys.stdout.flush()
# Nothing above is collective, so a rank could exit while the other is still
# connecting to it, and gloo would fail that rank's init: wait for both first.
accelerator.wait_for_everyone()
accelerator.end_training()
