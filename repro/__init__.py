"""repro: a small library for reproducible PyTorch training.

Each concern lives in its own module:

- :mod:`repro.seeds`: derived seed streams (:func:`derive_seed`, :class:`SeedPlan`)
- :mod:`repro.seeding`: seeding the global generators (:func:`seed_everything`)
- :mod:`repro.distributed`: rank and world size before and after the process group, and leaving it
- :mod:`repro.determinism`: strict / warn / off switches
- :mod:`repro.hashseed`: making ``PYTHONHASHSEED`` effective
- :mod:`repro.loader`: worker seeding, generators, the resumable sharded sampler
- :mod:`repro.augment`: per-sample augmentation seeding
- :mod:`repro.rng`: capture and restore of every generator, as plain data
- :mod:`repro.checkpoint`: exact resume for any training loop (:class:`Checkpointer`)
- :mod:`repro.checkpoint_format`: the checkpoint folder's files, written atomically and hashed
- :mod:`repro.fingerprint`: the environment fingerprint and its comparison
- :mod:`repro.audit`: modules with no deterministic CUDA implementation
- :mod:`repro.weights`: hashes of model weights
- :mod:`repro.trace`: per-step traces for the run-twice verifier
- :mod:`repro.stop`: stopping after the current step on SIGTERM/SIGINT (:class:`GracefulStop`), and
  DataLoader workers that a signal to the process group does not kill (:class:`IgnoreStopSignals`)
- :mod:`repro.manifest`: the run folder's file names, the manifest's writing and reading
- :mod:`repro.files`: bounded readers of a run folder's files (JSON, YAML, safetensors), atomic writes
- :mod:`repro.verify`, :mod:`repro.compare`, :mod:`repro.reproduce`: ``python -m repro verify / compare /
  reproduce``; ``env`` is :func:`repro.fingerprint.environment_report`

Names are imported lazily, so ``import repro`` is instant and
``repro.hashseed`` can run before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "derive_seed": "repro.seeds",
    "mix64": "repro.seeds",
    "SeedPlan": "repro.seeds",
    "check_seed": "repro.seeds",
    "seed_everything": "repro.seeding",
    "seed_generators": "repro.seeding",
    "get_rank": "repro.distributed",
    "get_world_size": "repro.distributed",
    "get_local_rank": "repro.distributed",
    "launcher_world_size": "repro.distributed",
    "leave_process_group": "repro.distributed",
    "configure_determinism": "repro.determinism",
    "ensure_hash_seed": "repro.hashseed",
    "WorkerSeeder": "repro.loader",
    "make_generator": "repro.loader",
    "GlobalBatchSampler": "repro.loader",
    "SeededAugmentation": "repro.augment",
    "capture_rng_state": "repro.rng",
    "restore_rng_state": "repro.rng",
    "Checkpointer": "repro.checkpoint",
    "CheckpointError": "repro.checkpoint",
    "environment_fingerprint": "repro.fingerprint",
    "compare_fingerprints": "repro.fingerprint",
    "audit_model": "repro.audit",
    "state_dict_sha256": "repro.weights",
    "tensor_digests": "repro.weights",
    "StepTracer": "repro.trace",
    "GracefulStop": "repro.stop",
    "IgnoreStopSignals": "repro.stop",
    "JOB_STOP_SIGNALS": "repro.stop",
    "write_manifest": "repro.manifest",
    "read_manifest": "repro.manifest",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'repro' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
