"""The device data pipeline: the whole dataset on the device, augmented there many batches at once.

With ``--data-pipeline device`` the uint8 images are copied to the device once
(CIFAR-10: 150 MB for training, 30 MB for testing) and the training images are
gathered, cropped, flipped, normalised and cut out there by a few tensor
operations over a whole epoch's batches (for CIFAR-10) at a time; a step takes
a slice. No DataLoader, no worker processes, no copy from the host per step: a
GPU is never left waiting for the CPU to decode and augment images one at a
time, which is what limits the dataloader pipeline.

Randomness: the augmentation of sample ``i`` in epoch ``e`` comes from its
per-sample seed ``SeedPlan.aug(e, i)``, the seed the dataloader pipeline gives
``SeededAugmentation``. Fixed words of it (``mix64(seed, k)`` for k = 0..4)
become the crop offsets, the flip and the cutout position. So a sample's
augmentation depends on (aug seed, epoch, index) alone, whichever batch, rank
or resumed run it lands in. The two pipelines turn the seed into offsets
differently (torchvision draws from a generator seeded with it), so they
augment differently: the pipeline is part of the config that a resume checks.

Every operation is deterministic on CUDA in strict mode: a gather by index
(no scatter, no atomic adds) and elementwise arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional

from cifar.data import ImageArray
from repro.loader import GlobalBatchSampler
from repro.seeds import SeedPlan, mix64_array

CROP_PADDING = 4  # default pixels of padding around the image before the random 32x32 crop
# Training images augmented in one pass, at most: a CIFAR-10 epoch (49,152 images at
# batch 1024) in one, about 600 MB of float32 on the device; larger datasets in parts.
AUGMENT_AHEAD = 65_536

# The per-sample words that drive the augmentation, in this order.
_CROP_ROW, _CROP_COLUMN, _FLIP, _CUTOUT_ROW, _CUTOUT_COLUMN = range(5)
_NUM_WORDS = 5


def augmentation_params(
    sample_seeds: np.ndarray, height: int, width: int, padding: int, *, flip: bool = True, cutout: bool = True
) -> np.ndarray:
    """Turn per-sample seeds into (crop row, crop column, flip, cutout row, cutout column) per sample.

    Returns an int64 array (N, 5): the crop's top-left corner in the padded
    image (0 to 2 * padding), 1 to flip horizontally, and the cutout square's
    centre (any pixel of the image). Column k is word k of the sample's seed
    (``mix64(seed, k)``) modulo its range: the bias is below 2**-58 for these
    small ranges.

    ``flip=False`` or ``cutout=False`` leaves those columns 0 without deriving
    them, for a pipeline that does not read them (alternating flips, no cutout):
    the speedrun recipe's epoch needs 2 of the 5 words.
    """
    sample_seeds = np.asarray(sample_seeds, dtype=np.uint64)
    ranges = (2 * padding + 1, 2 * padding + 1, 2, height, width)
    derived = (_CROP_ROW, _CROP_COLUMN, *((_FLIP,) if flip else ()), *((_CUTOUT_ROW, _CUTOUT_COLUMN) if cutout else ()))
    # A column at a time, so that a word not asked for is never computed.
    params = np.zeros((_NUM_WORDS, len(sample_seeds)), dtype=np.int64)
    for column in derived:
        params[column] = mix64_array(sample_seeds, np.uint64(column)) % np.uint64(ranges[column])
    return params.T


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) to float32 on the 0-1 scale, standardised per channel."""
    # In place on a fresh copy: one allocation, where strict mode fills each new tensor.
    return images.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


