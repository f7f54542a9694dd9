"""The device data pipeline: augmentation from per-sample seeds, in batches, and train.py runs with it."""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest
import torch
from conftest import DATALOADER, TINY, read_manifest, run_train, train_ok
from test_resume import assert_same_run, start_training, wait_for_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import functional

from cifar.data import synthetic
from cifar.device_data import (
    CROP_PADDING,
    DeviceTestBatches,
    DeviceTrainBatches,
    augment_batch,
    augmentation_params,
    normalize,
)
from repro.loader import GlobalBatchSampler
from repro.seeds import SeedPlan, mix64

DEVICE = ["--data-pipeline", "device"]  # TINY's default too: said here, where it is the subject
CPU = torch.device("cpu")
CHANNELS_LAST = torch.channels_last


@pytest.fixture(scope="module")
def splits():
    return synthetic(96, 20)


def train_batches(splits, seeds=None, cutout=8, rank=0, world_size=1, batch_size=32, **options):
    seeds = seeds or SeedPlan(2333)
    sampler = GlobalBatchSampler(len(splits.train), batch_size, seeds, rank=rank, world_size=world_size)
    return DeviceTrainBatches(splits.train, sampler, seeds, splits.mean, splits.std, cutout, CPU, **options)


def test_params_stay_in_range_and_depend_only_on_the_sample_seed():
    seeds = SeedPlan(7).aug_array(0, np.arange(5000))
    params = augmentation_params(seeds, 32, 30, 4)
    assert params.min(axis=0).tolist() == [0, 0, 0, 0, 0]
    assert params.max(axis=0).tolist() == [8, 8, 1, 31, 29]  # every value of each range occurs
    np.testing.assert_array_equal(augmentation_params(seeds[::-1], 32, 30, 4), params[::-1])


def test_column_k_is_word_k_of_the_seed_modulo_its_range():
    seeds = SeedPlan(3).aug_array(2, np.arange(50))
    params = augmentation_params(seeds, 32, 30, 4)
    ranges = (9, 9, 2, 32, 30)
    expected = [[mix64(int(seed), k) % ranges[k] for k in range(5)] for seed in seeds]
    assert params.tolist() == expected


@pytest.mark.parametrize(("flip", "cutout"), [(False, True), (True, False), (False, False)])
def test_words_not_asked_for_are_zero_and_the_others_unchanged(flip, cutout):
    seeds = SeedPlan(7).aug_array(0, np.arange(1000))
    every = augmentation_params(seeds, 32, 30, 4)
    some = augmentation_params(seeds, 32, 30, 4, flip=flip, cutout=cutout)
    derived = [0, 1, *([2] if flip else []), *([3, 4] if cutout else [])]
    np.testing.assert_array_equal(some[:, derived], every[:, derived])
    assert not np.delete(some, derived, axis=1).any()


def test_each_image_is_cropped_flipped_normalised_and_cut_out_as_its_params_say(splits):
    images = splits.train.images[:16]
    params = augmentation_params(SeedPlan(1).aug_array(0, np.arange(16)), 32, 32, CROP_PADDING)
    mean = torch.tensor(splits.mean).view(1, 3, 1, 1)
    std = torch.tensor(splits.std).view(1, 3, 1, 1)
    batch = augment_batch(images, torch.from_numpy(params), mean, std, CROP_PADDING, cutout=10)
    assert {bool(p) for p in params[:, 2]} == {False, True}  # both branches of the flip are exercised
    for image, (top, left, flip, centre_row, centre_column), augmented in zip(images, params, batch, strict=True):
        padded = torch.nn.functional.pad(image, (CROP_PADDING,) * 4)
        expected = functional.crop(padded, int(top), int(left), 32, 32)
        if flip:
            expected = functional.hflip(expected)
        expected = normalize(expected[None], mean, std)[0]
        rows = slice(max(centre_row - 5, 0), centre_row + 5)
        columns = slice(max(centre_column - 5, 0), centre_column + 5)
        expected[:, rows, columns] = 0
        torch.testing.assert_close(augmented, expected, rtol=0, atol=0)


def test_a_samples_augmentation_does_not_depend_on_its_batch_or_rank(splits):
    whole = train_batches(splits)
    indices = np.array([5, 70, 3, 41, 12, 95])
    together, labels = whole.batch(2, indices)
    apart = [whole.batch(2, indices[:2])[0], whole.batch(2, indices[2:])[0]]
    assert torch.equal(together, torch.cat(apart))
    assert torch.equal(labels, splits.train.labels[indices])

    ranks = [train_batches(splits, rank=rank, world_size=2) for rank in range(2)]
    for batches in (whole, *ranks):
        batches.sampler.set_epoch(1)
    for global_batch, *shards in zip(whole, *ranks, strict=True):
        assert torch.equal(global_batch[0], torch.cat([images for images, _ in shards]))
        assert torch.equal(global_batch[1], torch.cat([labels for _, labels in shards]))


