"""train.py end to end: run folder, bitwise repeatability, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    read_manifest,
    read_metrics,
    run_train,
    train_ok,
    without_timing,
)
from safetensors.torch import load_file

from cifar.models import build_model
from repro.weights import state_dict_sha256


def test_run_folder_holds_config_metrics_manifest_and_weights(reference_run):
    for name in ("config.yaml", "metrics.jsonl", "manifest.json", "model.safetensors"):
        assert (reference_run / name).is_file(), name
    manifest = read_manifest(reference_run)
    for key in ("seed", "world_size", "test_accuracy", "weights_sha256"):
        assert key in manifest
    for package in ("python", "torch", "torchvision", "accelerate", "numpy"):
        assert manifest["environment"][package]
    metrics = read_metrics(reference_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("step", "train_loss", "test_accuracy", "lr", "images_per_s", "train_s", "eval_s", "elapsed_s"):
        assert key in metrics[-1]
    assert manifest["python_hash_seed"] == "0"
    assert manifest["determinism"]["mode"] == "strict"
    assert manifest["determinism"]["fill_uninitialized_memory"] is False


def test_weights_sha256_is_the_hash_of_the_saved_weights(reference_run):
    # safetensors sorts keys on save; the manifest hashes the model's own key order.

    order = list(build_model("small_cnn", 10).state_dict())
    saved = load_file(reference_run / "model.safetensors")
    assert state_dict_sha256({name: saved[name] for name in order}) == read_manifest(reference_run)["weights_sha256"]


def test_same_seed_same_weights_and_metrics(reference_run, tmp_path):
    manifest = train_ok(tmp_path / "again")
    assert manifest["weights_sha256"] == read_manifest(reference_run)["weights_sha256"]
    assert without_timing(read_metrics(tmp_path / "again")) == without_timing(read_metrics(reference_run))


def test_different_seed_different_weights(reference_run, tmp_path):
    manifest = train_ok(tmp_path / "other", "--seed", "2334")
    assert manifest["weights_sha256"] != read_manifest(reference_run)["weights_sha256"]


def test_max_steps_stops_and_writes_the_run(tmp_path):
    manifest = train_ok(tmp_path / "short", "--max-steps", "3")
    assert read_metrics(tmp_path / "short")[-1]["step"] == 3
    assert len(manifest["weights_sha256"]) == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be in [0, 4294967295]"),
        (["--seed", str(2**32)], "seed must be in [0, 4294967295]"),
        (["--seed", "1.5"], "'seed' must be int"),
        (["--seed", "abc"], "'seed' must be int"),
        (["--config", "no/such/file.yaml"], "config file not found: no/such/file.yaml"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
        (
            ["--model", "vgg"],
            "'model' must be one of small_cnn, small_cnn_dropout, resnet18, resnet9, speedrun, got 'vgg'",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("train.py: error: ") and result.stderr.count("\n") == 1  # one line, no traceback
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_and_mistyped_yaml_keys_are_named(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochz: 3\n")
    result = run_train(*TINY, "--config", str(typo))
    assert result.returncode == 2 and "unknown config key 'epochz'" in result.stderr
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text("epochs: three\n")
    result = run_train(*TINY, "--config", str(mistyped))
    assert result.returncode == 2 and "'epochs' must be int" in result.stderr


def test_output_folder_of_another_run_is_refused_unless_overwrite(reference_run):
    before = (reference_run / "manifest.json").read_bytes()
    result = run_train(*TINY, "--output-dir", str(reference_run), "--seed", "7")
    assert result.returncode == 2
    assert "holds a different run (seed: 2333 -> 7)" in result.stderr
    assert (reference_run / "manifest.json").read_bytes() == before


def test_import_repro_needs_neither_accelerate_nor_torchvision_nor_the_pipeline():
    blocked = ("accelerate", "torchvision", "cifar", "train")  # repro is a library: cifar/ and train.py use it
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "import repro, importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(repro.__path__): importlib.import_module('repro.' + m.name)\n"
        "print(sorted(repro.__all__)[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # each stream's derivation is tested in process in test_seeds.py
def test_stream_overrides_reach_the_streams_they_name(reference_run, tmp_path):
    # The shipped models draw nothing at run time (no dropout), so a run whose model, order and
    # augmentation streams all come from 2333 equals the seed-2333 run, whatever its own seed.
    overrides = ["--model-seed", "2333", "--order-seed", "2333", "--aug-seed", "2333"]
    manifest = train_ok(tmp_path / "overridden", "--seed", "7", *overrides)
    assert manifest["weights_sha256"] == read_manifest(reference_run)["weights_sha256"]
    manifest = train_ok(tmp_path / "order_only", "--order-seed", "0")
    assert manifest["weights_sha256"] != read_manifest(reference_run)["weights_sha256"]


def test_half_configured_launcher_environment_is_a_usage_error(tmp_path):
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), env=clean_env(WORLD_SIZE="2", RANK="0"))
    assert result.returncode == 2
    assert "cannot form the process group" in result.stderr and "MASTER_ADDR" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_records_the_commit_it_started_from_though_the_checkout_moves_on(tmp_path):
    # A checkout of the code, committed to while a run from it trains: the run's checkpoints and
    # manifest name the commit of the code it loaded, not whatever the checkout holds at each write.
    checkout, run_dir = tmp_path / "checkout", tmp_path / "run"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True, timeout=60)
    git = ["git", "-C", str(checkout), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    started_from = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    command = [
        sys.executable,
        str(checkout / "train.py"),
        *TINY,
        "--checkpoint-every",
        "1",
        "--output-dir",
        str(run_dir),
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while not (run_dir / "checkpoints" / "step-00000002").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "moved on"], check=True, timeout=60)
    assert process.poll() is None  # the run was still training when its checkout moved on
    assert process.wait(timeout=240) == 0, process.stderr.read()[-3000:]
    recorded = [read_manifest(run_dir)["environment"]["git_commit"]]
    recorded += [
        json.loads(path.read_text())["environment"]["git_commit"] for path in run_dir.glob("checkpoints/*/state.json")
    ]
    assert len(recorded) >= 3 and set(recorded) == {started_from.strip()}


def test_a_launcher_variable_that_is_not_an_integer_stops_with_one_line(tmp_path):
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), env=clean_env(RANK="abc", WORLD_SIZE="1"))
    assert_one_line_error(result, "RANK must be an integer, got 'abc'")
