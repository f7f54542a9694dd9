"""Per-sample augmentation seeding (repro.augment)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from cifar.data import TRAIN_TRANSFORM_GENERATORS, synthetic, train_transform
from repro.augment import SeededAugmentation, seed_sample_generators
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


def torchvision_transform(image):
    """torchvision only: draws from torch's CPU generator alone."""
    image = transforms.RandomCrop(32, padding=4)(image)
    return transforms.RandomHorizontalFlip()(image)


def numpy_transform(image):
    return image.float() + float(np.random.rand())


def random_transform(image):
    return image.float() + random.random()


def numpy_in_workers_transform(image):
    """Draws from NumPy only in a DataLoader worker, so the main process's check passes."""
    if torch.utils.data.get_worker_info() is not None:
        np.random.rand()
    return torchvision_transform(image)


@pytest.mark.parametrize(
    ("generators", "message"),
    [
        ((), "generators is empty"),
        (("torch", "torch"), "'torch' appears more than once"),
        (("torch", "cuda"), "unknown generator 'cuda'"),
        (("Torch",), "unknown generator 'Torch'"),
        ("torch", "not the string 'torch'"),
    ],
)
def test_generators_must_name_a_subset_of_torch_random_numpy_once_each(generators, message):
    with pytest.raises(ValueError, match=message):
        SeededAugmentation(Images(), torchvision_transform, SeedPlan(2333), generators=generators)


def test_default_generators_augment_as_seed_sample_generators_then_the_transform():
    dataset = SeededAugmentation(Images(), mixed_transform, SeedPlan(2333))
    for key in [(0, 0), (1, 3), (7, 39)]:
        seed_sample_generators(dataset.sample_seed(*key))
        expected = mixed_transform(Images()[key[1]][0])
        assert torch.equal(dataset[key][0], expected), key


def test_torch_only_augments_a_torchvision_transform_as_the_default_does():
    default = SeededAugmentation(Images(), torchvision_transform, SeedPlan(2333))
    torch_only = SeededAugmentation(Images(), torchvision_transform, SeedPlan(2333), generators=("torch",))
    for key in [(0, i) for i in range(20)] + [(3, 5)]:
        assert torch.equal(torch_only[key][0], default[key][0]), key


def test_torch_only_leaves_random_and_numpy_alone_in_the_main_process():
    seen = []

    def transform(image):
        seen.append((random.getstate(), np.random.get_state()))
        return torchvision_transform(image)

    dataset = SeededAugmentation(Images(), transform, SeedPlan(2333), generators=("torch",))
    random.seed(1)
    np.random.seed(1)
    before = (random.getstate(), np.random.get_state())
    dataset[(0, 5)]
    dataset[(0, 6)]
    # Not reseeded: the transform saw the caller's states; and not changed after.
    for random_state, numpy_state in [*seen, (random.getstate(), np.random.get_state())]:
        assert random_state == before[0]
        assert all(np.array_equal(a, b) for a, b in zip(numpy_state, before[1], strict=True))


@pytest.mark.parametrize(("transform", "name"), [(numpy_transform, "numpy"), (random_transform, "random")])
def test_a_draw_from_a_generator_not_named_raises_in_the_main_process(transform, name):
    dataset = SeededAugmentation(Images(), transform, SeedPlan(2333), generators=("torch",))
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    with pytest.raises(ValueError, match=f"does not reseed: add '{name}' to generators"):
        dataset[(0, 0)]
    assert (random.random(), np.random.rand()) == expected  # the caller's state is put back
    with pytest.raises(ValueError, match=f"add '{name}'"):
        dataset[(0, 1)]  # still checked: the failed check did not count


def test_a_draw_from_torch_raises_when_torch_is_not_named():
    dataset = SeededAugmentation(Images(), mixed_transform, SeedPlan(2333), generators=("random", "numpy"))
    with pytest.raises(ValueError, match=r"drew from torch's CPU generator.*add 'torch' to generators"):
        dataset[(0, 0)]


def torch_only_loader(transform, num_workers: int, data=None) -> DataLoader:
    dataset = SeededAugmentation(data or Images(), transform, SeedPlan(2333), generators=("torch",))
    return DataLoader(
        dataset,
        batch_sampler=GlobalBatchSampler(len(dataset), 8, 2333),
        num_workers=num_workers,
        worker_init_fn=WorkerSeeder(2333),
        generator=make_generator(2333, "t"),
    )