@pytest.mark.parametrize("augment_ahead", [1, 70, 96])  # a batch a pass; two, then one; the whole epoch
@pytest.mark.parametrize("start_batch", [0, 1])
def test_batches_augmented_ahead_are_each_batch_as_augmented_alone(splits, augment_ahead, start_batch):
    batches = train_batches(
        splits, augment_ahead=augment_ahead, padding_mode="reflect", flip="alternating", memory_format=CHANNELS_LAST
    )
    batches.sampler.set_epoch(3, start_batch)
    yielded = list(batches)
    expected = [batches.batch(3, indices) for indices in batches.sampler.index_batches()]
    assert len(yielded) == len(expected) == 3 - start_batch
    for (images, labels), (alone, alone_labels) in zip(yielded, expected, strict=True):
        assert images.is_contiguous(memory_format=CHANNELS_LAST)  # the model's layout: no copy in the step
        assert torch.equal(images, alone)
        assert torch.equal(labels, alone_labels)


@pytest.mark.parametrize("flip", ["random", "alternating"])
def test_each_sample_is_augmented_as_its_seed_says(splits, flip):
    seeds = SeedPlan(2333)
    batches = train_batches(splits, seeds, cutout=8, flip=flip)
    batches.sampler.set_epoch(1)
    indices = next(batches.sampler.index_batches())
    params = augmentation_params(seeds.aug_array(1, indices), 32, 32, CROP_PADDING)
    if flip == "alternating":  # epoch 0's flip from the sample's seed, the other way in epoch 1
        params[:, 2] = 1 - augmentation_params(seeds.aug_array(0, indices), 32, 32, CROP_PADDING)[:, 2]
    assert {0, 1} <= set(params[:, 2].tolist())
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (splits.mean, splits.std))
    expected = augment_batch(splits.train.images[indices], torch.from_numpy(params), mean, std, CROP_PADDING, 8)
    images, labels = next(iter(batches))
    assert torch.equal(images, expected)
    assert torch.equal(labels, splits.train.labels[indices])


class OperationCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_step_takes_its_batch_without_a_tensor_operation(splits):
    batches = iter(train_batches(splits, augment_ahead=64))  # two batches a chunk, then one
    operations = []
    for _ in range(3):
        with OperationCounter() as counter:
            next(batches)
        operations.append(counter.count)
    assert operations[0] > 10  # the chunk's augmentation
    assert operations[1] == 0  # a slice the chunk already made: no work in the step
    assert operations[2] > 10  # the next chunk


def test_epoch_and_aug_seed_change_the_augmentation(splits):
    batches = train_batches(splits)
    other_seed = train_batches(splits, seeds=SeedPlan(2333, aug_seed=1))
    indices = np.arange(32)
    epoch0 = batches.batch(0, indices)[0]
    assert torch.equal(epoch0, batches.batch(0, indices)[0])
    for different in (batches.batch(1, indices)[0], other_seed.batch(0, indices)[0]):
        changed = (different != epoch0).flatten(1).any(1)
        assert changed.sum() >= 24  # a few samples may draw the same crop, flip and cutout by chance


def test_test_batches_cover_each_image_once_in_order(splits):
    shards = [DeviceTestBatches(splits.test, rank, 3, 4, splits.mean, splits.std, CPU) for rank in range(3)]
    labels = torch.cat([label for shard in shards for _, label in shard])
    assert sorted(labels.tolist()) == sorted(splits.test.labels.tolist())
    assert sum(len(shard.labels) for shard in shards) == len(splits.test)
    assert [len(shard) for shard in shards] == [2, 2, 2]  # 7, 7 and 6 images in batches of 4


def test_bad_arguments_are_value_errors(splits):
    with pytest.raises(ValueError, match="cutout"):
        train_batches(splits, cutout=-1)
    with pytest.raises(ValueError, match="augment_ahead"):
        train_batches(splits, augment_ahead=0)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceTestBatches(splits.test, 0, 1, 0, splits.mean, splits.std, CPU)


@pytest.fixture(scope="module")
def device_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("device") / "run"
    train_ok(run_dir, *DEVICE, "--cutout", "8")
    return run_dir


@pytest.mark.slow  # test_speedrun.py kills and resumes a run of the device pipeline
def test_device_pipeline_resumes_bitwise_after_kill_9(device_reference, tmp_path):
    run_dir = tmp_path / "run"
    args = (*DEVICE, "--cutout", "8", "--checkpoint-every", "1", "--resume", "auto")
    for _ in range(2):
        process = start_training(run_dir, *args)
        wait_for_checkpoint(run_dir, process)
        time.sleep(random.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    train_ok(run_dir, *args)
    assert_same_run(run_dir, device_reference)


# test_run_folder.py refuses a resume whose settings differ; the unit tests above check the augmentation
@pytest.mark.slow
def test_pipeline_is_part_of_the_run_and_changes_the_augmentation(device_reference, tmp_path):
    stopped = tmp_path / "stopped"
    train_ok(stopped, *DEVICE, "--cutout", "8", "--max-steps", "3")
    resume = ("--resume", "latest", "--cutout", "8", "--data-pipeline", "dataloader")
    refused = run_train(*TINY, "--output-dir", str(stopped), *resume)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "data_pipeline" in refused.stderr
    dataloader = train_ok(tmp_path / "dataloader", *DATALOADER, "--cutout", "8")
    assert dataloader["weights_sha256"] != read_manifest(device_reference)["weights_sha256"]
