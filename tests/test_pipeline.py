"""Pipeline features: image folders, offline CIFAR, curves, NaN detection, evaluation sharding."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import REPO, TINY, clean_env, run_train, train_ok
from PIL import Image

IMAGEFOLDER = ["--dataset", "imagefolder", "--model", "small_cnn", "--epochs", "1", "--batch-size", "8",
               "--num-workers", "0", "--lr", "0.05"]  # fmt: skip


def make_folder(root, classes=("cat", "dog"), per_class=8, size=32):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 64, (size, size, 3)) + 128 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_imagefolder_trains(tmp_path):
    data = make_folder(tmp_path / "data", size=40)  # not 32x32: resized on load
    manifest = train_ok(tmp_path / "run", *IMAGEFOLDER, "--data-dir", str(data))
    assert manifest["test_images"] == 16


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "does not exist"),
        ("no_test", "has no test/ folder"),
        ("no_images", "no images in"),
        ("unreadable", "unreadable image"),
        ("mismatched_classes", "has classes"),
    ],
)
def test_bad_image_folders_get_a_clear_error(tmp_path, breakage, message):
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
    elif breakage == "unreadable":
        (data / "train" / "cat" / "0.png").write_bytes(b"not an image")
    elif breakage == "mismatched_classes":
        (data / "test" / "dog").rename(data / "test" / "bird")
    result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr


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


def test_gradient_accumulation_and_bf16_repeat_bitwise(reference_run, tmp_path):
    accumulated = [train_ok(tmp_path / f"accum{i}", "--grad-accum-steps", "2") for i in range(2)]
    assert accumulated[0]["weights_sha256"] == accumulated[1]["weights_sha256"]
    # BatchNorm sees half batches, so accumulation really changed the computation.
    reference = (reference_run / "manifest.json").read_text()
    assert accumulated[0]["weights_sha256"] not in reference
    bf16 = [train_ok(tmp_path / f"bf16{i}", "--mixed-precision", "bf16", "--max-steps", "4") for i in range(2)]
    assert bf16[0]["weights_sha256"] == bf16[1]["weights_sha256"]
    assert bf16[0]["config"]["mixed_precision"] == "bf16"


def test_batch_that_does_not_split_into_chunks_is_a_usage_error(tmp_path):
    result = run_train(*TINY, "--grad-accum-steps", "3", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "accumulation chunks" in result.stderr


def test_tensorboard_events_are_written_when_installed(reference_run):
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
