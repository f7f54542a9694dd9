"""Pipeline features: image folders, offline CIFAR, curves, NaN detection, evaluation sharding."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, clean_env, make_folder, read_manifest, run_train, train_ok
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cifar.data import DataError, imagefolder, load_splits

IMAGEFOLDER = ["--dataset", "imagefolder", "--model", "small_cnn", "--epochs", "1", "--batch-size", "8",
               "--num-workers", "0", "--lr", "0.05"]  # fmt: skip


def test_imagefolder_trains_and_trains_the_same_from_its_cache(tmp_path):
    data, cache = make_folder(tmp_path / "data", size=40), tmp_path / "cache"  # not 32x32: resized on load
    outputs = []
    for name in ("decoded", "cached"):
        result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--data-cache", str(cache),
                           "--output-dir", str(tmp_path / name))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    (entry,) = cache.iterdir()
    assert f"decoded 32 images, cached in {entry}" in outputs[0] and f"read from {entry}" in outputs[1]
    decoded, cached = read_manifest(tmp_path / "decoded"), read_manifest(tmp_path / "cached")
    assert decoded["test_images"] == 16
    assert decoded["dataset_sha256"] == imagefolder(str(data)).fingerprint()  # the data the run saw
    assert cached["weights_sha256"] == decoded["weights_sha256"]


# The stored std is asserted for both; the DataLoader's run (its Normalize raised) runs with the slow tests.
@pytest.mark.parametrize("pipeline", ["device", pytest.param("dataloader", marks=pytest.mark.slow)])
def test_a_channel_that_never_varies_trains(tmp_path, pipeline):
    # No blue in any image: a spread of 0 made every input NaN on the device pipeline (the run then
    # blamed the learning rate), and torchvision's Normalize raised on the DataLoader pipeline.
    data = make_folder(tmp_path / "data")
    for image_path in data.glob("*/*/*.png"):
        pixels = np.asarray(Image.open(image_path)).copy()
        pixels[..., 2] = 0
        Image.fromarray(pixels).save(image_path)
    assert imagefolder(str(data)).std[2] == round(1 / 255, 4)
    result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--data-cache", "none", "--data-pipeline", pipeline,
                       "--output-dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.isfinite(read_manifest(tmp_path / "run")["test_loss"])


def png_declaring(width: int, height: int) -> bytes:
    """A PNG file of a few bytes whose header declares ``width`` x ``height`` RGB pixels
    (no pixel data follows): a decompression bomb, as far as reading its header tells."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png_with_text_bomb() -> bytes:
    """A valid 32x32 PNG whose compressed text chunk inflates to 8 MiB, more than PIL reads."""
    info = PngInfo()
    info.add_text("comment", "x" * (8 * 1024 * 1024), zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


TOO_MANY_PIXELS = "pixels (a decompression bomb?)"
# Through train.py in a process of its own: its exit status and one line on stderr, and PIL's
# warning for a large image silenced there. The others check the error it prints, in this process.
END_TO_END = ("unreadable", "pixel_bomb_below_pil_error")


@pytest.mark.parametrize(
    ("breakage", "message", "named"),
    [
        ("missing", "does not exist", ""),
        ("no_test", "has no test/ folder", ""),
        ("no_images", "no images in class folder", "train/cat"),
        ("empty_train_class", "no images in class folder", "train/dog"),
        ("empty_test_class", "no images in class folder", "test/cat"),
        ("unreadable", "unreadable image", "train/cat/0.png"),
        ("text_bomb", "unreadable image", "train/dog/3.png"),
        # Above PIL's error limit (2 x 89 megapixels): PIL raises DecompressionBombError.
        ("pixel_bomb", TOO_MANY_PIXELS, "train/cat/1.png"),
        # Between PIL's warning and error limits: PIL only warns, then decodes.
        ("pixel_bomb_below_pil_error", TOO_MANY_PIXELS, "test/dog/2.png"),
        ("mismatched_classes", "has classes", "test"),
    ],
)
def test_bad_image_folders_get_a_clear_error(tmp_path, breakage, message, named):
    data = tmp_path / "data"
    if breakage != "missing":
        make_folder(data)
    if breakage == "no_test":
        for path in sorted((data / "test").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (data / "test").rmdir()
    elif breakage == "no_images":
        for path in (data / "train" / "cat").iterdir():
            path.unlink()
        for path in (data / "train" / "dog").iterdir():
            path.unlink()
    elif breakage in ("empty_train_class", "empty_test_class"):
        for path in (data / named).iterdir():
            path.unlink()
        (data / named / "notes.txt").write_text("not an image")
    elif breakage == "unreadable":
        (data / named).write_bytes(b"not an image")
    elif breakage == "text_bomb":
        (data / named).write_bytes(png_with_text_bomb())
    elif breakage == "pixel_bomb":
        (data / named).write_bytes(png_declaring(50000, 50000))
    elif breakage == "pixel_bomb_below_pil_error":
        (data / named).write_bytes(png_declaring(10000, 10000))
    elif breakage == "mismatched_classes":
        (data / "test" / "dog").rename(data / "test" / "bird")
    if breakage in END_TO_END:
        result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--output-dir", str(tmp_path / "run"))
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("train.py: error: "), error
    else:  # the DataError train.py prints as that line, without a process start per case
        with warnings.catch_warnings(record=True) as warned, pytest.raises(DataError) as raised:
            warnings.simplefilter("always")
            load_splits("imagefolder", str(data), (1, 1))
        assert not warned, [str(warning.message) for warning in warned]
        error = str(raised.value)
        assert "\n" not in error, error
    assert message in error and str(data / named) in error, error


def test_cifar10_offline_names_the_ways_out(tmp_path):
    result = run_train(
        "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--model", "small_cnn",
        "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--data-dir" in result.stderr and "--dataset synthetic" in result.stderr


def test_curves_png_is_a_valid_image(reference_run):
    with Image.open(reference_run / "curves.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100


def test_a_plot_that_fails_while_writing_leaves_the_previous_one(tmp_path, monkeypatch):
    # savefig wrote straight to curves.png: a full disk or a kill mid-write left a truncated
    # PNG under the name, beside a valid manifest and weights.
    from matplotlib.figure import Figure

    from cifar.plots import plot_curves

    records = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "test_accuracy": 0.5}]
    path = tmp_path / "curves.png"
    assert plot_curves(records, path)
    before = path.read_bytes()

    def savefig_then_disk_full(figure, target, **kwargs):
        if hasattr(target, "write"):
            target.write(b"\x89PNG partial")
        else:
            Path(target).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        plot_curves(records, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["curves.png"]  # no temporary left


def test_without_matplotlib_a_run_trains_and_skips_only_the_curves(tmp_path):
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("matplotlib is blocked by this test")\n')
    env = clean_env(PYTHONPATH=f"{blocked.parent}{os.pathsep}{REPO}")
    run_dir = tmp_path / "run"
    result = run_train(*TINY, "--epochs", "1", "--output-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "curves.png not written: matplotlib is not installed" in result.stdout
    assert (run_dir / "manifest.json").is_file() and (run_dir / "model.safetensors").is_file()
    assert not (run_dir / "curves.png").exists()


def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    result = run_train(*TINY, "--lr", "1e12", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "training loss became nan" in result.stderr or "training loss became inf" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_gradient_accumulation_repeats_bitwise(reference_run, tmp_path):
    accumulated = [train_ok(tmp_path / f"accum{i}", "--grad-accum-steps", "2") for i in range(2)]
    assert accumulated[0]["weights_sha256"] == accumulated[1]["weights_sha256"]
    # BatchNorm sees half batches, so accumulation really changed the computation.
    reference = (reference_run / "manifest.json").read_text()
    assert accumulated[0]["weights_sha256"] not in reference


@pytest.mark.slow  # bf16 autocast is slow on the CPU; stage b of bench/gpu_check.sh repeats bf16 runs on CUDA
def test_bf16_repeats_bitwise(tmp_path):
    bf16 = [train_ok(tmp_path / f"bf16{i}", "--mixed-precision", "bf16", "--max-steps", "4") for i in range(2)]
    assert bf16[0]["weights_sha256"] == bf16[1]["weights_sha256"]
    assert bf16[0]["config"]["mixed_precision"] == "bf16"


def test_batch_that_does_not_split_into_chunks_is_a_usage_error(tmp_path):
    result = run_train(*TINY, "--grad-accum-steps", "3", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "accumulation chunks" in result.stderr


def test_tensorboard_events_are_written_when_installed(reference_run):
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))


def test_16_bit_grey_images_keep_their_top_8_bits(tmp_path):
    data = make_folder(tmp_path / "data")
    grey = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0 to 61380
    Image.fromarray(grey).save(data / "train" / "cat" / "0.png")  # PIL mode I;16; 0.tif sorts next
    Image.frombytes("I;16B", (32, 32), grey.astype(">u2").tobytes()).save(data / "train" / "cat" / "0.tif")
    loaded = imagefolder(str(data)).train.images
    for index in (0, 1):
        assert (loaded[index].numpy() == (grey >> 8).astype(np.uint8)).all()  # each channel


@pytest.mark.parametrize(("mode", "pixels"), [("I", np.int32), ("F", np.float32)])
def test_32_bit_images_are_refused_naming_the_file_and_mode(tmp_path, mode, pixels):
    data = make_folder(tmp_path / "data")
    image = data / "test" / "dog" / "2.tif"
    Image.fromarray(np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(pixels)).save(image)
    with pytest.raises(DataError, match=f"image {image} has 32-bit .* mode {mode}\\)"):
        imagefolder(str(data))


def test_a_broken_link_named_like_an_image_is_refused(tmp_path):
    data = make_folder(tmp_path / "data")
    link = data / "train" / "dog" / "lost.jpg"
    link.symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(DataError, match=f"image {link} is a broken symbolic link"):
        imagefolder(str(data))


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    plain = imagefolder(str(make_folder(tmp_path / "plain")))
    data = make_folder(tmp_path / "data")
    for split in ("train", "test"):
        (data / split / ".ipynb_checkpoints").mkdir()
        (data / split / ".ipynb_checkpoints" / "0.png").write_bytes((data / split / "cat" / "0.png").read_bytes())
    (data / "train" / "cat" / "._0.png").write_bytes(b"a macOS resource fork, not an image")
    hidden = imagefolder(str(data))
    assert hidden.num_classes == 2 and hidden.fingerprint() == plain.fingerprint()


def without_reading_rights() -> list[str]:
    """A command prefix under which a chmod 000 folder cannot be read, even by root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: every folder is readable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_folders_get_a_clear_error(tmp_path):
    data = make_folder(tmp_path / "data")
    prefix = without_reading_rights()
    (data / "test" / "cat").chmod(0)
    result = subprocess.run(
        [*prefix, sys.executable, str(REPO / "train.py"), *IMAGEFOLDER, "--data-dir", str(data),
         "--output-dir", str(tmp_path / "run")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"train.py: error: cannot read {data}/test/cat: Permission denied"
    (data / "test" / "cat").chmod(0o755)
    # train/ and test/ themselves, in one process (the folders are the caller's, so it may chmod them).
    check = """import sys
from pathlib import Path
from cifar.data import DataError, imagefolder
for split in ("train", "test"):
    (Path(sys.argv[1]) / split).chmod(0)
    try:
        imagefolder(sys.argv[1])
    except DataError as error:
        print(error)
    (Path(sys.argv[1]) / split).chmod(0o755)
"""
    read = subprocess.run([*prefix, sys.executable, "-c", check, str(data)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert read.stdout.splitlines() == [f"cannot read {data}/{split}: Permission denied" for split in ("train", "test")]
