"""RNG capture, determinism modes, rank detection, fingerprint and audit."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import REPO, clean_env, free_port
from torch import nn

from repro.audit import audit_model
from repro.determinism import configure_determinism
from repro.distributed import (
    LauncherVariableError,
    get_local_rank,
    get_rank,
    get_world_size,
    launcher_world_size,
    leave_process_group,
)
from repro.fingerprint import compare_fingerprints, environment_fingerprint
from repro.report import short
from repro.rng import capture_rng_state, restore_rng_state


def draws():
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(2).tolist()


def test_rng_state_round_trips_through_json():
    random.seed(3)
    np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    torch.manual_seed(3)
    state = json.loads(json.dumps(capture_rng_state()))
    expected = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(state)
    assert draws() == expected


def test_rng_state_of_unknown_version_or_corrupt_is_refused():
    state = capture_rng_state()
    with pytest.raises(ValueError, match=r"unsupported repro\.rng version"):
        restore_rng_state({**state, "version": 99})
    with pytest.raises(ValueError, match="corrupt"):
        restore_rng_state({**state, "torch_cpu": "not base64!"})
    with pytest.raises(ValueError, match=r"not a repro\.rng state"):
        restore_rng_state({"format": "pickle"})


@pytest.mark.parametrize("mode", ["strict", "warn", "off"])
def test_determinism_modes_report_what_they_set(mode):
    try:
        settings = configure_determinism(mode)
        assert settings["mode"] == mode
        assert settings["deterministic_algorithms"] is (mode != "off")
        assert settings["warn_only"] is (mode == "warn")
        assert settings["cudnn_benchmark"] is (mode == "off")
        assert settings["tf32_matmul"] is (mode == "off")
        assert torch.are_deterministic_algorithms_enabled() is (mode != "off")
        # Torch's default is True: strict mode would fill every new tensor, at a cost.
        assert settings["fill_uninitialized_memory"] is False
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        if mode != "off":
            assert settings["cublas_workspace_config"] == ":4096:8"
    finally:
        configure_determinism("off")
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True


def test_unknown_determinism_mode_raises():
    with pytest.raises(ValueError, match="strict, warn, off"):
        configure_determinism("fast")


def test_leave_process_group_destroys_a_gloo_group_and_is_a_no_op_without_one():
    leave_process_group()  # no group: nothing to do, nothing raised
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        leave_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize(
    ("env", "rank", "world", "local"),
    [
        ({}, 0, 1, 0),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, 3, 4, 1),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, 5, 8, 1),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, 2, 3, 0),
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 1, 2, 0),
    ],
)
def test_rank_detection_from_launcher_variables(monkeypatch, env, rank, world, local):
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMI_RANK",
        "PMI_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (get_rank(), get_world_size(), get_local_rank()) == (rank, world, local)
    assert launcher_world_size() == (world if env else None)


@pytest.mark.parametrize(
    ("env", "bad"),
    [({"RANK": "abc", "WORLD_SIZE": "1"}, "RANK"), ({"SLURM_PROCID": "0", "SLURM_NTASKS": "abc"}, "SLURM_NTASKS")],
)
def test_a_launcher_variable_that_is_not_an_integer_raises_its_own_error_naming_it(monkeypatch, env, bad):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LauncherVariableError, match=f"{bad} must be an integer, got 'abc'"):
        (get_rank(), get_world_size())


def test_rank_detection_uses_the_process_group_once_it_exists():
    code = (
        "import os, torch.distributed as dist\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{free_port()}', RANK='0', WORLD_SIZE='1')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "os.environ['RANK'] = '7'\n"
        "from repro.distributed import get_rank, get_world_size\n"
        "print(get_rank(), get_world_size())\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert result.stdout.split() == ["0", "1"], result.stderr


def test_fingerprint_records_versions_and_comparison_lists_differences():
    fingerprint = environment_fingerprint(world_size=2, repo=REPO)
    assert fingerprint["torch"] == torch.__version__ and fingerprint["world_size"] == 2
    assert "git_commit" in fingerprint
    assert compare_fingerprints(fingerprint, dict(fingerprint)) == []
    changed = {**fingerprint, "torch": "0.0", "world_size": 4}
    assert compare_fingerprints(fingerprint, changed) == [
        f"torch: {torch.__version__!r} -> '0.0'",
        "world_size: 2 -> 4",
    ]


def test_fingerprint_records_the_cpu_kernels_torch_chose_and_the_variables_that_lower_them():
    def fingerprint(**variables: str) -> dict:
        env = {**clean_env(), **variables}
        for name in {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"} - set(variables):
            env.pop(name, None)
        command = [sys.executable, "-m", "repro", "env", "--json"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["environment"]

    plain = fingerprint()
    lowered = fingerprint(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    assert plain["cpu_isa_variables"] == {}
    assert lowered["cpu_isa_variables"] == {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert lowered["cpu_capability"] == "DEFAULT" and plain["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert plain["cpu_model"] == lowered["cpu_model"]
    differences = compare_fingerprints(plain, lowered)
    assert "cpu_isa_variables: {} -> {'ATEN_CPU_CAPABILITY': 'default', 'ONEDNN_MAX_CPU_ISA': 'SSE41'}" in differences
    if plain["cpu_capability"] != "DEFAULT":
        assert f"cpu_capability: {plain['cpu_capability']!r} -> 'DEFAULT'" in differences


def test_a_fingerprint_recorded_before_the_cpu_keys_existed_differs_by_them_alone():
    now = environment_fingerprint(world_size=1, repo=REPO)
    recorded = {key: value for key, value in now.items() if not key.startswith("cpu_")}
    assert compare_fingerprints(recorded, now) == [
        f"cpu_capability: None -> {now['cpu_capability']!r}",
        "cpu_isa_variables: None -> {}",
        f"cpu_model: None -> {now['cpu_model']!r}",
    ]


class SpatialMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class FunctionalResize(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear")


def test_audit_flags_adaptive_pool_and_names_module_and_fix():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    findings = audit_model(model)
    assert [f.where for f in findings] == ["1 (AdaptiveAvgPool2d)"]
    assert "mean(dim=(2, 3))" in findings[0].fix


def test_audit_passes_a_spatial_mean_and_finds_functional_calls():
    assert audit_model(SpatialMean(), torch.zeros(1, 3, 8, 8)) == []
    findings = audit_model(FunctionalResize(), torch.zeros(1, 3, 8, 8))
    assert [f.where for f in findings] == ["operator aten::upsample_bilinear2d"]
    assert audit_model(nn.Sequential(nn.ReflectionPad2d(1), nn.Upsample(scale_factor=2, mode="bicubic")))


def test_audit_passes_the_shipped_models():
    from cifar.models import MODELS

    for name, model_class in MODELS.items():
        assert audit_model(model_class(num_classes=10), torch.zeros(2, 3, 32, 32)) == [], name


def test_short_echoes_a_small_value_whole_and_cuts_a_huge_one():
    assert short("lr") == "'lr'" and short([1, 2]) == "[1, 2]"
    huge = list(range(10**7))  # a repr of all of it would be 88 MB
    text = short({"key": huge, "other": "x" * 10**6})
    assert len(text) <= 80 and text.startswith("{'key': [0, 1, 2, 3, ...]")
    assert len(short("y" * 10**6, limit=30)) == 30
