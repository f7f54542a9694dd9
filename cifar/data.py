"""Datasets and transforms: CIFAR-10/100, any image folder, and a synthetic set.

Every dataset is loaded once into memory as uint8 images (N, 3, H, W) and
integer labels: CIFAR-sized data fits easily, decoding happens once, and the
same :class:`ImageArray` serves all sources. Random augmentation is applied by
:class:`repro.augment.SeededAugmentation`, so it depends only on (seed, epoch,
sample index).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar import data_cache

IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The largest image an image folder may hold, in pixels (8192x8192: 192 MiB decoded as RGB).
# Every image is shrunk to 32x32, so a larger one adds nothing but memory and time.
MAX_IMAGE_PIXELS = 8192 * 8192
# PIL's modes of 16-bit grey pixels (PNG, TIFF): Image.convert("RGB") clips them at 255.
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Per-channel statistics of the training sets, on the 0-1 scale.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

# The synthetic set is a fixed dataset: its own seed, independent of the run's.
SYNTHETIC_DATA_SEED = 20240101


class DataError(ValueError):
    """A dataset that cannot be loaded: reported as one line, exit status 2."""


class ImageArray(torch.utils.data.Dataset):
    """Images as a uint8 tensor (N, 3, H, W) with integer labels; item i is (image, label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class Splits:
    """A dataset's train and test splits, with what the pipeline needs to know of it."""

    train: ImageArray
    test: ImageArray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""  # where the arrays came from, when worth a line to the user (a cache's outcome)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """SHA-256 over both splits' images and labels: which data a run saw. Computed once
        (about 0.25 s for CIFAR-10): the splits' tensors are never changed in place."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for split in (self.train, self.test):
                digest.update(np.ascontiguousarray(split.images.numpy()))  # its buffer: no 150 MB copy
                digest.update(split.labels.numpy().astype("<i8"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def _from_hwc(images: np.ndarray, labels: list[int] | np.ndarray) -> ImageArray:
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return ImageArray(tensor, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


# The least standard deviation a channel is normalised by: one grey level. A constant channel (no blue
# in any image) has none, and dividing by it would turn every input into NaN.
MIN_CHANNEL_STD = round(1 / 255, 4)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scaled = images.to(torch.float64) / 255
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(max(round(float(v), 4), MIN_CHANNEL_STD) for v in std)


def synthetic(train_size: int, test_size: int) -> Splits:
    """A learnable CIFAR-shaped dataset made offline: 10 classes, 3x32x32.

    Each class has a smooth colour pattern (a random 4x4 field, upsampled);
    each image is its class's pattern, shifted by up to 3 pixels, with random
    contrast and pixel noise. Generated from a fixed data seed, so every run
    sees the same images.
    """
    rng = np.random.Generator(np.random.PCG64(SYNTHETIC_DATA_SEED))
    num_classes = 10
    coarse = rng.uniform(-1, 1, size=(num_classes, 4, 4, 3))
    patterns = np.kron(coarse, np.ones((1, 8, 8, 1)))

    def make(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=count)
        shifts = rng.integers(-3, 4, size=(count, 2))
        contrast = rng.uniform(0.5, 1.0, size=(count, 1, 1, 1))
        noise = rng.normal(0, 1.1, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3))
        images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3))
        for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
            images[i] = np.roll(patterns[label], (dy, dx), axis=(0, 1))
        images = 127.5 + 80 * (contrast * images + noise)
        return np.clip(images, 0, 255).astype(np.uint8), labels

    train = _from_hwc(*make(train_size))
    test = _from_hwc(*make(test_size))
    mean, std = _channel_stats(train.images)
    return Splits(train, test, num_classes, mean, std)


def cifar(name: str, data_dir: str) -> Splits:
    """CIFAR-10 or CIFAR-100 through torchvision, downloaded into ``data_dir`` when missing."""
    from torchvision import datasets

    dataset_class, num_classes, (mean, std) = {
        "cifar10": (datasets.CIFAR10, 10, CIFAR10_STATS),
        "cifar100": (datasets.CIFAR100, 100, CIFAR100_STATS),
    }[name]
    try:
        train = dataset_class(data_dir, train=True, download=True)
        test = dataset_class(data_dir, train=False, download=True)
    except (OSError, RuntimeError) as error:
        raise DataError(
            f"cannot load {name} from {data_dir!r} and cannot download it ({type(error).__name__}); "
            f"put the dataset there with --data-dir, or train offline with --dataset synthetic"
        ) from None
    return Splits(_from_hwc(train.data, train.targets), _from_hwc(test.data, test.targets), num_classes, mean, std)


def _read_image(path: Path, content: bytes) -> np.ndarray:
    """The bytes ``content`` of the image file ``path`` as a uint8 RGB array (32, 32, 3),
    resized when it is not 32x32.

    Decoded from the bytes the caller read (and hashed for the cache key), not from the
    file again: a file replaced meanwhile cannot give pixels that its key does not name.
    The pixel count is checked from the file's header before any pixel is
    decoded: a file of a few kilobytes can declare billions of pixels (a
    decompression bomb). PIL's own limits would still decode up to about 179
    million pixels, with only a warning above 89 million. 16-bit grey pixels
    keep their top 8 bits; 32-bit integer and float pixels (modes I and F) are
    refused: they have no one scale to bring to 8 bits.
    """
    from PIL import Image

    too_large = DataError(
        f"image {path} has more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?); "
        f"images are resized to {IMAGE_SIZE}x{IMAGE_SIZE}, so shrink it first"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise too_large
                if image.mode in ("I", "F"):
                    raise DataError(
                        f"image {path} has 32-bit {'float' if image.mode == 'F' else 'integer'} pixels "
                        f"(PIL mode {image.mode}), which have no one scale to 8 bits; convert it to 8 bits first"
                    )
                if image.mode in SIXTEEN_BIT_GREY_MODES:
                    image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))  # 8-bit grey (mode L)
                image = image.convert("RGB")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    # What PIL raises on a damaged file: OSError (UnidentifiedImageError is one), and from
    # some decoders ValueError (a PNG text chunk too large to decompress), SyntaxError, EOFError.
    except (OSError, ValueError, SyntaxError, EOFError):
        raise DataError(f"unreadable image {path}") from None


