"""The cache of decoded image folders (cifar/data_cache.py): found by content, checked when read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, clean_env, make_folder
from PIL import Image

from cifar import data, data_cache
from cifar.data import imagefolder


def entries(cache):
    return sorted(cache.glob("imagefolder-*.npz"))


def same_data(a: data.Splits, b: data.Splits) -> bool:
    return a.fingerprint() == b.fingerprint() and (a.mean, a.std, a.num_classes) == (b.mean, b.std, b.num_classes)


def test_a_cached_folder_reads_back_what_decoding_gives(tmp_path, monkeypatch):
    folder, cache = make_folder(tmp_path / "data", size=40), tmp_path / "cache"
    decoded = imagefolder(str(folder))
    first = imagefolder(str(folder), cache)
    assert first.source.endswith(f"decoded 32 images, cached in {entries(cache)[0]}")
    assert same_data(first, decoded)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} though the cache holds it")

    monkeypatch.setattr(data, "_read_image", no_decoding)
    again = imagefolder(str(folder), cache)
    assert again.source.endswith(f"read from {entries(cache)[0]}") and same_data(again, decoded)
    moved = folder.rename(tmp_path / "moved")  # the key names files by their path inside the folder
    assert imagefolder(str(moved), cache).source.endswith(f"read from {entries(cache)[0]}")


def test_names_that_are_not_utf8_are_read_and_sub_folders_ignored(tmp_path):
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    cat = folder / "train" / "cat"
    (cat / os.fsdecode(b"caf\xe9.png")).write_bytes((cat / "0.png").read_bytes())  # Latin-1, as old archives have
    (cat / "extra.png").mkdir()  # a folder with an image's name: not an image
    first = imagefolder(str(folder), cache)
    assert first.source.endswith(f"decoded 33 images, cached in {entries(cache)[0]}")
    assert imagefolder(str(folder), cache).source.endswith(f"read from {entries(cache)[0]}")


@pytest.mark.parametrize("change", ["pixels", "renamed", "added"])
def test_a_changed_folder_is_decoded_again(tmp_path, change):
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    imagefolder(str(folder), cache)
    image = folder / "train" / "dog" / "3.png"
    if change == "pixels":
        Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    elif change == "renamed":
        image.rename(image.with_name("9.png"))
    else:
        Image.new("RGB", (32, 32)).save(folder / "test" / "cat" / "extra.png")
    changed = imagefolder(str(folder), cache)
    assert ", cached in " in changed.source and len(entries(cache)) == 2
    assert same_data(changed, imagefolder(str(folder)))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zip"])
def test_a_damaged_entry_is_decoded_again_and_replaced(tmp_path, damage):
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    imagefolder(str(folder), cache)
    (entry,) = entries(cache)
    content = bytearray(entry.read_bytes())
    if damage == "truncated":
        content = content[: len(content) // 2]
    elif damage == "flipped byte":
        content[len(content) // 2] ^= 0xFF
    else:
        content = bytearray(b"not an archive")
    entry.write_bytes(content)
    again = imagefolder(str(folder), cache)
    assert again.source.endswith(f"decoded 32 images, cached in {entry}")
    assert same_data(again, imagefolder(str(folder)))
    assert imagefolder(str(folder), cache).source.endswith(f"read from {entry}")


def test_a_writer_killed_while_writing_leaves_no_entry(tmp_path):
    cache, key = tmp_path / "cache", "0" * 64
    writer = f"""
import numpy as np
from pathlib import Path
from cifar import data_cache
images = np.ones((100_000, 3, 32, 32), dtype=np.uint8)  # 300 MB: longer to write than the test takes to kill it
labels = np.zeros(100_000, dtype=np.int64)
arrays = dict(train_images=images, train_labels=labels, test_images=images[:10], test_labels=labels[:10],
              mean=np.zeros(3), std=np.ones(3))
data_cache.store(Path({str(cache)!r}), {key!r}, arrays, "0" * 64)
"""
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO, env=clean_env())
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the writer finished before it was killed"
    assert list(cache.glob(".*.tmp")) and not data_cache.entry_path(cache, key).exists()
    assert data_cache.load(cache, key) is None


def test_two_processes_writing_one_entry_at_once_leave_it_whole(tmp_path):
    folder, cache, go = make_folder(tmp_path / "data", per_class=64), tmp_path / "cache", tmp_path / "go"
    # As two ranks do: they start together, both miss, decode and write the same entry.
    loader = f"""
