"""Per-sample augmentation seeding (repro.augment)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from repro.augment import SeededAugmentation
from repro.loader import GlobalBatchSampler, WorkerSeeder, make_generator
from repro.seeds import SeedPlan


class Images(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def mixed_transform(image):
    """torchvision (torch generator), plus draws from random and NumPy."""
    image = transforms.RandomCrop(32, padding=4)(image)
    image = transforms.RandomHorizontalFlip()(image).float()
    return image + random.random() + float(np.random.rand())


def load(num_workers: int, epoch: int = 1) -> dict[int, torch.Tensor]:
    dataset = SeededAugmentation(Images(), mixed_transform, SeedPlan(2333))
    sampler = GlobalBatchSampler(len(dataset), 8, 2333)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=WorkerSeeder(2333),
        generator=make_generator(2333, "t"),
    )
    return {int(i): image for images, indices in loader for image, i in zip(images, indices, strict=True)}


def test_augmented_sample_is_bitwise_equal_with_0_or_2_workers():
    single, multi = load(0), load(2)
    assert single.keys() == multi.keys()
    assert all(torch.equal(single[i], multi[i]) for i in single)


def test_augmentation_depends_on_epoch_and_index_not_on_order():
    dataset = SeededAugmentation(Images(), mixed_transform, SeedPlan(2333))
    forward = [dataset[(1, i)][0] for i in range(10)]
    backward = [dataset[(1, i)][0] for i in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert not torch.equal(dataset[(1, 3)][0], dataset[(2, 3)][0])
    assert not torch.equal(dataset[(1, 3)][0], dataset[(1, 4)][0])


def test_callers_generators_are_untouched_in_the_main_process():
    dataset = SeededAugmentation(Images(), mixed_transform, SeedPlan(2333))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    dataset[(0, 5)]
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected
