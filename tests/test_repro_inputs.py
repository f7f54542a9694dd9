"""`python -m repro compare` and `reproduce` on run folders that train.py did not write:
each gets a one-line error and exit status 2, never a traceback; and `reproduce`
creates nothing outside its temporary folder, which it removes when interrupted."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, clean_env, make_folder, read_manifest
from safetensors.torch import load_file, save_file

from repro.__main__ import main
from repro.compare import compare_runs
from repro.report import DIFFERENT

RUN_FILES = ("manifest.json", "config.yaml", "metrics.jsonl", "model.safetensors")


def copy_run(source: Path, target: Path) -> Path:
    """The files of a finished run that `compare` reads, copied into ``target``."""
    target.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copyfile(source / name, target / name)
    return target


def edit_manifest(run: Path, **fields: object) -> None:
    manifest = read_manifest(run)
    manifest.update(fields)
    (run / "manifest.json").write_text(json.dumps(manifest))


def other_weights(run: Path, content: bytes) -> Path:
    """Replace ``model.safetensors`` with ``content``; the manifest's digest changes with it,
    so that `compare` reads the file tensor by tensor."""
    edit_manifest(run, weights_sha256="0" * 64)
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").write_bytes(content)
    return run / "model.safetensors"


def without_weights_digest(run: Path) -> None:
    manifest = read_manifest(run)
    del manifest["weights_sha256"]
    (run / "manifest.json").write_text(json.dumps(manifest))


def weights_linked_to_dev_zero(run: Path) -> None:
    other_weights(run, b"").unlink()
    (run / "model.safetensors").symlink_to("/dev/zero")


def nested_json(depth: int) -> str:
    return '{"nested": ' + "[" * depth + "]" * depth + "}"


def yaml_alias_bomb(levels: int) -> str:
    """A YAML document of a few hundred bytes whose aliases expand to 10**levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    return "\n".join(lines) + "\n"


BROKEN_RUNS: dict[str, tuple[Callable[[Path], object], str, str]] = {
    # name: (how run B is broken, what the error says, the file it names)
    "environment-list": (lambda run: edit_manifest(run, environment=["cpu"]), "must be a mapping", "manifest.json"),
    "environment-string": (lambda run: edit_manifest(run, environment="cpu"), "must be a mapping", "manifest.json"),
    "manifest-other-format": (
        lambda run: edit_manifest(run, format="repro.run"),
        "is not a manifest of format 'repro.manifest', but 'repro.run'",
        "manifest.json",
    ),
    "manifest-newer-version": (
        lambda run: edit_manifest(run, version=2),
        "manifest version 2 is not one this repro reads (1 to 1)",
        "manifest.json",
    ),
    "result-neutral-keys-string": (
        lambda run: edit_manifest(run, result_neutral_keys="num_workers"),
        "'result_neutral_keys' must be a list of config key names",
        "manifest.json",
    ),
    "metrics-line-list": (
        lambda run: (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "[1, 2]\n"),
        "line 3 is not a JSON object",
        "metrics.jsonl",
    ),
    "metrics-line-number": (
        lambda run: (run / "metrics.jsonl").write_text("42\n"),
        "line 1 is not a JSON object",
        "metrics.jsonl",
    ),
    "weights-garbage": (
        lambda run: other_weights(run, b"garbage " * 64),
        "not a safetensors file",
        "model.safetensors",
    ),
    "weights-huge-header": (
        lambda run: other_weights(run, struct.pack("<Q", 2**62) + b"{}"),
        "header length (4611686018427387904 bytes) does not fit",
        "model.safetensors",
    ),
    "weights-bad-header": (
        lambda run: other_weights(run, struct.pack("<Q", 5) + b"{{{{{"),
        "not a valid safetensors file",
        "model.safetensors",
    ),
    "weights-symlink": (weights_linked_to_dev_zero, "is a symbolic link", "model.safetensors"),
    "weights-missing": (
        lambda run: (run / "model.safetensors").unlink(),
        "model.safetensors not found: cannot compare the weights",
        "model.safetensors",
    ),
    "config-missing": (
        lambda run: (run / "config.yaml").unlink(),
        "config.yaml not found: compare needs each run folder's manifest.json, config.yaml, metrics.jsonl and ",
        "config.yaml",
    ),
    "metrics-missing": (
        lambda run: (run / "metrics.jsonl").unlink(),
        "metrics.jsonl not found: compare needs",
        "metrics.jsonl",
    ),
    "manifest-without-weights-digest": (
        lambda run: without_weights_digest(run),
        "records no weights_sha256 (is the run finished?): cannot compare the weights",
        "manifest.json",
    ),
    "manifest-not-utf8": (
        lambda run: (run / "manifest.json").write_bytes(b'{"seed": "\xff\xfe"}'),
        "is not UTF-8 text",
        "manifest.json",
    ),
    "config-not-utf8": (
        lambda run: (run / "config.yaml").write_bytes(b"seed: \xe9\n"),
        "is not UTF-8 text",
        "config.yaml",
    ),
    "metrics-not-utf8": (
        lambda run: (run / "metrics.jsonl").write_bytes(b'{"epoch": "\x80"}\n'),
        "is not UTF-8 text",
        "metrics.jsonl",
    ),
    "manifest-nested-too-deep-to-parse": (
        lambda run: (run / "manifest.json").write_text(nested_json(100_000)),
        "nested too deeply",
        "manifest.json",
    ),
    "manifest-nested-deeper-than-a-run": (
        lambda run: (run / "manifest.json").write_text(nested_json(200)),
        "nested more than 32 levels deep",
        "manifest.json",
    ),
    "config-nested-too-deep-to-parse": (
        lambda run: (run / "config.yaml").write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        "nested too deeply",
        "config.yaml",
    ),
    "config-alias-bomb": (
        lambda run: (run / "config.yaml").write_text(yaml_alias_bomb(6)),
        "holds more than 100000 values",
        "config.yaml",
    ),
}


