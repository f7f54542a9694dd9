"""repro.checkpoint used directly, without train.py: what is saved comes back exactly, keep-K
and the best are kept, latest/auto/PATH resolve, and a damaged or misfit checkpoint is refused
before anything is applied."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from repro.checkpoint import Checkpointer, CheckpointError
from repro.loader import GlobalBatchSampler


def make_run(width: int = 4) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(3, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": GlobalBatchSampler(8, 2, 5)}


def train_step(run: dict) -> None:
    run["model"](torch.randn(2, 3)).square().sum().backward()
    run["optimizer"].step()
    run["scheduler"].step()
    run["optimizer"].zero_grad()


def draws() -> tuple:
    return random.random(), np.random.random(), torch.rand(1).item()


def test_save_restore_keep_and_resolve(tmp_path):
    notes = []
    manager = Checkpointer(tmp_path / "checkpoints", keep=2, best_key="score", log=notes.append)
    run = make_run()
    ema = {"weight": torch.zeros(4, 3)}
    assert manager.restore("auto", **run) is None  # nothing yet
    with pytest.raises(
        CheckpointError, match=r"^no checkpoint in .*: 'latest' needs one \('auto' starts from scratch\)$"
    ):
        manager.restore("latest", **run)  # a line that names no flag of train.py's
    for step in range(1, 6):
        train_step(run)
        ema["weight"] += run["model"].weight.detach()
        score = 1.0 if step == 2 else 0.0
        manager.save(step, **run, batches_consumed=step % 4, progress={"score": score}, rank_progress={"n": step},
                     tensors={"ema": ema})  # fmt: skip
    expected_draws = draws()
    saved_model = {k: v.clone() for k, v in run["model"].state_dict().items()}
    saved_momentum = run["optimizer"].state_dict()["state"][0]["momentum_buffer"].clone()
    assert [path.name for path in manager.checkpoints()] == ["step-00000002", "step-00000004", "step-00000005"]

    fresh, fresh_ema = make_run(), {"weight": torch.zeros(4, 3)}
    torch.manual_seed(99)
    restored = manager.restore("latest", **fresh, tensors={"ema": fresh_ema})
    assert (restored.step, restored.progress, restored.rank_progress) == (5, {"score": 0.0}, {"n": 5})
    assert draws() == expected_draws  # the RNG continues where the save left it
    assert all(torch.equal(fresh["model"].state_dict()[k], v) for k, v in saved_model.items())
    assert torch.equal(fresh["optimizer"].state_dict()["state"][0]["momentum_buffer"], saved_momentum)
    assert fresh["scheduler"].last_epoch == 5 and torch.equal(fresh_ema["weight"], ema["weight"])
    assert (fresh["sampler"].epoch, fresh["sampler"].start_batch) == (0, 1)
    assert manager.restore(str(manager.checkpoints()[0]), **make_run(), tensors={"ema": ema}).step == 2

    # A flipped byte in the newest: latest and its path refuse it in one line, auto goes back to step 4.
    weights = manager.checkpoints()[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    for mode in ("latest", str(weights.parent)):
        with pytest.raises(CheckpointError, match=r"step-00000005: model.safetensors is corrupt") as error:
            manager.restore(mode, **make_run(), tensors={"ema": ema})
        assert "\n" not in str(error.value)
    assert manager.restore("auto", **make_run(), tensors={"ema": ema}).step == 4
    assert notes == [f"skipping checkpoint {weights.parent}: model.safetensors is corrupt (its SHA-256 does not match "
                     "state.json)"]  # fmt: skip

    # Checkpoints that do not fit the run are refused before anything is applied.
    other = make_run(width=5)
    before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: bias is \(4,\) torch.float32, this model.s is \(5,\)"
    ):
        manager.restore(str(manager.checkpoints()[1]), **other, tensors={"ema": ema})
    assert all(torch.equal(other["model"].state_dict()[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match=r"optimizer\.pt's ema: present, unlike this run's"):
        manager.restore(str(manager.checkpoints()[1]), **make_run())
    with pytest.raises(CheckpointError, match="sampler seed 5 differs from this run's 6"):
        manager.restore(str(manager.checkpoints()[1]), **{**make_run(), "sampler": GlobalBatchSampler(8, 2, 6)},
                        tensors={"ema": ema})  # fmt: skip
    with pytest.raises(ValueError, match="progress keys must be strings other than"):
        manager.save(6, **run, progress={"step": 6})


def test_a_state_or_rank_file_linked_to_an_endless_file_is_refused_at_once(tmp_path):
    # Read unbounded, /dev/zero would never end: a checkpoint's JSON files are read as regular files only.
    manager = Checkpointer(tmp_path / "checkpoints", keep=3)
    run = make_run()
    for step in (1, 2):
        train_step(run)
        manager.save(step, **run)
    newest, older = manager.checkpoints()[-1], manager.checkpoints()[0]
    (newest / "state.json").unlink()
    (newest / "state.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"state\.json cannot be read \(.*symbolic link"):
        manager.restore("latest", **make_run())
    (older / "rank-0.json").unlink()
    (older / "rank-0.json").symlink_to("/dev/zero")
    assert manager.restore("auto", **make_run()) is None  # both skipped: it starts afresh


def test_a_run_that_went_back_sets_later_checkpoints_aside_and_keeps_what_it_writes(tmp_path):
    # auto past damaged checkpoints, or a path to an earlier one: the later ones are not the
    # newest for the run that goes on; pruning by name deleted each checkpoint it wrote.
    notes = []
    directory = tmp_path / "checkpoints"
    manager = Checkpointer(directory, keep=2, best_key="score", log=notes.append)
    run = make_run()
    for step in range(1, 6):
        train_step(run)
        manager.save(step, **run, progress={"score": 5.0 if step == 2 else 0.0})
    assert [path.name for path in manager.checkpoints()] == ["step-00000002", "step-00000004", "step-00000005"]
    for damaged in manager.checkpoints()[1:]:
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert manager.restore("auto", **run).step == 2
    notes.clear()
    train_step(run)
    manager.save(3, **run, progress={"score": 0.0})
    set_aside = directory / "set-aside"
    assert notes == [f"set aside 2 checkpoint(s) of step 3 and later, which this run went back past, in {set_aside}"]
    assert [path.name for path in manager.checkpoints()] == ["step-00000002", "step-00000003"]
    assert manager.restore("latest", **make_run()).step == 3
    assert sorted(path.name for path in set_aside.iterdir()) == ["step-00000004", "step-00000005"]

    # Back to step 2 twice more: what was set aside stays, a step set aside again gets a suffix.
    # Step 3, the newest, saved again the first time is replaced, not set aside.
    manager.restore(str(directory / "step-00000002"), **run)
    for step in (3, 4):
        train_step(run)
        manager.save(step, **run, progress={"score": 0.0})
    manager.restore(str(directory / "step-00000002"), **run)
    train_step(run)
    manager.save(3, **run, progress={"score": 0.0})
    names = ["step-00000003", "step-00000004", "step-00000004.1", "step-00000005"]
    assert sorted(path.name for path in set_aside.iterdir()) == names
    assert [path.name for path in manager.checkpoints()] == ["step-00000002", "step-00000003"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": 2.5}, "keep must be an int of 1 or more, got 2.5"),
        ({"keep": "3"}, "keep must be an int of 1 or more, got '3'"),
        ({"keep": True}, "keep must be an int of 1 or more, got True"),
        ({"keep": 0}, "keep must be an int of 1 or more, got 0"),
        ({"best_key": 1}, "best_key must be the name of a progress value"),
    ],
    ids=repr,
)
def test_a_checkpointer_with_a_keep_that_is_not_a_count_is_refused_at_construction(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=f"^{message}"):
        Checkpointer(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []
