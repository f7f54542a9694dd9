"""A run folder's layout: the names of the files a reproducible run writes.

Every reader and writer of a run folder (train.py, the checkpoints, ``python -m
repro compare`` and ``reproduce``) takes these names from here, so the layout
is spelled in one place.
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"  # what the run was and what it produced (seeds, environment, weights hash)
CONFIG_FILE = "config.yaml"  # the resolved config, every key
METRICS_FILE = "metrics.jsonl"  # one JSON object per completed epoch
WEIGHTS_FILE = "model.safetensors"  # the final weights
CURVES_FILE = "curves.png"  # training curves, when matplotlib is installed
CHECKPOINTS_DIR = "checkpoints"  # one folder per checkpoint, written atomically