@pytest.mark.parametrize("breakage", list(BROKEN_RUNS))
def test_compare_refuses_a_malformed_run_in_one_line(reference_run, tmp_path, capsys, breakage):
    break_run, message, named = BROKEN_RUNS[breakage]
    run_a, run_b = copy_run(reference_run, tmp_path / "a"), copy_run(reference_run, tmp_path / "b")
    break_run(run_b)
    status = main(["compare", str(run_a), str(run_b)])
    captured = capsys.readouterr()
    assert status == 2, captured.out[-2000:]
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err[-2000:]
    assert captured.err.startswith(f"python -m repro compare: error: {run_b / named}")
    assert message in captured.err


def test_compare_reads_the_weights_files_whatever_the_manifests_say(reference_run, tmp_path):
    run_a, run_b = copy_run(reference_run, tmp_path / "a"), copy_run(reference_run, tmp_path / "b")
    weights = load_file(run_b / "model.safetensors")
    first = next(name for name, tensor in weights.items() if tensor.is_floating_point())
    weights[first] = weights[first] + 0.5
    save_file(weights, run_b / "model.safetensors")
    report = compare_runs(run_a, run_b)  # the manifests record the same weights_sha256
    assert report.status == DIFFERENT, report.lines
    assert report.lines[0].startswith("runs differ in: weights  ")
    assert "a weights file does not match its manifest" in report.lines[2]
    assert f"    {first}: max abs difference 0.5" in report.lines

    shutil.copyfile(run_a / "model.safetensors", run_b / "model.safetensors")
    edit_manifest(run_b, weights_sha256="0" * 64)  # now the files agree and the manifests do not
    report = compare_runs(run_a, run_b)
    assert report.status == DIFFERENT, report.lines
    assert report.lines[2].endswith(" -> " + "0" * 64)
    assert "a manifest's weights_sha256 does not match its weights file" in report.lines[3]


def manifest_with(reference_run: Path, path: Path, **changes: object) -> Path:
    """The reference run's manifest with ``changes`` (``config`` merged key by key), written to ``path``."""
    manifest = read_manifest(reference_run)
    manifest["config"].update(changes.pop("config", {}))
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"environment": ["cpu"]}, "'environment' must be a mapping, got list"),
        ({"environment": "cpu"}, "'environment' must be a mapping, got str"),
        ({"config": {"seed": json.loads(nested_json(40))}}, "nested more than 32 levels deep"),
        (
            {"resumed_in_other_environments": [{"step": "5", "differences": []}]},
            "'resumed_in_other_environments' must be a list of {step, differences} records",
        ),
    ],
)
def test_reproduce_refuses_a_malformed_manifest_in_one_line(reference_run, tmp_path, capsys, changes, message):
    path = manifest_with(reference_run, tmp_path / "manifest.json", **changes)
    status = main(["reproduce", str(path), "--output-dir", str(tmp_path / "again")])
    captured = capsys.readouterr()
    assert status == 2, captured.out[-2000:]
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err[-2000:]
    assert not (tmp_path / "again").exists()


def test_reproduce_refuses_a_non_utf8_manifest_in_one_line(tmp_path, capsys):
    path = tmp_path / "manifest.json"
    path.write_bytes(b'{"weights_sha256": "\xff"}')
    assert main(["reproduce", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"python -m repro reproduce: error: {path} is not UTF-8 text") and error.count("\n") == 1


def test_reproduce_creates_no_data_folder_a_manifest_names(reference_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    # train.py would create this folder to download CIFAR-10 into.
    config = {"dataset": "cifar10", "data_dir": str(elsewhere / "data")}
    path = manifest_with(reference_run, tmp_path / "manifest.json", config=config)
    status = main(["reproduce", str(path), "--output-dir", str(tmp_path / "again")])
    error = capsys.readouterr().err
    assert not elsewhere.exists()
    assert not (tmp_path / "again").exists()
    assert status == 2, error[-2000:]
    assert error.count("\n") == 1 and f"data_dir '{elsewhere / 'data'}' is not a folder here" in error


def test_reproduce_writes_no_data_cache_a_manifest_names(reference_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    folder = make_folder(tmp_path / "images", per_class=16)  # 32 training images: the reference's batch
    config = {"dataset": "imagefolder", "data_dir": str(folder), "data_cache": str(elsewhere / "cache")}
    path = manifest_with(reference_run, tmp_path / "manifest.json", config=config)
    status = main(["reproduce", str(path), "--output-dir", str(tmp_path / "again")])
    assert status == 1, capsys.readouterr().err[-2000:]  # trained, on other data than the reference's
    assert read_manifest(tmp_path / "again")["config"]["data_cache"] == "none"
    assert not elsewhere.exists()


# A training script of the user's own: its config has none of train.py's keys, no data_dir among them.
FOREIGN_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
import yaml
config = yaml.safe_load(Path(sys.argv[2]).read_text())
run = Path(config["output_dir"])
run.mkdir(parents=True)
if config["write_manifest"]:
    digest = hashlib.sha256(str(config["seed"]).encode()).hexdigest()
    (run / "manifest.json").write_text(json.dumps({"weights_sha256": digest, "config": config}))
"""


def test_reproduce_reruns_a_script_whose_config_names_no_data_dir_and_says_when_it_writes_no_manifest(tmp_path, capsys):
    script = tmp_path / "foreign.py"
    script.write_text(FOREIGN_SCRIPT)
    config = tmp_path / "config.yaml"
    config.write_text(f"seed: 7\nwrite_manifest: true\noutput_dir: {tmp_path / 'run'}\n")
    subprocess.run([sys.executable, str(script), "--config", str(config)], check=True, timeout=60)
    assert main(["reproduce", str(tmp_path / "run"), "--script", str(script)]) == 0, capsys.readouterr().err
    assert "reproduced: weights_sha256" in capsys.readouterr().out
    # The same run, re-run by a script that writes no manifest: the error says so, naming no temporary folder.
    edit_manifest(tmp_path / "run", config={"seed": 7, "write_manifest": False, "output_dir": "run"})
    assert main(["reproduce", str(tmp_path / "run"), "--script", str(script)]) == 2
    assert capsys.readouterr().out.splitlines()[-1] == (
        "could not reproduce: foreign.py exited with status 0 but wrote no manifest: "
        "reproduce reads output_dir/manifest.json, in the run folder its config's output_dir names"
    )


# SIGINT takes the same path as SIGTERM: it runs with the slow tests, to keep `make test` under 10 minutes.
@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_reproduce_stopped_while_training_removes_its_temporary_folder(reference_run, tmp_path, stop):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    # Long enough to be stopped while it trains: 50 epochs, a checkpoint after every step.
    path = manifest_with(reference_run, tmp_path / "manifest.json", config={"epochs": 50, "checkpoint_every": 1})
    log = tmp_path / "reproduce.log"
    with log.open("w") as output:
        reproduce = subprocess.Popen(
            [sys.executable, "-m", "repro", "reproduce", str(path)],
            cwd=REPO,
            env=clean_env(TMPDIR=str(temporary)),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    trainers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not list(temporary.glob("repro-reproduce-*/**/checkpoints/step-*")):
            assert reproduce.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the re-run wrote no checkpoint"
            time.sleep(0.1)
        trainers = psutil.Process(reproduce.pid).children(recursive=True)
        reproduce.send_signal(stop)  # to `python -m repro` alone, not to train.py
        reproduce.wait(timeout=60)
        text = log.read_text()
        assert reproduce.returncode == 128 + stop, text[-3000:]
        assert "Traceback" not in text
        _, alive = psutil.wait_procs(trainers, timeout=30)
        assert alive == [], "train.py still runs after reproduce stopped"
        assert list(temporary.glob("repro-*")) == []  # torch keeps a cache of its own there
    finally:
        reproduce.kill()  # a no-op once it has exited
        for process in trainers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
