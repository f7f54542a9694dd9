"""PYTHONHASHSEED made effective in the running process (repro.hashseed), in real subprocesses."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, clean_env, free_port

PROBE = (
    "import repro.hashseed, os\n"
    "repro.hashseed.ensure_hash_seed()\n"
    "words = {'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'}\n"
    "fields = [os.environ.get('RANK', '-'), os.environ['PYTHONHASHSEED'], hash('reproducible'), list(words)]\n"
    # One write of the whole line: print() may write it in pieces, which two ranks would interleave.
    "os.write(1, (' '.join(map(str, fields)) + '\\n').encode())\n"
)


def launch(*command: str, **env: str) -> list[str]:
    result = subprocess.run(command, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return sorted(line for line in result.stdout.splitlines() if line.strip())


def test_hash_and_set_order_repeat_across_launches():
    first = launch(sys.executable, "-c", PROBE)
    assert first == launch(sys.executable, "-c", PROBE)
    assert first[0].split()[1] == "0"


def test_without_it_hash_changes_across_launches():
    # The control: shows the test above could fail.
    unfixed = "print(hash('reproducible'))"
    outputs = {tuple(launch(sys.executable, "-c", unfixed)) for _ in range(3)}
    assert len(outputs) > 1


def test_a_fixed_user_value_is_kept():
    assert launch(sys.executable, "-c", PROBE, PYTHONHASHSEED="123")[0].split()[1] == "123"


def test_effective_under_torchrun_in_every_process(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    first = launch(*torchrun, str(free_port()), str(script))
    second = launch(*torchrun, str(free_port()), str(script))
    assert [line.split()[0] for line in first] == ["0", "1"]
    assert first == second
    assert first[0].split(maxsplit=1)[1] == first[1].split(maxsplit=1)[1]


def test_python_dash_e_is_refused_for_it_ignores_the_variable(tmp_path):
    # -E ignores PYTHONHASHSEED: the variable would be set and recorded, and hash() random all the same.
    fixed = subprocess.run(
        [sys.executable, "-E", "-c", "import repro.hashseed as h; print(h.hash_seed_is_fixed())"],
        cwd=REPO, env=clean_env(PYTHONHASHSEED="0"), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert fixed.stdout.strip() == "False"
    result = subprocess.run(
        [sys.executable, "-E", str(REPO / "train.py"), "--output-dir", str(tmp_path / "run")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "train.py: error: python -E and -I ignore PYTHONHASHSEED, so hash() of a string changes from run to run; "
        "run without them\n"
    )
    assert not (tmp_path / "run").exists()
