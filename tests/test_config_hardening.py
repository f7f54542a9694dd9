"""Hostile and mistaken inputs to the config layer: each is refused with one line, exit status 2,
or, where it is a setting that changes the result, recorded and independent of the launcher."""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, assert_one_line_error, clean_env, make_folder, read_manifest, run_train, train_ok
from test_pipeline import IMAGEFOLDER

from cifar.config import ConfigError, load_yaml, parse_config

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def write_config(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "config.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


# --- Numbers are plain decimals, on the command line and in a file ----------------------------


def test_flag_integer_with_a_leading_zero_is_decimal():
    assert parse_config(["--seed", "010"]).seed == 10  # YAML 1.1 read it as octal: seed 8


@pytest.mark.parametrize("text", ["0x10", "1:30", "1_0", "0b1", "0o10"])
def test_flag_integers_in_other_notations_are_refused(text):
    with pytest.raises(ConfigError, match=r"'seed' must be int \(in plain decimal\)"):
        parse_config(["--seed", text])


@pytest.mark.parametrize("text", ["1:30.5", "1_0.5", " 0.5"])
def test_flag_floats_in_other_notations_are_refused(text):
    with pytest.raises(ConfigError, match=r"'lr' must be float \(in plain decimal\)"):
        parse_config(["--lr", text])


def test_yaml_integers_are_decimal_and_other_notations_refused(tmp_path):
    assert parse_config(["--config", write_config(tmp_path, "seed: 010\n")]).seed == 10
    for text in ("0x10", "1:30", "1_000", "0b11"):
        with pytest.raises(ConfigError, match=f"line 1: '{text}' is not a plain decimal integer"):
            parse_config(["--config", write_config(tmp_path, f"seed: {text}\n")])
    with pytest.raises(ConfigError, match=re.escape("line 2: '1:30.5' is not a plain decimal number")):
        parse_config(["--config", write_config(tmp_path, "seed: 1\nlr: 1:30.5\n")])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="line 3: duplicate key 'seed'"):
        load_yaml(write_config(tmp_path, "seed: 1\nepochs: 2\nseed: 2\n"))


# --- Settings out of range or not finite -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number, got nan"),
        (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number, got inf"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
        (["--momentum", "-5"], "momentum must be in (0, 1), got -5.0"),
        (["--momentum", "0"], "momentum must be in (0, 1), got 0.0"),
        (["--momentum", "1"], "momentum must be in (0, 1), got 1.0"),
        (["--cpu-threads", "0"], "cpu_threads must be in [1, 1024], got 0"),
        (["--cpu-threads", "1000000"], "cpu_threads must be in [1, 1024], got 1000000"),
        (["--data-cache", " "], "data_cache must be auto, none or a folder, got an empty value"),
        (
            ["--data-cache", "~no-such-user-here/cache"],
            "data_cache '~no-such-user-here/cache': Could not determine home directory; give a folder, or none",
        ),
        (
            ["--dataset", "synthetic", "--synthetic-train-size", "256", "--batch-size", "257"],
            "batch_size 257 is larger than the training set (256 synthetic images)",
        ),
        (["--warmup-epochs", "1e308"], "warmup_epochs must be at most 1000000, got 1e+308"),
        (["--crop-padding", "32"], "crop_padding must be under the 32-pixel image side, got 32"),
        (["--crop-padding", "1000000000"], "crop_padding must be under the 32-pixel image side, got 1000000000"),
        (
            ["--synthetic-train-size", "1000000000000"],
            "synthetic_train_size must be at most 1000000, got 1000000000000",
        ),
        (["--output-dir", ""], "output_dir is empty (an unset shell variable?); leave it out for the default"),
        (["--resume", " "], "resume is empty (an unset shell variable?); leave it out for the default"),
        (["--data-dir", ""], "data_dir is empty (an unset shell variable?); leave it out for the default"),
    ],
)
def test_settings_out_of_range_are_refused(args, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(args)
    assert str(raised.value) == message


def test_non_finite_yaml_floats_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing must be a finite number, got -inf"):
        parse_config(["--config", write_config(tmp_path, "label_smoothing: -.inf\n")])
    with pytest.raises(ConfigError, match="warmup_epochs must be a finite number, got nan"):
        parse_config(["--config", write_config(tmp_path, "warmup_epochs: .nan\n")])


def test_nan_flag_exits_2_with_one_line(tmp_path):
    # The spelling; the config error path to exit 2 is the same for every refusal above.
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), "--warmup-epochs", ".nan")
    assert_one_line_error(result, "'warmup_epochs' must be float (in plain decimal), got '.nan'")
    assert not (tmp_path / "run").exists()


def test_an_empty_output_dir_with_overwrite_keeps_the_default_run(tmp_path):
    # `--output-dir "$OUT"` with OUT unset: it once meant the default folder, which --overwrite replaced.
    default_run = tmp_path / "runs" / "synthetic-small_cnn-seed2333"
    default_run.mkdir(parents=True)
    (default_run / "model.safetensors").write_bytes(b"the earlier run's weights")
    command = [sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", "", "--overwrite"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert_one_line_error(result, "output_dir is empty (an unset shell variable?); leave it out for the default")
    assert (default_run / "model.safetensors").read_bytes() == b"the earlier run's weights"
    with pytest.raises(ConfigError, match=re.escape("output_dir is empty (an unset shell variable?)")):
        parse_config(["--config", write_config(tmp_path, "output_dir: ''\n")])


def test_batch_larger_than_an_image_folder_exits_2_with_one_line(tmp_path):
    data = make_folder(tmp_path / "data")  # 16 training images
    result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--batch-size", "32", "--output-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "--batch-size 32 is larger than the training set (16 images)")
    assert not (tmp_path / "r" / "checkpoints").exists()


# --- Config files that are not what a config is ------------------------------------------------


def alias_bomb() -> str:
    """One key whose value nests nine levels of nine aliases: about 300 bytes that expand to 9**9 strings."""
    levels = [f"&a [{','.join(['x'] * 9)}]"]
    levels += [f"&{name} [{','.join(['*' + below] * 9)}]" for below, name in itertools.pairwise("abcdefghi")]
    return f"seed: [{', '.join(levels)}]\n"


def test_alias_bomb_is_refused_at_once(tmp_path):
    path = write_config(tmp_path, alias_bomb())
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="line 1: the value of 'seed' must be one plain value"):
        load_yaml(path)
    assert time.perf_counter() - start < 0.5


def test_alias_bomb_exits_2_with_one_short_line(tmp_path):
    # Before the fix: 20 s, 2.8 GB and a 722 MB error line (issue 11), or the timeout on a busy machine.
    result = run_train(*TINY, "--config", write_config(tmp_path, alias_bomb()), timeout=60)
    assert_one_line_error(result, "line 1: the value of 'seed' must be one plain value, not a list or mapping")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("seed: [1, 2]\n", "line 1: the value of 'seed' must be one plain value, not a list or mapping"),
        ("epochs: 2\nseed: {a: 1}\n", "line 2: the value of 'seed' must be one plain value, not a list or mapping"),
        ("seed: 1\nepochs: &n 2\n", "line 2: anchors and aliases (&name, *name) are not allowed"),
        # Nesting is refused before the loader recurses into it: no RecursionError.
        ("seed: " + "[" * 100_000 + "\n", "line 1: the value of 'seed' must be one plain value"),
    ],
)
def test_config_files_must_be_flat_mappings_of_plain_values(tmp_path, content, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml(write_config(tmp_path, content))


def test_config_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = write_config(tmp_path, "# " + "x" * (1 << 20) + "\nseed: 1\n")
    with pytest.raises(ConfigError, match="is larger than 1048576 bytes"):
        load_yaml(path)


def test_refused_values_are_cut_short_in_the_message(tmp_path):
    path = write_config(tmp_path, "model: " + "v" * 100_000 + "\n")
    with pytest.raises(ConfigError) as raised:
        parse_config(["--config", path])
    assert "'model' must be one of" in str(raised.value) and len(str(raised.value)) < 200
    with pytest.raises(ConfigError) as raised:
        parse_config(["--seed", "9" * 5000])
    assert len(str(raised.value)) < 200


def test_config_file_not_utf8_exits_2_with_one_line(tmp_path):
    path = write_config(tmp_path, "seed: 1\n# caf\xe9\n".encode("latin-1"))
    result = run_train(*TINY, "--config", path, "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "is not UTF-8 text (byte 13: 0xe9)")


# --- Mixed precision: auto by default, resolved, and recorded as what ran ----------------------


def test_mixed_precision_resolution():
    from cifar.config import resolve_mixed_precision

    assert resolve_mixed_precision("auto", cuda=False, native_bf16=False) == "no"
    assert resolve_mixed_precision("auto", cuda=True, native_bf16=True) == "bf16"
    assert resolve_mixed_precision("auto", cuda=True, native_bf16=False) == "no"
    assert resolve_mixed_precision("bf16", cuda=False, native_bf16=False) == "bf16"
    assert resolve_mixed_precision("fp16", cuda=True, native_bf16=True) == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_mixed_precision("fp16", cuda=False, native_bf16=False)


def test_fp16_on_the_cpu_exits_2_with_one_line(tmp_path):
    # accelerate trained this run in fp32 while it recorded fp16.
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), "--mixed-precision", "fp16")
    assert_one_line_error(result, "mixed_precision fp16 needs CUDA")
    assert not (tmp_path / "run").exists()


def test_manifest_records_the_precision_that_ran(reference_run, tmp_path):
    reference = read_manifest(reference_run)
    assert reference["config"]["mixed_precision"] == "auto"  # as given: resume compares configs
    assert reference["mixed_precision"] == "no"  # auto on the CPU
    bf16 = train_ok(tmp_path / "bf16", "--mixed-precision", "bf16")
    assert bf16["mixed_precision"] == "bf16"
    # bf16 autocast really runs on the CPU, so it stays allowed there.
    assert bf16["weights_sha256"] != reference["weights_sha256"]


# --- CPU threads: a setting, so the launcher does not change the weights -----------------------


def test_python_and_accelerate_launch_give_the_same_weights(tmp_path):
    # No OMP_NUM_THREADS: python takes a thread per core, accelerate launch sets one.
    env = {key: value for key, value in clean_env().items() if key != "OMP_NUM_THREADS"}
    args = [*TINY, "--max-steps", "4"]
    direct = train_ok(tmp_path / "python", "--max-steps", "4", env=env)
    launched = subprocess.run(
        [
            ACCELERATE,
            "launch",
            "--num_processes",
            "1",
            # The launcher's dynamo setting compiled the model unrecorded, under other weight names.
            "--dynamo_backend",
            "aot_eager",
            str(REPO / "train.py"),
            *args,
            "--output-dir",
            str(tmp_path / "a"),
        ],
        cwd=REPO,
        env={**env, "HF_HOME": str(tmp_path / "hf")},  # no default accelerate config of this machine's user
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "ACCELERATE_DYNAMO_BACKEND=AOT_EAGER ignored: train.py compiles the model itself" in launched.stdout
    accelerated = read_manifest(tmp_path / "a")
    assert direct["weights_sha256"] == accelerated["weights_sha256"]
    for manifest in (direct, accelerated):
        assert manifest["config"]["cpu_threads"] == manifest["environment"]["torch_threads"] == 1


def ctrl_c_as_in_a_terminal() -> None:
    """In the child, before exec: SIGINT unblocked and at its default, as a shell starts a program.
    Both are inherited through exec, and a test runner's process may hold either otherwise: Python
    then never turns Ctrl-C into KeyboardInterrupt (a run of the suite once waited here 60 s)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_before_training_is_one_line_and_exit_130(tmp_path):
    # The config is a FIFO: train.py blocks reading it, inside main(), until Ctrl-C comes.
    config = tmp_path / "config.yaml"
    os.mkfifo(config)
    run_dir = tmp_path / "r"
    command = [sys.executable, str(REPO / "train.py"), "--config", str(config), *TINY, "--output-dir", str(run_dir)]
    process = subprocess.Popen(
        command,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    deadline = time.monotonic() + 120
    while True:
        try:  # succeeds once train.py has the FIFO open for reading, after its imports
            writer = os.open(config, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            assert error.errno == errno.ENXIO and time.monotonic() < deadline, error
            time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    # End of file at once: when a thread other than the main one takes the signal, the main thread
    # stays blocked in read() and Python runs its handler only once the read returns (twice in CI,
    # train.py waited here until the test's timeout). Without the handler, train.py would train.
    os.close(writer)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.strip()) == (130, "train.py: interrupted")
    assert not run_dir.exists()
