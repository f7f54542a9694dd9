"""The launcher configs load in accelerate, and the SLURM and Docker scripts are sound.

Real runs through these configs are in test_distributed_runs.py; here only what
is quick: accelerate's own parser, shell syntax, and the SLURM script's wiring
with stand-ins for srun, scontrol and accelerate.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO, TINY, clean_env, free_port, read_manifest

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


def _fake_slurm(tmp_path: Path, srun: str, env: dict[str, str], **variables: str) -> dict[str, str]:
    """Stand-ins for `scontrol` and `srun` (its script ``srun``) in ``tmp_path/bin``, and the
    environment of a batch step on 2 nodes: ``env`` with ``variables`` added."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", '#!/bin/bash\ntr , "\\n" <<<"$3"\n')
    _executable(bin_dir / "srun", srun)
    return {
        **env,
        "PATH": f"{bin_dir}:{env['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "1234",
        **variables,
    }


def _launcher_calls(tmp_path: Path, *args: str) -> list[str]:
    """Run the SLURM script with ``args`` on 2 nodes of 4 GPUs, a stand-in for accelerate
    recording each call: the value of PET_SIGNALS_TO_HANDLE it saw, a space, its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _executable(venv / "bin" / "accelerate", f'#!/bin/bash\necho "$PET_SIGNALS_TO_HANDLE $*" >> {tmp_path}/calls\n')
    # Like srun: once per node, with SLURM_NODEID set, here one after the other.
    srun = '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nfor i in 0 1; do SLURM_NODEID=$i "$@" || exit; done\n'
    env = _fake_slurm(
        tmp_path, srun, dict(os.environ), VENV=str(venv), SLURM_GPUS_PER_NODE="a100:4", SLURM_JOB_NODELIST="gpu17,gpu18"
    )
    subprocess.run(["bash", str(SCRIPTS[0]), *args], env=env, check=True, capture_output=True)
    return (tmp_path / "calls").read_text().splitlines()


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """srun runs the launcher once per node; each gets its own --machine_rank, and a launcher
    that hands SIGUSR1 on to its processes, and train.py gets `--resume auto` for a requeue."""
    calls = _launcher_calls(tmp_path, "--seed", "7")
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        handled, launch = call.split(" ", 1)
        assert "SIGUSR1" in handled.split(",") and "SIGTERM" in handled.split(",")
        assert f"--machine_rank {rank} " in launch
        assert "--num_machines 2 --num_processes 8 " in launch
        assert "--main_process_ip gpu17 --main_process_port 21234 " in launch
        assert launch.endswith("train.py --seed 7 --resume auto")


@pytest.mark.parametrize(
    "args",
    [["--resume", "latest"], ["--resume=runs/x/checkpoints/step-00000008"], ["--overwrite"]],
    ids=["resume", "resume=", "overwrite"],
)
def test_slurm_script_adds_no_resume_to_a_run_that_chose(tmp_path, args):
    """A --resume given in any form is kept as it is, and --overwrite gets none (train.py refuses both)."""
    for call in _launcher_calls(tmp_path, "--seed", "7", *args):
        assert call.endswith("train.py --seed 7 " + " ".join(args))


# Like srun --kill-on-bad-exit=1: one task per node, at the same time. Each task's processes carry
# FAKE_SLURM_STEP in their environment, as SLURM keeps them in the step's cgroup: torchrun starts its
# workers in sessions of their own, and a launcher's end orphans them. When a task fails, every
# process of the step is killed, orphans included. Each task's exit status is reported.
_STEP_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for i in 0 1; do
    (FAKE_SLURM_STEP=$FAKE_SLURM_JOB SLURM_NODEID=$i "$@"; status=$?; echo "task $i: status $status"; exit $status) &
done
rc=0
for _ in 0 1; do
    wait -n && continue
    rc=$?
    for environ in $(grep -lsxz "FAKE_SLURM_STEP=$FAKE_SLURM_JOB" /proc/[0-9]*/environ); do
        kill -KILL "$(basename "$(dirname "$environ")")" 2>/dev/null
    done
done
exit $rc
"""


def _step_processes(job: str) -> list[int]:
    """The pids of the processes of the fake srun's step ``job``, found as _STEP_SRUN finds them."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FAKE_SLURM_STEP={job}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            pass
    return pids


def _sbatch(tmp_path: Path, job: str, args: list[str]) -> subprocess.Popen:
    """Start the SLURM script as a batch step on 2 "nodes" of this machine, one CPU process each."""
    (tmp_path / job).mkdir()
    env = _fake_slurm(
        tmp_path / job,
        _STEP_SRUN,
        clean_env(),
        VENV=str(Path(sys.executable).parent.parent),
        SLURM_GPUS_ON_NODE="1",
        SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
        MAIN_PROCESS_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="",
        FAKE_SLURM_JOB=f"{tmp_path.name}-{job}",
    )
    return subprocess.Popen(
        ["bash", str(SCRIPTS[0]), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_slurm_job_stopped_by_usr1_then_requeued_resumes_to_the_uninterrupted_weights(tmp_path):
    """`--signal=USR1@120` then a requeue, with stand-ins for SLURM: SIGUSR1 to every process of the
    step stops both nodes with a checkpoint of their step (the launchers wait for it), and the
    script run again with the same arguments resumes to the weights of a job never stopped."""
    run = [*TINY, "--synthetic-train-size", "512", "--epochs", "3", "--checkpoint-every", "2", "--log-with", "none"]
    run_dir = tmp_path / "run"
    job = _sbatch(tmp_path, "job1", [*run, "--output-dir", str(run_dir)])
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-00000002").exists() and job.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    for pid in _step_processes(f"{tmp_path.name}-job1"):
        os.kill(pid, signal.SIGUSR1)
    stopped = job.communicate(timeout=120)[0]
    assert job.returncode != 0, stopped
    # Not ended by the signal itself (128 + 10), which would leave the training processes orphaned.
    assert stopped.count("status ") == 2 and "status 138" not in stopped, stopped
    steps = {int(step) for step in re.findall(r"stopped by SIGUSR1 at step (\d+); checkpoint written", stopped)}
    assert len(steps) == 1, stopped  # both ranks, at one step, and not the last (48)
    (step,) = steps
    assert step < 48 and (run_dir / "checkpoints" / f"step-{step:08d}" / "state.json").exists(), stopped

    requeued = _sbatch(tmp_path, "job2", [*run, "--output-dir", str(run_dir)])
    out = requeued.communicate(timeout=180)[0]
    assert requeued.returncode == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'} at step {step}" in out

    whole = _sbatch(tmp_path, "job3", [*run, "--output-dir", str(tmp_path / "whole")])
    out = whole.communicate(timeout=180)[0]
    assert whole.returncode == 0, out
    assert read_manifest(run_dir)["weights_sha256"] == read_manifest(tmp_path / "whole")["weights_sha256"]


def test_docker_check_is_its_own_make_target():
    makefile = (REPO / "Makefile").read_text()
    assert "docker-check:" in makefile
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "docker" not in test_recipe
