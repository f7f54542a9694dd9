"""`python -m repro` (verify, compare, reproduce, env), and the guarantees it rests on:
num_workers and world size do not change a run. Real subprocesses, tiny runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    DATALOADER,
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    free_port,
    make_folder,
    read_manifest,
    run_train,
    train_ok,
)

from repro.__main__ import main
from repro.augment import SeededAugmentation
from repro.compare import compare_runs
from repro.loader import GlobalBatchSampler
from repro.report import DIFFERENT, ERROR, SAME, CommandError, Report
from repro.reproduce import reproduce_run
from repro.seeds import SeedPlan
from repro.trace import StepTracer, TraceSettingError
from repro.verify import read_trace, verify_command

BIN = Path(sys.executable).parent
TRAIN = str(REPO / "train.py")
CPU_GLOO = str(REPO / "configs" / "accelerate" / "cpu_gloo.yaml")


def repro_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m repro ARGS`` as a user would, and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "repro", *args],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def use_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the runs that a check called in-process starts the environment of ``clean_env``."""
    for key in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(key)
    for key, value in clean_env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def child_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_clean_env(monkeypatch)


def ignore_git_moves(run_a: Path, run_b: Path) -> None:
    """Give run B run A's git state: other engineers commit to this checkout while
    the tests run, and a commit between two runs is a real, but unwanted, difference."""
    manifest_a, manifest_b = read_manifest(run_a), read_manifest(run_b)
    for key in ("git_commit", "git_dirty"):
        manifest_b["environment"][key] = manifest_a["environment"].get(key)
    (run_b / "manifest.json").write_text(json.dumps(manifest_b, indent=2))


# --------------------------------------------------------------------------- verify


def test_verify_finds_train_py_bitwise_reproducible(tmp_path, child_env, capsys):
    # The command line's own main(), in this process: the two training runs are real subprocesses.
    status = main(["verify", "--steps", "4", "--trace-dir", str(tmp_path), "--", sys.executable, TRAIN, *TINY])
    stdout = capsys.readouterr().out
    assert status == 0, stdout
    assert "bitwise reproducible over 4 steps" in stdout
    # train.py traces its initial state too, as step 0: initial weights that differ are named as such.
    assert [record["step"] for record in read_trace(tmp_path / "run-1")[0]] == [0, 1, 2, 3, 4]


@pytest.mark.slow  # a note's wording; tracing train.py runs in the default tests
def test_train_py_announces_a_trace_request_that_takes_over_its_run(tmp_path):
    traces, mine = tmp_path / "traces", tmp_path / "mine"
    env = clean_env(REPRO_TRACE_DIR=str(traces), REPRO_TRACE_STEPS="1")  # as if left exported in a shell
    result = run_train(*TINY, "--output-dir", str(mine), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    note = (
        "note: REPRO_TRACE_DIR is set (python -m repro verify): this run traces at most 1 steps into "
        f"{traces / 'run'}, not its configured output folder; unset REPRO_TRACE_DIR to train it"
    )
    assert note in result.stderr.splitlines()
    assert read_manifest(traces / "run")["step"] == 1 and not mine.exists()


@pytest.mark.parametrize("steps", ["abc", "0", "-3", "file"])
def test_a_trace_setting_that_cannot_be_used_is_refused_in_one_line(tmp_path, monkeypatch, steps):
    (tmp_path / "a-file").write_text("")
    directory = tmp_path / "a-file" if steps == "file" else tmp_path / "traces"
    monkeypatch.setenv("REPRO_TRACE_DIR", str(directory))
    monkeypatch.setenv("REPRO_TRACE_STEPS", "2" if steps == "file" else steps)
    expected = (
        f"REPRO_TRACE_DIR={directory}: cannot write the trace there: File exists"
        if steps == "file"
        else "REPRO_TRACE_STEPS must be a positive integer, got " + (repr(steps) if steps == "abc" else steps)
    )
    with pytest.raises(TraceSettingError) as raised:
        StepTracer.from_environment(0)
    assert str(raised.value) == expected
    if steps == "abc":  # and train.py turns it into its one-line usage error
        assert_one_line_error(run_train(*TINY, env=clean_env(REPRO_TRACE_DIR=str(directory))), expected)


NOISY_TRAINING = """
import os

import torch
from torch import nn

from repro.trace import StepTracer

tracer = StepTracer.from_environment(0)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
inputs, targets = torch.randn(32, 8), torch.randint(0, 3, (32,))
unseeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
tracer.record_start(model)
for step in range(1, tracer.steps + 1):
    noise = torch.randn(inputs.shape, generator=unseeded) * 0.01
    # The injected nondeterminism: from step 3 on, noise no seed controls.
    loss = nn.functional.cross_entropy(model(inputs + noise if step >= 3 else inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    tracer.record(step, loss.item(), model)
"""


def test_verify_names_the_step_and_tensor_where_an_unseeded_draw_enters(tmp_path, child_env):
    script = tmp_path / "noisy_training.py"
    script.write_text(NOISY_TRAINING)
    report = verify_command([sys.executable, str(script)], steps=5)
    text = "\n".join(report.lines)
    assert report.status == DIFFERENT, text
    assert "first differ at step 3" in text
    assert "0.weight: sum differs by" in text  # the first tensor in state_dict order
    assert "rank 0: loss" in text


# A loop that goes wrong as asked by its argument: "unseeded-init" draws its initial weights from no
# seed; "diverge-then-fail" blows up the second run's loss from step 3 and stops it at step 4.
MISBEHAVING_TRAINING = """
import os
import sys

import torch
from torch import nn

from repro.trace import StepTracer

mode = sys.argv[1]
tracer = StepTracer.from_environment(0)
second_run = os.environ["REPRO_TRACE_DIR"].endswith("run-2")
torch.manual_seed(int.from_bytes(os.urandom(4), "little") if mode == "unseeded-init" else 0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
inputs = torch.ones(8, 4)
tracer.record_start(model)
for step in range(1, tracer.steps + 1):
    loss = model(inputs).pow(2).mean()
    if mode == "diverge-then-fail" and second_run and step >= 3:
        loss = loss * 1000
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    tracer.record(step, loss.item(), model)
    if mode == "diverge-then-fail" and second_run and step == 4:
        sys.exit("loss diverged")
"""


@pytest.mark.slow  # reporting a divergence: test_verify_names_the_step_and_tensor_where_an_unseeded_draw_enters
def test_verify_names_initial_weights_that_differ_as_such(tmp_path, child_env):
    script = tmp_path / "misbehaving_training.py"
    script.write_text(MISBEHAVING_TRAINING)
    report = verify_command([sys.executable, str(script), "unseeded-init"], steps=2)
    assert report.status == DIFFERENT, report.lines
    assert report.lines[0] == "not reproducible: the initial state differs (before step 1)"
    assert report.lines[1] == "  rank 0: 2 of 2 tensors differ; the first, in state_dict order:"
    assert report.lines[2].startswith("    weight: sum differs by ")


@pytest.mark.slow  # reporting a divergence: test_verify_names_the_step_and_tensor_where_an_unseeded_draw_enters
def test_verify_shows_where_a_run_diverged_before_it_failed(tmp_path, child_env):
    script = tmp_path / "misbehaving_training.py"
    script.write_text(MISBEHAVING_TRAINING)
    report = verify_command([sys.executable, str(script), "diverge-then-fail"], steps=6)
    assert report.status == DIFFERENT, report.lines
    assert report.lines[0] == "not reproducible: the runs first differ at step 3 (identical before it)"
    assert report.lines[1].startswith("  rank 0: loss ")
    failure = report.lines.index("run 2 then failed with exit status 1; the end of its output:")
    assert report.lines[failure + 1 :] == ["  loss diverged"]


# Writes argv[1] as the one record of its trace, from the folder argv[2]: a command with a trace of its own.
TRACE_WRITER = """
import os
import sys

os.chdir(sys.argv[2])
with open(os.path.join(os.environ["REPRO_TRACE_DIR"], "rank-0.jsonl"), "w") as trace:
    trace.write(sys.argv[1] + "\\n")
"""
VALID_RECORD = {"step": 1, "loss": 0.5, "tensors": {"w": "00"}, "stats": {"w": [1.0, 2.0]}}


def test_verify_finds_a_relative_trace_dir_from_a_command_that_changes_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = [sys.executable, "-c", TRACE_WRITER, json.dumps(VALID_RECORD), "/"]
    assert main(["verify", "--steps", "1", "--trace-dir", "traces", "--", *command]) == SAME
    assert "bitwise reproducible over 1 steps" in capsys.readouterr().out
    assert (tmp_path / "traces" / "run-2" / "rank-0.jsonl").read_text() == json.dumps(VALID_RECORD) + "\n"


MALFORMED_RECORDS = {
    "no stats": ({"step": 1, "loss": 0.5, "tensors": {"w": "00"}}, "'stats' must map each tensor name to [sum, norm]"),
    "stats null": ({**VALID_RECORD, "stats": None}, "'stats' must map each tensor name to [sum, norm]"),
    "stats of one number": ({**VALID_RECORD, "stats": {"w": [1.0]}}, "'stats' must map each tensor name"),
    "tensors a list": ({**VALID_RECORD, "tensors": ["00"]}, "'tensors' must map each tensor name to its digest"),
    "loss a string": ({**VALID_RECORD, "loss": "0.5"}, "'loss' must be a number or null, got '0.5'"),
    "step a list": ({**VALID_RECORD, "step": [1]}, "'step' must be an integer from 0, got [1]"),
}


@pytest.mark.parametrize("kind", list(MALFORMED_RECORDS))
def test_verify_refuses_a_malformed_trace_record_in_one_line(tmp_path, capsys, kind):
    record, problem = MALFORMED_RECORDS[kind]
    command = [sys.executable, "-c", TRACE_WRITER, json.dumps(record), str(tmp_path)]
    assert main(["verify", "--steps", "1", "--trace-dir", str(tmp_path / "traces"), "--", *command]) == ERROR
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(
        f"python -m repro verify: error: not a valid trace: {tmp_path / 'traces' / 'run-1' / 'rank-0.jsonl'}, "
        f"record 1: {problem}"
    )


# A script that keeps its own output folder under the verifier, as one written from an older README
# would: run 2 finds run 1's "checkpoint" there, resumes at the end, and trains no step.
RESUMING_TRAINING = """
import sys
from pathlib import Path

import torch

from repro.trace import StepTracer

out = Path(sys.argv[1])
tracer = StepTracer.from_environment(0)
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
checkpoint = out / "checkpoint.pt"
step = torch.load(checkpoint) if checkpoint.exists() else 0
while step < 3:
    step += 1
    tracer.record(step, 0.5, model)
out.mkdir(exist_ok=True)
torch.save(step, checkpoint)
"""


@pytest.mark.slow  # a diagnosis's wording; verify's paths run in the default tests
def test_verify_says_a_second_run_that_traced_nothing_probably_resumed_from_the_first(tmp_path, child_env):
    script = tmp_path / "resuming_training.py"
    script.write_text(RESUMING_TRAINING)
    with pytest.raises(CommandError) as raised:
        verify_command([sys.executable, str(script), str(tmp_path / "out")], steps=3)
    assert str(raised.value) == (
        "run 2 traced no step on rank 0, where run 1 traced 3 records: it probably resumed from run 1's output; "
        "a traced script must write into tracer.run_dir (a fresh folder per run) and stop after tracer.steps steps"
    )


def test_verify_reports_a_failing_run_with_its_output(child_env):
    failing = "import sys; print('loading data'); sys.exit('train: error: no such dataset')"
    report = verify_command([sys.executable, "-c", failing], steps=2)
    assert report.status == ERROR
    assert report.lines[0] == "run 1 failed with exit status 1; the end of its output:"
    assert report.lines[1:] == ["  loading data", "  train: error: no such dataset"]


@pytest.mark.slow  # 35 to 110 s measured on 2 shared cores: two launches of two processes each
def test_verify_under_accelerate_launch_traces_every_rank(tmp_path, child_env):
    launch = [str(BIN / "accelerate"), "launch", "--config_file", CPU_GLOO, "--main_process_port", str(free_port())]
    report = verify_command([*launch, TRAIN, *TINY], steps=3, trace_root=tmp_path)
    assert report.status == SAME, report.lines
    assert report.lines[0].startswith("bitwise reproducible over 3 steps (2 ranks")
    for run in ("run-1", "run-2"):
        assert sorted(path.name for path in (tmp_path / run).glob("rank-*.jsonl")) == ["rank-0.jsonl", "rank-1.jsonl"]


# --------------------------------------------------------------------------- guarantees


def test_num_workers_do_not_change_the_weights(dataloader_run, tmp_path, capsys):
    no_worker, one_worker, three_workers = dataloader_run, tmp_path / "workers-1", tmp_path / "workers-3"
    expected = read_manifest(no_worker)["weights_sha256"]
    for run_dir, workers in ((one_worker, "1"), (three_workers, "3")):
        manifest = train_ok(run_dir, *DATALOADER, "--num-workers", workers)
        assert manifest["weights_sha256"] == expected, f"num_workers={workers}"

    # compare: the manifests name num_workers result-neutral, so the runs are the same result.
    ignore_git_moves(no_worker, one_worker)
    assert "num_workers" in read_manifest(one_worker)["result_neutral_keys"]
    assert main(["compare", str(no_worker), str(one_worker)]) == SAME
    printed = capsys.readouterr().out
    assert "same result; the configs differ only in result-neutral keys: num_workers, output_dir" in printed
    # A manifest that names no result-neutral keys (written before the field) ignores only the run's location.
    manifest = read_manifest(one_worker)
    del manifest["result_neutral_keys"]
    (one_worker / "manifest.json").write_text(json.dumps(manifest))
    report = compare_runs(no_worker, one_worker)
    assert report.status == DIFFERENT, report.lines
    assert report.lines[0].startswith("runs differ in: config ") and "  num_workers: 0 -> 1" in report.lines


def _augment(image: torch.Tensor) -> torch.Tensor:
    """A random flip and noise, drawn from torch's generator as torchvision's transforms draw."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image + 0.1 * torch.randn_like(image)


def _global_steps(dataset: list, seed: int, world_size: int, epoch: int) -> list[list[tuple[int, bytes]]]:
    """For each global step, the sorted (sample index, augmented bytes) pairs of all ranks together."""
    augmented = SeededAugmentation(dataset, _augment, SeedPlan(seed))
    samplers = [
        GlobalBatchSampler(len(dataset), 8, seed, rank=rank, world_size=world_size) for rank in range(world_size)
    ]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    steps = []
    for batches in zip(*samplers, strict=True):
        keys = [key for batch in batches for key in batch]
        steps.append(sorted((index, augmented[(epoch, index)][0].numpy().tobytes()) for epoch, index in keys))
    return steps


def test_global_steps_hold_the_same_samples_and_augmentations_at_any_world_size():
    generator = torch.Generator().manual_seed(0)
    dataset = [(torch.rand(3, 4, 4, generator=generator), label % 3) for label in range(36)]
    for epoch in (0, 1):
        one = _global_steps(dataset, seed=2333, world_size=1, epoch=epoch)
        two = _global_steps(dataset, seed=2333, world_size=2, epoch=epoch)
        assert len(one) == 4 and all(len(step) == 8 for step in one)
        assert one == two, f"epoch {epoch}"
    raw = {index: image.numpy().tobytes() for index, (image, _) in enumerate(dataset)}
    assert any(raw[index] != data for index, data in one[0]), "the augmentation changed nothing"


# A network without BatchNorm, trained the same way on 1 process or under torchrun:
# the pipeline's sampler and augmentation, DDP averaging the gradients over gloo.
DDP_TRAINING = """
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from repro.augment import SeededAugmentation
from repro.loader import GlobalBatchSampler
from repro.seeds import SeedPlan
from repro.trace import StepTracer, TraceSettingError


def augment(image):
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image + 0.05 * torch.randn_like(image)


def train(seed, rank, world_size):
    data = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 8, 8, generator=data), torch.randint(0, 4, (64,), generator=data)
    seeds = SeedPlan(seed)
    train_set = SeededAugmentation(list(zip(images, labels.tolist())), augment, seeds)
    sampler = GlobalBatchSampler(64, 16, seed, rank=rank, world_size=world_size)
    torch.manual_seed(seeds.model())
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in sampler:
            samples = [train_set[key] for key in batch]
            inputs, targets = torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])
            loss = nn.functional.cross_entropy(trained(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict()


# usage: ddp_training.py OUT_DIR SEED...; writes OUT_DIR/seed-SEED-world-W.pt
rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
if world_size > 1:
    dist.init_process_group("gloo")
for seed in sys.argv[2:]:
    state = train(int(seed), rank, world_size)
    if rank == 0:
        torch.save(state, f"{sys.argv[1]}/seed-{seed}-world-{world_size}.pt")
if world_size > 1:
    dist.destroy_process_group()
    # DistributedDataParallel keeps the group, and gloo's worker threads, alive past
    # destroy_process_group. A worker that lets go of a finished collective's tensors while
    # the interpreter shuts down must take the GIL, is ended by Python for it, and aborts
    # the process ("terminate called without an active exception"). Skip that shutdown.
    sys.stdout.flush()
    os._exit(0)
"""

# Summation order differs between one process and an all-reduce of two: for this
# BatchNorm-free net they agree within this tolerance (bitwise they do not; with
# BatchNorm they differ more, README: Guarantees); another seed is far outside it.
WORLD_SIZE_TOLERANCE = 1e-4


def _max_abs_difference(path_a: Path, path_b: Path) -> float:
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.slow  # 18 s: it measures a tolerance; the same samples at any world size is tested in make test
def test_weights_agree_within_tolerance_across_world_sizes(tmp_path):
    script = tmp_path / "ddp_training.py"
    script.write_text(DDP_TRAINING)
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    for command in (
        [*torchrun, str(script), str(tmp_path), "2333"],
        [sys.executable, str(script), str(tmp_path), "2333", "7"],
    ):
        result = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, output(result)[-3000:]
    one, two, other_seed = (
        tmp_path / name for name in ("seed-2333-world-1.pt", "seed-2333-world-2.pt", "seed-7-world-1.pt")
    )
    assert _max_abs_difference(one, two) < WORLD_SIZE_TOLERANCE
    assert _max_abs_difference(one, other_seed) > WORLD_SIZE_TOLERANCE


# --------------------------------------------------------------------------- compare


def test_compare_lists_the_weights_and_metrics_of_another_seed(reference_run, tmp_path):
    train_ok(tmp_path / "seed1", "--seed", "1")
    report = compare_runs(reference_run, tmp_path / "seed1")
    text = "\n".join(report.lines)
    assert report.status == DIFFERENT
    assert report.lines[0].startswith("runs differ in: weights, metrics, config, manifest")
    assert "max abs difference" in text  # a tensor of model.safetensors, named
    assert "epoch 1: train_loss:" in text
    assert "seed: 2333 -> 1" in text
    assert "images_per_s" not in text and "elapsed_s" not in text


def test_compare_refuses_a_missing_run_folder(tmp_path):
    with pytest.raises(CommandError, match=r"run folder not found: .*missing$"):
        compare_runs(tmp_path / "missing", tmp_path)
    with pytest.raises(CommandError, match=r"manifest.json not found \(is the run finished\?\)"):
        compare_runs(tmp_path, tmp_path)


# --------------------------------------------------------------------------- reproduce


@pytest.fixture(scope="module")
def reproduction(reference_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path]:
    """The reproduction of the reference run: its report, and the new run folder,
    a second train.py run with the same seed and config, started from another folder than the checkout."""
    again = tmp_path_factory.mktemp("reproduce") / "again"
    said, threads = [], torch.get_num_threads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_clean_env(monkeypatch)
        monkeypatch.chdir(again.parent)  # outside the checkout: it runs the script it is given
        # This process's thread count differs from the recorded cpu_threads (1); the re-run's
        # does not, so there is no difference to warn of.
        torch.set_num_threads(2)
        try:
            report = reproduce_run(reference_run / "manifest.json", again, script=TRAIN, say=said.append)
        finally:
            torch.set_num_threads(threads)
    assert not [line for line in said if "torch_threads" in line], said
    return report, again


def test_reproduce_matches_the_recorded_weights(reference_run, reproduction):
    report, again = reproduction
    expected = read_manifest(reference_run)["weights_sha256"]
    assert report.status == SAME, report.lines
    assert report.lines[0] == f"reproduced: weights_sha256 {expected} matches"
    assert read_manifest(again)["weights_sha256"] == expected


# Slow (17 s), for the suite's 10 minutes: reproduce's default path is test_reproduce_matches_the_recorded_weights,
# and data that differs is named by test_checkpoint_hardening's test_resume_refuses_other_data_...
@pytest.mark.slow
def test_reproduce_reports_changed_test_data_that_leaves_the_weights_alone(tmp_path, child_env):
    folder = make_folder(tmp_path / "images", per_class=16)  # 32 training images: one batch of TINY's
    run = tmp_path / "run"
    recorded = train_ok(run, "--dataset", "imagefolder", "--data-dir", str(folder))
    for name in ("0.png", "1.png"):  # two test dogs become cats: the training set, and so the weights, stay
        shutil.copyfile(folder / "test" / "cat" / name, folder / "test" / "dog" / name)
    report = reproduce_run(run, tmp_path / "again", script=TRAIN)
    text = "\n".join(report.lines)
    assert report.status == DIFFERENT, text
    assert report.lines[0] == (
        f"not reproduced: the weights match (weights_sha256 {recorded['weights_sha256']}), "
        "but not the recorded results:"
    )
    assert f"  dataset_sha256: recorded {recorded['dataset_sha256']!r}, reproduced " in text
    assert f"  test_loss: recorded {recorded['test_loss']!r}, reproduced " in text
    assert "the data is not the recorded run's" in text


def test_compare_finds_two_runs_of_one_seed_identical(reference_run, reproduction):
    _, again = reproduction
    ignore_git_moves(reference_run, again)
    report = compare_runs(reference_run, again)
    assert report.status == SAME, report.lines
    assert report.lines[0].startswith("runs are identical")


# A training script of the user's own, quick: its weights depend on the seed alone, and its
# manifest records the environment fingerprint of the process that ran it.
FINGERPRINTING_SCRIPT = """
import json, sys
from pathlib import Path
import torch, yaml
from safetensors.torch import save_file
from repro.fingerprint import environment_fingerprint
from repro.weights import state_dict_sha256
config = yaml.safe_load(Path(sys.argv[2]).read_text())
run = Path(config["output_dir"])
run.mkdir(parents=True)
torch.manual_seed(config["seed"])
weights = torch.nn.Linear(4, 2).state_dict()
save_file(weights, run / "model.safetensors")
(run / "config.yaml").write_text(yaml.safe_dump(config))
(run / "metrics.jsonl").write_text("")
manifest = {
    "weights_sha256": state_dict_sha256(weights),
    "config": config,
    "environment": environment_fingerprint(1, Path(__file__).parent),
}
(run / "manifest.json").write_text(json.dumps(manifest))
"""
CPU_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


# Slow (12 s), for the suite's 10 minutes: test_library's fingerprint test records a lowered instruction set
# and names it among the differences, which compare and reproduce print.
@pytest.mark.slow
def test_compare_and_reproduce_name_a_lowered_cpu_instruction_set_as_an_environment_difference(
    tmp_path, child_env, monkeypatch
):
    # ATEN_CPU_CAPABILITY=default makes torch run other CPU kernels (other weights) on the same machine.
    for name in CPU_ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    script = tmp_path / "mine.py"
    script.write_text(FINGERPRINTING_SCRIPT)
    for name, extra in (("plain", {}), ("lowered", {"ATEN_CPU_CAPABILITY": "default"})):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"seed: 7\noutput_dir: {tmp_path / name}\n")
        command = [sys.executable, str(script), "--config", str(config)]
        subprocess.run(command, env={**os.environ, **extra}, check=True, timeout=120)
    here = torch.backends.cpu.get_cpu_capability()
    lowered = ["cpu_isa_variables: {'ATEN_CPU_CAPABILITY': 'default'} -> {}"]
    if here != "DEFAULT":  # a machine whose best is the default shows the variable only
        lowered.insert(0, f"cpu_capability: 'DEFAULT' -> {here!r}")

    report = compare_runs(tmp_path / "lowered", tmp_path / "plain")
    assert report.status == DIFFERENT, report.lines
    assert report.lines[1:] == ["environment:", *("  " + line for line in lowered)]

    said = []
    report = reproduce_run(tmp_path / "lowered", tmp_path / "again", script=script, say=said.append)
    assert report.status == SAME, report.lines  # the script's weights do not depend on the kernels
    warning = "warning: environment differs, bitwise equality is not promised: "
    assert [line for line in said if line.startswith(warning)] == [warning + line for line in lowered]


def test_reproduce_refuses_a_missing_script_in_one_line(reference_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the checkout there is no ./train.py, the default script
    for arguments in ([], ["--script", str(tmp_path / "mine.py")]):
        assert main(["reproduce", str(reference_run), *arguments]) == ERROR
        captured = capsys.readouterr()
        script = arguments[-1] if arguments else "train.py"
        assert captured.out == "" and captured.err == (
            f"python -m repro reproduce: error: training script {script} not found; "
            "name the run's script with --script PATH\n"
        )


def test_verify_refuses_a_trace_folder_that_is_a_file_in_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "run-1").write_text("")
    for trace_dir, named in (
        (tmp_path / "a-file", tmp_path / "a-file"),
        (tmp_path / "traces", tmp_path / "traces" / "run-1"),
    ):
        assert main(["verify", "--trace-dir", str(trace_dir), "--", sys.executable, "-c", "pass"]) == ERROR
        captured = capsys.readouterr()
        assert captured.err == (
            f"python -m repro verify: error: trace folder {named} is a file; choose a new --trace-dir\n"
        )


@pytest.mark.parametrize("hostile", ["shell-syntax-values", "unknown-config-key"])
def test_reproduce_never_executes_what_the_manifest_names(reference_run, tmp_path, child_env, capfd, hostile):
    marker = tmp_path / "MARKER"
    manifest = read_manifest(reference_run)
    manifest["command"] = f"touch {marker}"
    manifest["train_script"] = "/bin/sh"
    manifest["config"]["output_dir"] = f"x; touch {marker}"
    if hostile == "shell-syntax-values":
        # An image folder is read from data_dir: train.py must see the string as a path.
        manifest["config"].update(dataset="imagefolder", data_dir=f"$(touch {marker})")
        expected_error = f"image folder $(touch {marker}) does not exist"
    else:
        manifest["config"]["command"] = f"touch {marker}"
        expected_error = "unknown config key 'command'"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    report = reproduce_run(path, tmp_path / "again")
    assert not marker.exists()
    assert report.status == ERROR, report.lines
    assert expected_error in capfd.readouterr().err  # train.py's own error, surfaced


# --------------------------------------------------------------------------- env


def test_env_reports_the_fingerprint_and_the_hash_seed():
    result = repro_cli("env", "--json", PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    assert result.returncode == 0, output(result)
    facts = json.loads(result.stdout)
    assert facts["environment"]["torch"] == torch.__version__
    assert facts["python_hash_seed_fixed"] is True
    assert facts["cublas_workspace_config"] == ":4096:8"
    assert "deterministic_algorithms" in facts["determinism"]


@pytest.mark.parametrize("kind", ["broken line", "endless file"])
def test_a_trace_that_is_not_json_lines_is_refused_with_its_name(tmp_path, kind):
    trace = tmp_path / "rank-0.jsonl"
    if kind == "broken line":
        trace.write_text('{"step": 1}\n{"step": 2\n')
    else:  # read with a bound, or refused: never read forever
        trace.symlink_to("/dev/zero")
    with pytest.raises(CommandError, match=r"not a valid trace: .*rank-0\.jsonl"):
        read_trace(tmp_path)