import os
import time
from pathlib import Path
from cifar.data import imagefolder
Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}").touch()
while not Path({str(go)!r}).exists():
    time.sleep(0.002)
splits = imagefolder({str(folder)!r}, Path({str(cache)!r}))
print(splits.fingerprint(), splits.source)
"""
    processes = [
        subprocess.Popen([sys.executable, "-c", loader], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [process.communicate(timeout=120)[0].split(" ", 1) for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    (entry,) = entries(cache)
    assert sorted(path.name for path in cache.iterdir()) == [entry.name]  # no temporary file left
    expected = imagefolder(str(folder)).fingerprint()
    assert [fingerprint for fingerprint, _ in outputs] == [expected, expected]
    # Both wrote it, unless one was descheduled long enough to find the other's entry.
    assert any(source.strip().endswith(f"cached in {entry}") for _, source in outputs)
    assert imagefolder(str(folder), cache).source.endswith(f"read from {entry}")


def test_an_entry_whose_arrays_fail_their_checksum_is_not_used(tmp_path, monkeypatch):
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    imagefolder(str(folder), cache)
    (entry,) = entries(cache)
    key = entry.stem.removeprefix("imagefolder-")
    arrays, checksum = data_cache.load(cache, key)
    arrays["train_images"][0, 0, 0, 0] ^= 1  # a well-formed archive, its checksum kept, one pixel changed
    with entry.open("wb") as file:
        np.savez(file, checksum=np.array(checksum), **arrays)
    reread = []
    monkeypatch.setattr(
        data, "_read_image", lambda path, content: reread.append(path) or np.zeros((32, 32, 3), np.uint8)
    )
    assert ", cached in " in imagefolder(str(folder), cache).source
    assert len(reread) == 32  # decoded again, not taken from the entry


@pytest.mark.parametrize("relabel", ["images viewed as int8", "images reshaped", "labels as int32"])
def test_an_entry_whose_arrays_keep_their_bytes_but_not_their_type_or_shape_is_not_used(tmp_path, relabel):
    # The fingerprint hashes the arrays' bytes: an entry rewritten with the same bytes under
    # another dtype or shape kept its checksum, and a run trained on those arrays.
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    decoded = imagefolder(str(folder), cache)
    (entry,) = entries(cache)
    arrays, checksum = data_cache.load(cache, entry.stem.removeprefix("imagefolder-"))
    if relabel == "images viewed as int8":
        arrays["train_images"] = arrays["train_images"].view(np.int8)
    elif relabel == "images reshaped":
        arrays["train_images"] = arrays["train_images"].reshape(-1, 32, 32, 3)
    else:
        arrays["train_labels"] = arrays["train_labels"].astype(np.int32)
    with entry.open("wb") as file:
        np.savez(file, checksum=np.array(checksum), **arrays)
    again = imagefolder(str(folder), cache)
    assert ", cached in " in again.source  # decoded again, and the entry replaced
    assert same_data(again, decoded) and again.train.images.dtype == decoded.train.images.dtype


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path):
    folder, blocker = make_folder(tmp_path / "data"), tmp_path / "a-file"
    blocker.write_text("not a folder")
    loaded = imagefolder(str(folder), blocker / "cache")
    assert "decoded 32 images, not cached (" in loaded.source and str(blocker) in loaded.source
    assert same_data(loaded, imagefolder(str(folder)))


def test_the_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_cache.cache_dir("auto") == tmp_path / "repro"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache.cache_dir("auto") == tmp_path / "home" / ".cache" / "repro"
    assert data_cache.cache_dir("none") is None
    assert data_cache.cache_dir("~/decoded") == tmp_path / "home" / "decoded"
    with pytest.raises(ValueError, match="empty"):
        data_cache.cache_dir("")


def test_a_file_replaced_after_hashing_never_files_its_pixels_under_its_old_bytes(tmp_path, monkeypatch):
    folder, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    image = folder / "test" / "dog" / "7.png"
    original = image.read_bytes()
    hash_files = data_cache.folder_key

    def replace_after_hashing(*args):
        # A monkeypatch, since no timing can be sure to land there: the real hash, then the file
        # replaced, as another process may do while the run decodes.
        key = hash_files(*args)
        Image.new("RGB", (32, 32), (7, 7, 7)).save(image)
        return key

    monkeypatch.setattr(data_cache, "folder_key", replace_after_hashing)
    imagefolder(str(folder), cache)
    monkeypatch.undo()
    image.write_bytes(original)  # the folder as it was when hashed
    assert same_data(imagefolder(str(folder), cache), imagefolder(str(folder)))