@pytest.mark.parametrize(("transform", "name"), [(numpy_transform, "numpy"), (random_transform, "random")])
def test_a_draw_from_a_generator_not_named_raises_from_a_worker(transform, name):
    with pytest.raises(ValueError, match=rf"(?s)DataLoader worker.*add '{name}' to generators"):
        next(iter(torch_only_loader(transform, num_workers=1)))


def test_the_check_runs_in_each_worker_after_the_main_process_passed_it():
    loader = torch_only_loader(numpy_in_workers_transform, num_workers=1)
    loader.dataset[(0, 0)]  # checked and passed in the main process, before the worker copies the dataset
    with pytest.raises(ValueError, match=r"(?s)DataLoader worker.*add 'numpy' to generators"):
        next(iter(loader))


def test_torch_only_train_transform_batches_are_equal_with_0_or_2_workers():
    assert TRAIN_TRANSFORM_GENERATORS == ("torch",)  # what train.py passes; with cutout, all of its draws
    splits = synthetic(64, 8)
    transform = train_transform(splits, cutout=8)
    single = list(torch_only_loader(transform, 0, splits.train))
    multi = list(torch_only_loader(transform, 2, splits.train))
    assert len(single) == len(multi) == 8
    for (images, labels), (other_images, other_labels) in zip(single, multi, strict=True):
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)


def gaussian_transform(image):
    return image.float() + float(np.random.randn())


def test_numpys_cached_gaussian_is_restored_in_the_main_process():
    # NumPy's legacy randn draws two Gaussians at a time and caches one, outside its bit generator's state.
    dataset = SeededAugmentation(Images(), gaussian_transform, SeedPlan(2333))
    np.random.seed(3)
    np.random.randn()
    expected = np.random.randn()
    np.random.seed(3)
    np.random.randn()
    dataset[(0, 1)]
    assert np.random.randn() == expected


class OwnGeneratorBrightness:
    """A transform holding its own NumPy Generator, which SeededAugmentation cannot see."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.float() * float(self.rng.uniform(0.8, 1.2))

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)


def own_generator_batches(num_workers: int, reseed: bool) -> list[torch.Tensor]:
    transform = OwnGeneratorBrightness()
    dataset = SeededAugmentation(
        Images(), transform, SeedPlan(2333), generators=("torch",), reseed=transform.reseed if reseed else None
    )
    loader = DataLoader(
        dataset,
        batch_sampler=GlobalBatchSampler(len(dataset), 8, 2333),
        num_workers=num_workers,
        worker_init_fn=WorkerSeeder(2333),
        generator=make_generator(2333, "t"),
    )
    return [images for images, _ in loader]


def test_a_transforms_own_generator_reseeded_through_reseed_gives_the_same_batches_with_0_or_2_workers():
    single, multi = own_generator_batches(0, reseed=True), own_generator_batches(2, reseed=True)
    assert len(single) == len(multi) == 5
    assert all(torch.equal(a, b) for a, b in zip(single, multi, strict=True))
    # Without it, each worker draws from its own copy of the generator: other batches, and no error.
    unseeded = own_generator_batches(2, reseed=False)
    assert not all(torch.equal(a, b) for a, b in zip(single, unseeded, strict=True))


def test_a_plain_int_seed_augments_as_its_plan_and_a_string_is_refused_at_construction():
    transform = transforms.RandomCrop(32, padding=4)
    plain = SeededAugmentation(Images(), transform, 2333, generators=("torch",))
    planned = SeededAugmentation(Images(), transform, SeedPlan(2333), generators=("torch",))
    assert torch.equal(plain[(1, 5)][0], planned[(1, 5)][0])
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\], got '2333'"):
        SeededAugmentation(Images(), transform, "2333")


def test_an_ordinary_sampler_is_told_to_use_the_global_batch_samplers_keys():
    dataset = SeededAugmentation(Images(), transforms.RandomCrop(32, padding=4), 2333, generators=("torch",))
    with pytest.raises(TypeError, match=r"^SeededAugmentation got the key 0, not \(epoch, index\): index it with "):
        next(iter(DataLoader(dataset, batch_size=4)))
    with pytest.raises(TypeError, match=r"^transform must be a callable, got None$"):
        SeededAugmentation(Images(), None, 2333)