def _listing_of(folder: Path) -> list[Path]:
    """The entries of ``folder`` but hidden ones (a name starting with "."): a ``.thumbs`` or
    ``.ipynb_checkpoints`` folder is no class, a ``._x.jpg`` resource fork no image."""
    try:
        return [path for path in folder.iterdir() if not path.name.startswith(".")]
    except OSError as error:
        raise DataError(f"cannot read {folder}: {error.strerror or error}") from None


def class_names(split_dir: Path) -> list[str]:
    """An image folder split's classes: the sorted names of the sub-folders of ``split_dir``,
    hidden ones skipped; label ``i`` is the ``i``-th."""
    return sorted(path.name for path in _listing_of(split_dir) if path.is_dir())


def _list_folder(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """Every image file of ``split_dir/<class>/``, in order, with its class's index in ``classes``.

    A class folder without images is an error, in train/ as in test/: a class that
    is never trained on, or never tested, is a mistake in the folder, not a class.
    So is a broken symbolic link named like an image: an image the user meant, missing.
    """
    listing = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = []
        for path in _listing_of(class_dir):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                raise DataError(f"image {path} is a broken symbolic link: its target does not exist")
            # Anything else (a sub-folder, even one named like an image) is ignored.
        # By name: the order of the paths themselves (one folder), without pathlib's slow comparisons.
        files.sort(key=lambda p: p.name)
        if not files:
            raise DataError(f"no images in class folder {class_dir} (expected {', '.join(IMAGE_SUFFIXES)} files)")
        listing += [(path, label) for path in files]
    return listing


def _decode(listing: list[tuple[Path, int]], key: data_cache.FolderHash | None = None) -> ImageArray:
    """Read and decode each file of ``listing`` once; with ``key``, hash the bytes decoded into it."""
    images = []
    for path, _ in listing:
        try:
            content = path.read_bytes()
        except OSError:
            raise DataError(f"unreadable image {path}") from None
        if key is not None:
            key.add(path, content)
        images.append(_read_image(path, content))
    return _from_hwc(np.stack(images), [label for _, label in listing])


def imagefolder(data_dir: str, cache: Path | None = None) -> Splits:
    """Any folder laid out as ``train/<class>/*`` and ``test/<class>/*`` images.

    Images are converted to RGB and resized to 32x32 when they are not; an
    image of more than ``MAX_IMAGE_PIXELS`` pixels is refused unread. The
    classes are the sorted sub-folder names of ``train/``; ``test/`` must have
    the same ones, and every class folder of either split at least one image.

    With a ``cache`` folder the decoded arrays are kept there and read back by
    later calls on the same files (:mod:`cifar.data_cache`: found by the files'
    content); :attr:`Splits.source` then says which happened.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    train_dir, test_dir = root / "train", root / "test"
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise DataError(
                f"image folder {root} has no {split_dir.name}/ folder (expected train/<class>/ and test/<class>/)"
            )
    classes = class_names(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders (expected {train_dir}/<class>/*.jpg)")
    test_classes = class_names(test_dir)
    if test_classes != classes:
        raise DataError(f"{test_dir} has classes {test_classes}, but {train_dir} has {classes}")
    train_files, test_files = _list_folder(train_dir, classes), _list_folder(test_dir, classes)
    if cache is not None:
        try:
            key = data_cache.folder_key(root, classes, [path for path, _ in train_files + test_files])
        except OSError as error:
            raise DataError(f"unreadable image {error.filename}") from None
        entry = data_cache.entry_path(cache, key)
        found = data_cache.load(cache, key)
        if found is not None:
            splits = _splits_from_arrays(found[0], len(classes))
            if _checksum(splits) == found[1]:
                splits.source = f"image folder {root}: decoded images read from {entry}"
                return splits
    # The entry is filed under the key of the bytes decoded, which differs from the key looked
    # up only when a file changed in between: then it is the key of the pixels it holds.
    decoded_key = None if cache is None else data_cache.FolderHash(root, classes)
    splits = _splits_of(_decode(train_files, decoded_key), _decode(test_files, decoded_key), len(classes))
    if decoded_key is not None:
        key = decoded_key.hexdigest()
        entry = data_cache.entry_path(cache, key)
        failure = data_cache.store(cache, key, _arrays_of(splits), _checksum(splits))
        outcome = f"cached in {entry}" if failure is None else f"not cached ({failure})"
        splits.source = f"image folder {root}: decoded {len(train_files) + len(test_files)} images, {outcome}"
    return splits


def _checksum(splits: Splits) -> str:
    """A cache entry's checksum: the dataset fingerprint (which the run needs anyway), the
    statistics, and each array's dtype and shape, which the fingerprint's bytes do not show."""
    arrays = (splits.train.images, splits.train.labels, splits.test.images, splits.test.labels)
    layout = [(tuple(array.shape), str(array.dtype)) for array in arrays]
    return hashlib.sha256(f"{splits.fingerprint()} {splits.mean} {splits.std} {layout}".encode()).hexdigest()


def _splits_of(train: ImageArray, test: ImageArray, num_classes: int) -> Splits:
    mean, std = _channel_stats(train.images)
    return Splits(train, test, num_classes, mean, std)


def _arrays_of(splits: Splits) -> dict[str, np.ndarray]:
    return {
        "train_images": splits.train.images.numpy(),
        "train_labels": splits.train.labels.numpy(),
        "test_images": splits.test.images.numpy(),
        "test_labels": splits.test.labels.numpy(),
        "mean": np.array(splits.mean),
        "std": np.array(splits.std),
    }


def _splits_from_arrays(arrays: dict[str, np.ndarray], num_classes: int) -> Splits:
    train = ImageArray(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]))
    test = ImageArray(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"]))
    return Splits(train, test, num_classes, tuple(map(float, arrays["mean"])), tuple(map(float, arrays["std"])))


def load_splits_on_every_rank(
    dataset: str, data_dir: str, synthetic_sizes: tuple[int, int], cache: Path | None = None
) -> Splits:
    """:func:`load_splits` on this process, then checked against every other process's data.

    Each machine of a multi-node run reads its own copy of ``--data-dir``; a copy
    that differs would train the ranks on different data without a word, and the
    manifest records rank 0's data only. So the ranks exchange their data's
    fingerprint and statistics, and every rank raises :class:`DataError` naming
    the ranks that differ. A rank whose data fails to load sends its error
    instead, so the others stop with it rather than wait for it. Call it on
    every process at the same point (a collective when torch.distributed is
    initialised; alone, it only loads).
    """
    splits, error = None, None
    try:
        splits = load_splits(dataset, data_dir, synthetic_sizes, cache)
    except DataError as failure:
        error = str(failure)
    identity = None if splits is None else (splits.fingerprint(), splits.mean, splits.std)
    gathered = [(identity, error)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (identity, error))
    failures = [(rank, message) for rank, (_, message) in enumerate(gathered) if message]
    if failures:
        rank, message = failures[0]
        raise DataError(message if len(gathered) == 1 else f"rank {rank}: {message}")
    ranks_by_identity: dict[tuple, list[int]] = {}
    for rank, (seen, _) in enumerate(gathered):
        ranks_by_identity.setdefault(seen, []).append(rank)
    if len(ranks_by_identity) > 1:
        groups = "; ".join(
            f"rank {','.join(map(str, ranks))}: data {fingerprint[:16]} mean {mean} std {std}"
            for (fingerprint, mean, std), ranks in ranks_by_identity.items()
        )
        raise DataError(f"the processes loaded different data ({groups}): give every machine the same data")
    return splits


def load_splits(dataset: str, data_dir: str, synthetic_sizes: tuple[int, int], cache: Path | None = None) -> Splits:
    """Load the named dataset; raises :class:`DataError` with a one-line reason. ``cache``: the
    folder of decoded image folders (:func:`imagefolder`), unused by the other datasets."""
    if dataset == "synthetic":
        return synthetic(*synthetic_sizes)
    if dataset == "imagefolder":
        return imagefolder(data_dir, cache)
    return cifar(dataset, data_dir)


class Cutout(nn.Module):
    """Zero a random ``size`` x ``size`` square (clipped at the border) of a (C, H, W) tensor."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        y, x = (int(v) for v in torch.randint(0, max(height, width), (2,)))
        top, left = max(y - self.size // 2, 0), max(x - self.size // 2, 0)
        image = image.clone()
        image[..., top : y + (self.size + 1) // 2, left : x + (self.size + 1) // 2] = 0
        return image


# The global generators train_transform draws from (torchvision's transforms and
# Cutout use torch's CPU generator alone): SeededAugmentation reseeds only these,
# and raises if the transform draws from another.
TRAIN_TRANSFORM_GENERATORS = ("torch",)


def train_transform(splits: Splits, cutout: int, padding: int = 4, padding_mode: str = "zeros") -> nn.Module:
    """Random crop from the image padded by ``padding`` pixels (``padding_mode`` "zeros" or
    "reflect"), horizontal flip, normalise, optional cutout."""
    # Imported here, not above: torchvision takes about 2 s to import (its models, ops and
    # torch._dynamo), time that a run on the device pipeline has no use for.
    from torchvision import transforms

    fill_mode = {"zeros": "constant", "reflect": "reflect"}[padding_mode]
    steps: list[nn.Module] = [
        transforms.RandomCrop(IMAGE_SIZE, padding=padding, padding_mode=fill_mode),
        transforms.RandomHorizontalFlip(),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(splits.mean, splits.std),
    ]
    if cutout:
        steps.append(Cutout(cutout))
    return transforms.Compose(steps)


def test_transform(splits: Splits) -> nn.Module:
    """Normalise only: evaluation is deterministic."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(splits.mean, splits.std)]
    )


def evaluation_shard(size: int, rank: int, world_size: int) -> range:
    """The indices of a test set of ``size`` items that rank ``rank`` of
    ``world_size`` evaluates: every ``world_size``-th, from ``rank``.

    The shards of all ranks cover each index exactly once, so when ``size`` is
    not a multiple of ``world_size`` they differ in length by one. They are not
    padded to equal length (as ``DistributedSampler`` pads, by repeating
    indices): a repeated image would be counted twice in the test accuracy.
    """
    return range(rank, size, world_size)


class Transformed(torch.utils.data.Dataset):
    """Apply a deterministic transform to each item's image."""

    def __init__(self, dataset: ImageArray, transform: nn.Module) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label