def reflect(coordinates: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates in [-size + 1, 2 * size - 2] into [0, size - 1] by mirroring at the
    border without repeating the edge pixel, as ``pad(mode="reflect")`` does."""
    coordinates = coordinates.abs()
    return torch.where(coordinates > size - 1, 2 * (size - 1) - coordinates, coordinates)


def augment_batch(
    images: torch.Tensor,
    params: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    padding: int,
    cutout: int,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Crop, flip, normalise and cut out a batch of uint8 images (N, C, H, W) on their device.

    ``params`` is :func:`augmentation_params`'s array as a tensor on the same
    device. As the dataloader pipeline does: crop from the image padded by
    ``padding`` pixels (``padding_mode`` "zeros" or "reflect"), flip, normalise,
    then zero a ``cutout`` x ``cutout`` square (clipped at the border) of the
    normalised image; ``cutout=0`` turns cutout off.
    """
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
    count, channels, height, width = images.shape
    device = images.device
    row_steps = torch.arange(height, device=device)
    column_steps = torch.arange(width, device=device)
    flip = params[:, _FLIP, None].bool()
    rows = params[:, _CROP_ROW, None] + row_steps
    columns = params[:, _CROP_COLUMN, None] + torch.where(flip, width - 1 - column_steps, column_steps)
    if padding_mode == "zeros":
        source = functional.pad(images, (padding, padding, padding, padding))
    else:  # gather straight from the image, at the mirrored coordinates
        source, rows, columns = images, reflect(rows - padding, height), reflect(columns - padding, width)
    # Rows, then columns: two gathers take half the CPU time of one index by four tensors.
    picked_rows = source.gather(2, rows[:, None, :, None].expand(count, channels, height, source.shape[3]))
    cropped = picked_rows.gather(3, columns[:, None, None, :].expand(count, channels, height, width))
    batch = normalize(cropped, mean, std)
    if not cutout:
        return batch
    centre_rows, centre_columns = params[:, _CUTOUT_ROW, None], params[:, _CUTOUT_COLUMN, None]
    in_rows = (row_steps >= centre_rows - cutout // 2) & (row_steps < centre_rows + (cutout + 1) // 2)
    in_columns = (column_steps >= centre_columns - cutout // 2) & (column_steps < centre_columns + (cutout + 1) // 2)
    square = in_rows[:, None, :, None] & in_columns[:, None, None, :]
    return batch.masked_fill_(square, 0.0)


def _channel_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class DeviceTrainBatches:
    """This rank's training batches, as ``sampler`` orders them, augmented on ``device``.

    Iterate it like a DataLoader: it yields (images, labels) already on the
    device, float32 images standardised with ``mean`` and ``std``. The batches
    are augmented ``augment_ahead`` images at a time (at least one batch), laid
    out in ``memory_format`` (the model's), and yielded as slices: the memory
    of that many augmented images, for a step that does no work of its own.
    """

    def __init__(
        self,
        split: ImageArray,
        sampler: GlobalBatchSampler,
        seeds: SeedPlan,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        cutout: int,
        device: torch.device,
        *,
        padding: int = CROP_PADDING,
        padding_mode: str = "zeros",
        flip: str = "random",
        augment_ahead: int = AUGMENT_AHEAD,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if cutout < 0 or padding < 0:
            raise ValueError(f"cutout and padding must be non-negative, got {cutout} and {padding}")
        if flip not in ("random", "alternating"):
            raise ValueError(f"flip must be 'random' or 'alternating', got {flip!r}")
        if augment_ahead < 1:
            raise ValueError(f"augment_ahead must be positive, got {augment_ahead}")
        height, width = split.images.shape[-2:]
        if padding_mode == "reflect" and padding >= min(height, width):
            raise ValueError(f"reflect padding must be smaller than the image, got {padding}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.sampler = sampler
        self.seeds = seeds
        self.mean = _channel_tensor(mean, device)
        self.std = _channel_tensor(std, device)
        self.cutout = cutout
        self.device = device
        self.padding = padding
        self.padding_mode = padding_mode
        self.augment_ahead = augment_ahead
        self.memory_format = memory_format
        # Alternating flip: each sample's flip in epoch 0 comes from its epoch-0 seed;
        # every later epoch flips it the other way from the epoch before.
        self.first_flips = None
        if flip == "alternating":
            every_sample = seeds.aug_array(0, np.arange(len(split.labels)))
            self.first_flips = augmentation_params(every_sample, height, width, padding, cutout=False)[:, _FLIP]

    def __len__(self) -> int:
        return len(self.sampler)

    def params(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """The augmentation parameters (:func:`augmentation_params`) of samples ``indices`` in
        ``epoch``; without cutout, its columns are 0."""
        height, width = self.images.shape[-2:]
        seeds = self.seeds.aug_array(epoch, indices)
        flip, cutout = self.first_flips is None, self.cutout > 0
        params = augmentation_params(seeds, height, width, self.padding, flip=flip, cutout=cutout)
        if self.first_flips is not None:
            params[:, _FLIP] = self.first_flips[indices] ^ (epoch % 2)
        return params

    def batch(self, epoch: int, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented images and labels of samples ``indices`` in ``epoch``."""
        indices = np.ascontiguousarray(indices, dtype=np.int64)  # torch takes no negative strides
        params = torch.from_numpy(self.params(epoch, indices))
        return self._augment(self._to_device(torch.from_numpy(indices)), self._to_device(params))

    def _augment(self, selected: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented images and labels of samples ``selected``, given their :meth:`params`
        (N, 5), both on the device."""
        # index_select, not [selected]: the same gather in a quarter of the CPU time.
        originals = self.images.index_select(0, selected)
        images = augment_batch(originals, params, self.mean, self.std, self.padding, self.cutout, self.padding_mode)
        return images, self.labels.index_select(0, selected)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor's copy on the device, queued behind the device's work, not waiting for
        it; on the CPU, the tensor itself."""
        if self.device.type == "cuda":
            # A copy from pinned memory does not wait for the queued training step, as a
            # copy from pageable memory does: the host stays ahead and the GPU never idles.
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        # Derived and augmented for many batches at once, not batch by batch: a step then
        # only slices, and on a GPU the host's time per step is what the step costs once
        # the GPU outruns it. Elementwise and gather operations give each sample the same
        # values in a chunk as in its own batch. Every sample's parameters go to the device
        # once an epoch and a chunk's are gathered there: looked up and stacked with the
        # indices on the host, they took more host time than the rest of the epoch's
        # arrays (BENCHMARKS.md, section 8). Sent (5, N), as augmentation_params lays them
        # out: the host rearranges nothing.
        all_params = self.params(epoch, np.arange(len(self.labels))).T
        device_params = self._to_device(torch.from_numpy(np.ascontiguousarray(all_params)))
        for chunk in _chunks(list(self.sampler.index_batches()), self.augment_ahead):
            selected = self._to_device(torch.from_numpy(np.concatenate(chunk)))
            images, labels = self._augment(selected, device_params.index_select(1, selected).T)
            images = images.contiguous(memory_format=self.memory_format)
            sizes = [len(indices) for indices in chunk]
            yield from zip(images.split(sizes), labels.split(sizes), strict=True)


def _chunks(batches: list[np.ndarray], max_images: int) -> Iterator[list[np.ndarray]]:
    """Consecutive runs of ``batches`` of at most ``max_images`` samples (or one batch, if larger)."""
    chunk: list[np.ndarray] = []
    size = 0
    for indices in batches:
        if chunk and size + len(indices) > max_images:
            yield chunk
            chunk, size = [], 0
        chunk.append(indices)
        size += len(indices)
    if chunk:
        yield chunk


class DeviceTestBatches:
    """This rank's share of the test set (every ``world_size``-th image from ``rank``), on ``device``.

    Yields (images, labels) in fixed order, normalised, not augmented: the
    shares of all ranks cover each test image exactly once.
    """

    def __init__(
        self,
        split: ImageArray,
        rank: int,
        world_size: int,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images = split.images[rank::world_size].to(device)
        self.labels = split.labels[rank::world_size].to(device)
        self.batch_size = batch_size
        self.mean = _channel_tensor(mean, device)
        self.std = _channel_tensor(std, device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            end = start + self.batch_size
            yield normalize(self.images[start:end], self.mean, self.std), self.labels[start:end]
