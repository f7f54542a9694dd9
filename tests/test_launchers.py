"""The launcher configs load in accelerate, and the SLURM and Docker scripts are sound.

Real runs through these configs are in test_distributed_runs.py; here only what
is quick: accelerate's own parser, shell syntax, and the SLURM script's wiring
with stand-ins for srun, scontrol and accelerate.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO

CONFIGS = REPO / "configs" / "accelerate"
SCRIPTS = [REPO / "scripts" / "slurm_train.sbatch", REPO / "scripts" / "docker_check.sh"]


def _load(name: str):
    return load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # raises on unknown keys


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "cpu_gloo"])
def test_config_loads_in_accelerate(name):
    assert _load(name).mixed_precision == "no"  # the bitwise guarantees assume full precision


def test_configs_say_what_each_launch_needs():
    assert _load("single_gpu").num_processes == 1
    gloo = _load("cpu_gloo")
    # MULTI_GPU: accelerate starts the processes with torchrun; its MULTI_CPU
    # would start one and leave the rest to mpirun.
    assert (gloo.distributed_type.value, gloo.num_processes, gloo.use_cpu) == ("MULTI_GPU", 2, True)
    node = _load("multi_node")
    assert node.num_machines == 2
    assert node.main_process_ip is None  # given per allocation on the command line


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """srun runs the launcher once per node; each gets its own --machine_rank."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    _executable(bin_dir / "scontrol", '#!/bin/bash\ntr , "\\n" <<<"$3"\n')
    # Like srun: once per node, with SLURM_NODEID set, here one after the other.
    _executable(
        bin_dir / "srun",
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nfor i in 0 1; do SLURM_NODEID=$i "$@" || exit; done\n',
    )
    _executable(venv / "bin" / "accelerate", f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VENV": str(venv),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": "2",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_JOB_NODELIST": "gpu17,gpu18",
        "SLURM_JOB_ID": "1234",
    }
    subprocess.run(["bash", str(SCRIPTS[0]), "--seed", "7"], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert f"--machine_rank {rank} " in call
        assert "--num_machines 2 --num_processes 8 " in call
        assert "--main_process_ip gpu17 --main_process_port 21234 " in call
        assert call.endswith("train.py --seed 7")


def test_docker_check_is_its_own_make_target():
    makefile = (REPO / "Makefile").read_text()
    assert "docker-check:" in makefile
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "docker" not in test_recipe
