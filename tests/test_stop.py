"""GracefulStop (repro.stop): real signals to this process, handlers put back after the block.

The two-process agreement (a SIGTERM to rank 1 only stops both ranks at one
step) is tested end to end in test_distributed_runs.py, and train.py's stop,
checkpoint and exact resume in test_resume.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, clean_env

from repro import GracefulStop


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
