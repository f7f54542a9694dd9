"""GracefulStop (repro.stop): real signals to this process, handlers put back after the block;
IgnoreStopSignals: real signals to DataLoader workers, and an exit that does not wait on them.

The two-process agreement (a SIGTERM to rank 1 only stops both ranks at one
step) is tested end to end in test_distributed_runs.py, and train.py's stop,
checkpoint and exact resume in test_resume.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, clean_env

from repro import GracefulStop, IgnoreStopSignals


def own_handler(number: int, frame: object) -> None:
    raise AssertionError(f"the handler from before the block ran for {signal.Signals(number).name}")


@pytest.fixture
def own_handlers():
    """This test's handlers for SIGTERM and SIGINT, so that restoring can be told from leaving them alone."""
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    for number in before:
        signal.signal(number, own_handler)
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


def test_a_signal_in_the_block_requests_a_stop_and_the_handlers_come_back(own_handlers):
    with GracefulStop() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # and the process is still here
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt either
        assert stop.agreed() == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is own_handler
    assert signal.getsignal(signal.SIGINT) is own_handler
    with pytest.raises(RuntimeError, match="inside its with block"):
        stop.agreed()

    usr1_before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(KeyError), GracefulStop(signals=[signal.SIGUSR1]) as stop:
        assert signal.getsignal(signal.SIGTERM) is own_handler  # only the signals asked for are caught
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() == signal.SIGUSR1
        raise KeyError("the body fails")
    assert signal.getsignal(signal.SIGUSR1) is usr1_before


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        GracefulStop(signals=[signal.SIGTERM, signal.SIGKILL])
    with pytest.raises(ValueError, match="signals must be a non-empty sequence of signals"):
        GracefulStop(signals=[])
    with pytest.raises(ValueError, match=r"signals must be a non-empty sequence of signals, got <Signals\.SIGUSR1"):
        GracefulStop(signals=signal.SIGUSR1)


def test_a_signal_named_twice_is_caught_once_and_its_handler_comes_back(own_handlers):
    with GracefulStop(signals=[signal.SIGTERM, signal.SIGTERM]) as stop:
        assert stop.signals == (signal.SIGTERM,)
    assert signal.getsignal(signal.SIGTERM) is own_handler
    with pytest.raises(ValueError, match="is not initialised"):
        GracefulStop(group=object())


def test_a_group_of_the_callers_own_carries_the_agreement():
    code = (
        "import os, signal, torch.distributed as dist\n"
        "from repro import GracefulStop\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "group = dist.new_group(backend='gloo')\n"
        "with GracefulStop(group=group) as stop:\n"
        "    first = stop.agreed()\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print(first, stop.agreed().name, flush=True)\n"
        "print(dist.get_backend(group))  # the caller's group is left alive\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "SIGTERM", "gloo"]


class WorkerPids(torch.utils.data.Dataset):
    """Each item is the pid of the worker that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return os.getpid()


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# Each start method: a spawned or forkserver worker has its libraries' threads before its init runs.
START_METHODS = multiprocessing.get_all_start_methods()


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_worker_ignores_the_stop_signals_from_any_sender_while_its_training_process_runs(start_method):
    loader = torch.utils.data.DataLoader(
        WorkerPids(),
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        worker_init_fn=IgnoreStopSignals(),
        multiprocessing_context=start_method,
    )
    workers = sorted({int(pid) for batch in loader for pid in batch})
    for worker in workers:
        # A scheduler's or a terminal's signal comes from another process; torch's own SIGTERM
        # (a worker slow to leave at its shutdown) from the training process.
        for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            subprocess.run(["kill", f"-{stop_signal.name[3:]}", str(worker)], check=True)
        os.kill(worker, signal.SIGTERM)
    time.sleep(1)
    assert all(is_running(worker) for worker in workers)
    assert sorted({int(pid) for batch in loader for pid in batch}) == workers
    del loader


KEEPS_ITS_LOADER_TO_THE_END = """
import sys
import torch
from repro import IgnoreStopSignals

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return index

if __name__ == "__main__":
    LOADER = torch.utils.data.DataLoader(
        Items(), batch_size=2, num_workers=2, persistent_workers=True, worker_init_fn=IgnoreStopSignals(),
        multiprocessing_context=sys.argv[1],
    )
    print(sum(int(batch.sum()) for batch in LOADER), flush=True)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_that_ignore_stop_signals_let_a_process_exit_that_still_holds_their_loader(tmp_path, start_method):
    # At exit multiprocessing ends the live workers with SIGTERM, then waits for them: a worker that
    # ignored that signal too kept train.py from exiting once a library held a traceback through main().
    script = tmp_path / "keeps_its_loader.py"
    script.write_text(KEEPS_ITS_LOADER_TO_THE_END)
    result = subprocess.run(
        [sys.executable, str(script), start_method],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "6" and "exited unexpectedly" not in result.stderr, result.stderr[-2000:]
