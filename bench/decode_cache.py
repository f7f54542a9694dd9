"""Loading an image folder with and without the decoded-image cache (cifar/data_cache.py).

train.py loads ``--dataset imagefolder`` with ``cifar.data.imagefolder``. This
times it on one folder (the CIFAR-10 JPEGs unpacked by
``tar -xJf cifar10-jpeg.tar.xz -C DIR``), in alternating repetitions: decoding
every image (no cache), and reading the cache entry that the first cached load
wrote (listing and hashing the files, reading and checking the arrays). The
first cached load (decoding and writing the entry) is reported on its own.
Every load must give the same dataset fingerprint; the figure is the median
of the per-repetition ratios, decoding over reading.

    python bench/decode_cache.py /tmp/cifar10-jpeg
    python bench/decode_cache.py /tmp/cifar10-jpeg --repeats 5 --json figures.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

from cifar.data import Splits, imagefolder


def timed_load(folder: Path, cache: Path | None) -> tuple[float, Splits]:
    start = time.perf_counter()
    splits = imagefolder(str(folder), cache)
    return time.perf_counter() - start, splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an image folder: train/<class>/*, test/<class>/*")
    parser.add_argument("--repeats", type=benchlib.positive_int, default=3, help="alternating repetitions of each load")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    info = benchlib.environment()
    benchlib.print_environment(info)
    with tempfile.TemporaryDirectory(prefix="bench-decode-cache-") as scratch:
        cache = Path(scratch)
        first, splits = timed_load(args.folder, cache)
        fingerprint = splits.fingerprint()
        print(f"# {args.folder}: {len(splits.train) + len(splits.test)} images; {splits.source}")
        decoding, reading = [], []
        for _ in range(args.repeats):
            for seconds, load in ((decoding, None), (reading, cache)):
                elapsed, splits = timed_load(args.folder, load)
                if splits.fingerprint() != fingerprint:
                    sys.exit("a load gave other arrays than the first: the cache is wrong")
                seconds.append(elapsed)
    rows = [
        ["decode every image (data_cache: none)", f"{statistics.median(decoding):.2f}"],
        ["first cached load: decode and write the entry", f"{first:.2f}"],
        ["later cached loads: hash the files, read the entry", f"{statistics.median(reading):.2f}"],
    ]
    print()
    benchlib.print_table(["load", "seconds (median)"], rows)
    ratio = benchlib.median_ratio(decoding, reading)
    print(f"\ndecoding / reading the cache: {ratio:.1f}x; every load gave dataset_sha256 {fingerprint[:16]}...")
    benchlib.write_json(
        args.json,
        {"environment": info, "first_s": first, "decode_s": decoding, "read_s": reading, "ratio": ratio},
    )


if __name__ == "__main__":
    main()
