"""Real multi-process runs: two processes over gloo through `accelerate launch`, and two "nodes" on one machine."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import (
    DATALOADER,
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    free_port,
    make_folder,
    read_manifest,
    read_metrics,
    run_train,
    train_ok,
)
from test_resume import assert_same_run, wait_for_checkpoint
from test_trackers import logged_scalars

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU_GLOO = str(REPO / "configs" / "accelerate" / "cpu_gloo.yaml")


def two_process_command(run_dir: Path, *args: str) -> list[str]:
    launcher = [ACCELERATE, "launch", "--config_file", CPU_GLOO, "--main_process_port", str(free_port())]
    return [*launcher, str(REPO / "train.py"), *TINY, "--output-dir", str(run_dir), *args]


def launch_two_processes(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        two_process_command(run_dir, *args),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    launch_two_processes(run_dir)
    return run_dir


def test_two_processes_form_one_group_and_write_one_run(two_process_run):
    manifest = read_manifest(two_process_run)
    assert manifest["world_size"] == 2
    assert len(read_metrics(two_process_run)) == 2  # one line per epoch, not one per process
    assert sorted(p.name for p in two_process_run.parent.iterdir()) == ["run"]


def test_every_test_image_counts_once(two_process_run):
    assert read_manifest(two_process_run)["test_images"] == 128
    assert all(row["test_images"] == 128 for row in read_metrics(two_process_run))


# The DataLoader's shards are unit-tested in test_sharding.py; end to end, one pipeline
# runs in `make test` (a suite under 10 minutes) and the other with the slow tests.
@pytest.mark.parametrize("pipeline", [pytest.param("dataloader", marks=pytest.mark.slow), "device"])
def test_a_test_set_that_two_ranks_cannot_split_evenly_counts_each_image_once(tmp_path, pipeline):
    # 101 images: shares of 51 and 50. Padding them to equal length would count an image twice (102).
    run_dir = tmp_path / "run"
    launch_two_processes(run_dir, "--synthetic-test-size", "101", "--epochs", "1", "--data-pipeline", pipeline)
    assert read_manifest(run_dir)["test_images"] == 101
    assert [row["test_images"] for row in read_metrics(run_dir)] == [101]


def test_a_test_set_smaller_than_the_world_stops_every_rank_before_training(tmp_path):
    # Rank 1 would have no test image: it skipped the evaluation's forward pass, and rank 0 waited
    # forever in DDP's broadcast of the BatchNorm buffers there.
    run_dir = tmp_path / "run"
    result = subprocess.run(
        two_process_command(run_dir, "--synthetic-test-size", "1", "--epochs", "1"),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    # Counted, not split into lines: the two processes' lines can interleave in one pipe.
    refusal = "train.py: error: the test set has 1 image, fewer than the 2 processes"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]  # one a process, the same line
    assert result.stderr.count("train.py: error: ") == 2, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow  # the resume tests compare two-process runs of their own against this fixture's
def test_two_process_run_repeats_bitwise(two_process_run, tmp_path):
    launch_two_processes(tmp_path / "again")
    assert read_manifest(tmp_path / "again")["weights_sha256"] == read_manifest(two_process_run)["weights_sha256"]


@pytest.mark.slow  # the SIGTERM test below stops two processes and resumes them to the same weights
def test_two_process_run_resumes_bitwise(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    launch_two_processes(run_dir, "--max-steps", "5")
    launch_two_processes(run_dir, "--resume", "latest")
    assert_same_run(run_dir, two_process_run)


@pytest.mark.slow  # 22 s; a resume on another world size is a documented limit, not a guarantee
def test_resumed_on_more_processes_mid_epoch_the_epochs_loss_counts_its_first_steps(two_process_run, tmp_path):
    # Rank 1 has no loss sum of its own in a one-process checkpoint: it counted 0, and the
    # mean over ranks halved the first steps' share of the epoch's loss.
    run_dir = tmp_path / "run"
    train_ok(run_dir, "--max-steps", "4")
    launch_two_processes(run_dir, "--resume", "latest")
    resumed, whole = read_metrics(run_dir)[0]["train_loss"], read_metrics(two_process_run)[0]["train_loss"]
    assert abs(resumed - whole) < 0.01, (resumed, whole)  # not bitwise: the world size changed


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_matches(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        two_process_command(run_dir, "--checkpoint-every", "1"),
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_checkpoint(run_dir, launcher)
    workers = {p.environ().get("RANK"): p for p in psutil.Process(launcher.pid).children(recursive=True)}
    workers["1"].send_signal(signal.SIGTERM)  # rank 1 only: rank 0, which writes the checkpoint, must learn of it
    output, _ = launcher.communicate(timeout=120)
    assert "stopped by SIGTERM at step" in output, output[-3000:]
    step = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert step < 16  # stopped before the end of the run
    stopped = run_dir / "checkpoints" / f"step-{step:08d}"
    assert sorted(p.name for p in stopped.glob("rank-*.json")) == ["rank-0.json", "rank-1.json"]
    launch_two_processes(run_dir, "--resume", "latest", "--checkpoint-every", "1")
    assert_same_run(run_dir, two_process_run)


# The SIGTERM test above resumes two processes on the default pipeline (device), and
# test_example_plain.py kills and resumes a DataLoader on GlobalBatchSampler with workers.
@pytest.mark.slow
def test_two_processes_on_the_dataloader_resume_bitwise(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch_two_processes(whole, *DATALOADER)
    launch_two_processes(resumed, *DATALOADER, "--max-steps", "5")
    launch_two_processes(resumed, *DATALOADER, "--resume", "latest")
    assert_same_run(resumed, whole)


def test_two_nodes_on_one_machine_match_one_launcher(two_process_run, tmp_path):
    port = str(free_port())
    launchers = []
    for machine_rank in ("0", "1"):
        command = [
            ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", machine_rank, "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            str(REPO / "train.py"), *TINY, "--output-dir", str(tmp_path / "run"),
        ]  # fmt: skip
        launchers.append(
            subprocess.Popen(
                command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert read_manifest(tmp_path / "run")["weights_sha256"] == read_manifest(two_process_run)["weights_sha256"]


def test_multi_cpu_launch_without_mpirun_stops_instead_of_training_alone(tmp_path):
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\nuse_cpu: true\nmixed_precision: 'no'\n"
    )
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(config), str(REPO / "train.py"), *TINY,
         "--output-dir", str(tmp_path / "run")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "asked for several processes but started one" in result.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_train_py_in_a_slurm_batch_step_names_the_variable_that_declared_other_processes(tmp_path):
    # The environment of an sbatch script with --ntasks=4: Slurm's variables for the whole job,
    # in the one process the script runs, which no launcher joined to any other.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), env=clean_env(**slurm))
    line = assert_one_line_error(result, "SLURM_NTASKS=4 says 4 processes but this one is alone")
    assert "scripts/slurm_train.sbatch" in line and "env -u SLURM_NTASKS" in line
    assert not (tmp_path / "run").exists()


def test_two_processes_log_each_step_once_as_the_mean_over_processes(two_process_run):
    scalars = logged_scalars(two_process_run)
    assert [step for step, _ in scalars["step/train_loss"]] == list(range(1, 17))
    # An epoch's train_loss is the mean over processes of their summed step losses: the mean
    # of the logged per-step losses, up to float32 rounding, if they too are means over processes.
    losses = [loss for _, loss in scalars["step/train_loss"]]
    for epoch, (_, train_loss) in enumerate(scalars["train_loss"]):
        assert sum(losses[epoch * 8 : (epoch + 1) * 8]) / 8 == pytest.approx(train_loss, rel=1e-5)


def test_two_nodes_whose_data_copies_differ_stop_naming_both_ranks(tmp_path):
    # Each "machine" reads its own copy of a relative --data-dir, from its own working folder.
    port, run_dir = str(free_port()), tmp_path / "run"
    launchers = []
    for machine_rank in ("0", "1"):
        machine = tmp_path / f"machine{machine_rank}"
        make_folder(machine / "data", seed=int(machine_rank))  # machine 1's copy holds other images
        command = [
            ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", machine_rank, "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            str(REPO / "train.py"), *TINY, "--dataset", "imagefolder", "--data-dir", "data", "--data-cache", "none",
            "--output-dir", str(run_dir),
        ]  # fmt: skip
        launchers.append(
            subprocess.Popen(
                command, cwd=machine, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode != 0, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.startswith("train.py: error: ")]
        assert len(lines) == 1, stderr[-3000:]
        assert "the processes loaded different data" in lines[0] and "rank 0: data " in lines[0], lines[0]
        assert "rank 1: data " in lines[0], lines[0]
        assert "exitcode  : 2" in stderr, stderr[-3000:]  # train.py's status for bad input, in torchrun's report
    assert not (run_dir / "manifest.json").exists()
