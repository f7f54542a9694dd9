"""Re-running a finished run from its manifest: ``python -m repro reproduce RUN [--script PATH]``.

:func:`reproduce_run` re-runs a run with its recorded config and checks that the
weights come out the same. The training script is a parameter (default
``train.py`` in the current folder), so the check works wherever ``repro`` is
installed; the manifest never chooses what runs: it is data, and none of its
values is ever executed or passed to a shell.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from repro.files import read_json_object, read_yaml_mapping
from repro.fingerprint import compare_fingerprints, environment_fingerprint
from repro.manifest import CONFIG_FILE, MANIFEST_FILE, read_manifest, resumed_elsewhere_warnings
from repro.report import DIFFERENT, ERROR, SAME, CommandError, Report, same_number, short, silent
from repro.trace import TRACE_DIR_VARIABLE, TRACE_STEPS_VARIABLE

# The training script reproduce runs when none is named: this project's, from its checkout.
DEFAULT_SCRIPT = Path("train.py")

# The datasets for which train.py creates nothing: for CIFAR, it creates data_dir to download into.
DATASETS_READ_IN_PLACE = frozenset({"synthetic", "imagefolder"})
THREADS_KEY = "torch_threads"  # the environment fingerprint's: set by the script, not by reproduce
# The manifest fields, besides weights_sha256, that a faithful re-run records the same: the data it
# trained and was tested on, how far it trained, and its results. Checked when the recorded manifest has them.
RESULT_FIELDS = ("dataset_sha256", "step", "test_accuracy", "test_loss", "test_images")


def reproduce_run(
    manifest_path: Path,
    output_dir: Path | None = None,
    *,
    script: Path | str = DEFAULT_SCRIPT,
    say: Callable[[str], None] = silent,
) -> Report:
    """Re-run a finished run from its recorded config and check its weights.

    The resolved config comes from the manifest's ``config`` field (or the run
    folder's ``config.yaml``), with ``output_dir`` set to a fresh folder
    (``output_dir``, or ``run`` in a new temporary folder), ``overwrite`` false
    and ``resume`` none. It is written to a YAML file in that temporary folder
    and passed with ``--config`` to ``script``, the training script (``train.py``
    in the current folder unless named), run by this interpreter; the script
    validates every key. The manifest is data: none of
    its values is ever executed, or passed to a shell.

    Nothing is created outside the temporary folder and ``output_dir``: a
    ``data_dir`` that train.py would create (to download CIFAR into) must exist
    already (a config with no ``data_dir`` key is not checked), and a
    ``data_cache`` (train.py's decoded image folders) is set to ``none``. The
    script must write ``manifest.json`` with ``weights_sha256`` into the config's
    ``output_dir``; one that writes none is an ``ERROR``, saying so. The
    temporary folder is removed when the re-run fails or is interrupted (by an
    exception, ``KeyboardInterrupt`` included; ``python -m repro`` turns SIGTERM
    into one), and kept when it holds a finished re-run.

    Once the manifest is read, ``say`` receives one warning per resume under
    another environment that it records (the run's weights come from more than
    one); before the run, one per difference between the recorded environment
    and this one, and after it one for a thread count the re-run recorded other
    than the recorded one (the script sets its own): with any, bitwise equality
    is not promised.

    Returns ``SAME`` when the new ``weights_sha256`` matches the recorded one
    and so does each of ``RESULT_FIELDS`` the manifest records (the dataset's
    SHA-256, the step count, the test results: the same weights on changed
    test data are not the same result), ``DIFFERENT`` naming each that does
    not, ``ERROR`` when the script fails (its own error is printed above the report).

    Raises:
        CommandError: the manifest is missing or malformed, the script does not
            exist, or the re-run could not start (see above).
    """
    import yaml

    path = Path(manifest_path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    manifest = read_manifest(path)
    config = manifest.get("config")
    if config is None:
        config = read_yaml_mapping(path.parent / CONFIG_FILE)
    recorded = manifest.get("weights_sha256")
    if not isinstance(recorded, str):
        raise CommandError(f"{path} records no weights_sha256 (is the run finished?)")
    world_size = manifest.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CommandError(f"{path}: world_size must be a positive integer, got {world_size!r}")
    environment = manifest.get("environment") or {}
    # A fact of the recorded run, whatever happens to this re-run: said first.
    resumed_elsewhere = resumed_elsewhere_warnings(manifest)
    for warning in resumed_elsewhere:
        say(warning)
    script = Path(script)
    if not script.is_file():
        raise CommandError(f"training script {script} not found; name the run's script with --script PATH")
    _check_data_dir(config, path)
    chosen = Path(output_dir) if output_dir is not None else None
    if chosen is not None and chosen.exists() and (not chosen.is_dir() or any(chosen.iterdir())):
        raise CommandError(f"output folder {chosen} is not empty; choose a new one")

    here = environment_fingerprint(world_size, script.resolve().parent)
    # The script sets its own thread count (train.py: its cpu_threads), not this process's:
    # the re-run's manifest says what it ran with, checked below.
    here[THREADS_KEY] = environment.get(THREADS_KEY)
    warnings = [
        f"warning: environment differs, bitwise equality is not promised: {difference}"
        for difference in compare_fingerprints(environment, here)
    ]
    if world_size != 1:
        warnings.append(
            f"warning: the run used {world_size} processes and this re-run uses one: the same samples per step, "
            "but other weights (summation order; per-process BatchNorm unless sync_bn), so weights_sha256 will differ"
        )
    for warning in warnings:
        say(warning)

    # A trace request exported in this shell would cut the re-run short.
    env = {key: value for key, value in os.environ.items() if key not in (TRACE_DIR_VARIABLE, TRACE_STEPS_VARIABLE)}
    scratch = Path(tempfile.mkdtemp(prefix="repro-reproduce-"))
    output = chosen or scratch / "run"
    config_file = scratch / "config.yaml"
    keep_scratch = False
    try:
        rerun_config = {**config, "output_dir": str(output), "overwrite": False, "resume": None}
        if "data_cache" in config:  # train.py's cache of decoded images: a folder of the recording machine's
            rerun_config["data_cache"] = "none"
        config_file.write_text(yaml.safe_dump(rerun_config, sort_keys=False))
        command = [sys.executable, str(script), "--config", str(config_file)]
        say(f"re-running {path} into {output}: {shlex.join(command)}")
        # The re-run's output goes straight to this terminal: it may train for hours.
        status = subprocess.run(command, env=env).returncode
        if status != 0:
            return Report(
                ERROR, [f"could not reproduce: {script.name} exited with status {status} (its error is above)"]
            )
        if not os.path.lexists(output / MANIFEST_FILE):
            return Report(
                ERROR,
                [
                    f"could not reproduce: {script.name} exited with status 0 but wrote no manifest: reproduce "
                    f"reads output_dir/{MANIFEST_FILE}, in the run folder its config's output_dir names"
                ],
            )
        rerun = read_json_object(output / MANIFEST_FILE)
        reproduced = rerun.get("weights_sha256")
        keep_scratch = chosen is None
    finally:
        if keep_scratch:
            config_file.unlink()
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    ran_with = {THREADS_KEY: (rerun.get("environment") or {}).get(THREADS_KEY)}
    for difference in compare_fingerprints({THREADS_KEY: environment.get(THREADS_KEY)}, ran_with):
        warnings.append(f"warning: environment differs, bitwise equality is not promised: {difference}")
        say(warnings[-1])
    differing = [key for key in RESULT_FIELDS if key in manifest and not same_number(manifest[key], rerun.get(key))]
    if reproduced == recorded and not differing:
        return Report(SAME, [f"reproduced: weights_sha256 {recorded} matches", f"the new run is in {output}"])
    if reproduced == recorded:
        lines = [f"not reproduced: the weights match (weights_sha256 {recorded}), but not the recorded results:"]
    else:
        lines = ["not reproduced: the weights differ", f"  recorded    {recorded}", f"  reproduced  {reproduced}"]
    lines += [f"  {key}: recorded {_show(manifest[key])}, reproduced {_show(rerun.get(key))}" for key in differing]
    if "dataset_sha256" in differing:
        lines.append("the data is not the recorded run's: it changed since the run, or this is another dataset")
    lines.append(
        f"see what differs with: python -m repro compare {shlex.quote(str(path.parent))} {shlex.quote(str(output))}"
    )
    if resumed_elsewhere:
        lines.append(
            "the run was resumed under another environment (see the warnings above): its weights come "
            "from more than one, so a re-run in any one may differ"
        )
    if warnings:
        lines.append("the environment differs too (see the warnings above)")
    return Report(DIFFERENT, lines)


def _show(value: Any) -> str:
    """A recorded value for a report line: a digest whole, anything long (a manifest may come from anyone) cut."""
    return repr(value) if isinstance(value, str) and len(value) <= 100 else short(value)


def _check_data_dir(config: Mapping[str, Any], path: Path) -> None:
    """Refuse a re-run whose ``data_dir`` train.py would create: a manifest may come from
    anyone, and reproduce must not create folders wherever one says.

    train.py creates a missing ``data_dir`` only to download CIFAR into it; the
    synthetic set reads no folder, and an image folder must exist already. A config
    without a ``data_dir`` key (another script's) is not checked: it names no folder.
    """
    if "data_dir" not in config or config.get("dataset") in DATASETS_READ_IN_PLACE:
        return
    data_dir = config.get("data_dir")
    if not isinstance(data_dir, str) or not Path(data_dir).is_dir():
        raise CommandError(
            f"{path}: the run's data_dir {data_dir!r} is not a folder here, and reproduce creates none "
            "(train.py would, to download the dataset into); put the dataset there first"
        )
