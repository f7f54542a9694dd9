"""How bench/gpu_check.py spends a device session: it runs on a lent GPU with a fixed time
limit, once, so a stage that fails must not take the others' figures with it, no stage
starts after the budget, and the figures are on disk after every stage. The stages
themselves need CUDA for their figures; their CPU smoke run is in BENCHMARKS.md, section 5.
What of stage g a CPU can check is here too: its verdict on whether the host or the GPU
bounds the step, and the graphed-step bench's comparison of its two copies of the net."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch
from conftest import REPO, clean_env

from cifar.config import parse_config
from cifar.models import build_model

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import benchlib
import gpu_check
import graphed_step


def test_a_stage_that_raises_fails_alone_with_its_traceback_in_the_log(capsys):
    report = gpu_check.Report()

    def broken_stage() -> None:
        raise KeyError("f_speedrun seed 1")

    gpu_check.run_stage(report, "f", broken_stage)
    gpu_check.run_stage(report, "c", lambda: report.add("c", "next stage", "ok"))

    assert report.rows[0][:3] == ["f", "stage", "FAIL"]
    assert "KeyError" in report.rows[0][3] and "f_speedrun seed 1" in report.rows[0][3]
    assert report.rows[1] == ["c", "next stage", "ok", ""]
    assert report.failed
    assert "Traceback" in capsys.readouterr().err


def test_no_stage_starts_after_the_budget_and_the_figures_are_written(tmp_path):
    out = tmp_path / "check"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--budget-s", "0"]
    result = subprocess.run(
        [*command, "--stages", "ab", str(out)], env=clean_env(), capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    figures = json.loads((out / "gpu_check.json").read_text())
    assert [row[:3] for row in figures["rows"]] == [["a", "stage", "skipped"], ["b", "stage", "skipped"]]
    assert "budget is spent" in figures["rows"][0][3]
    assert set(figures["stage_s"]) == {"a", "b"}


def test_stage_g_says_which_of_host_and_gpu_bounds_the_step():
    # Shaped as bench/step_timeline.py's JSON: a small batch's run (host times, the GPU mostly
    # idle) against the recipe batch's, whose profiled GPU busy time is the step's GPU work.
    def small_batch(train_py_us: float, gpu_busy_us: float = 600.0) -> dict:
        bare = {"unprofiled_us_per_step": 3000.0, "recipe_unprofiled_us_per_step": 3500.0}
        return {"unprofiled_us_per_step": train_py_us, "bare": bare, "gpu_activity_recorded": True,
                "gpu_busy_us_per_step": gpu_busy_us}  # fmt: skip

    recipe_batch = {"gpu_activity_recorded": True, "gpu_busy_us_per_step": 4000.0, "settings": {"batch_size": 1024}}
    line = gpu_check.host_time_summary(small_batch(5000.0), recipe_batch)
    assert "train.py 5000, the bare loop 3000, with the recipe's optimizer and lookahead 3500" in line
    assert "the GPU's work 12% of that step" in line
    assert line.endswith("GPU's 4000 µs of work a step at batch 1024: 1.25, the host bounds it")
    assert gpu_check.host_time_summary(small_batch(3400.0), recipe_batch).endswith("0.85, the GPU bounds it")
    close = gpu_check.host_time_summary(small_batch(4200.0), recipe_batch)
    assert close.endswith("1.05, within 10%: neither clearly bounds it")
    # The GPU's work is set against the unprofiled step: above half of it, no verdict.
    busy = gpu_check.host_time_summary(small_batch(5000.0, gpu_busy_us=3000.0), recipe_batch)
    assert busy.endswith("too much for these to be the host's times") and "bounds" not in busy
    # Without the recipe batch's GPU work (its run failed, or recorded none): the host times alone.
    for missing in (None, {"gpu_activity_recorded": False}):
        alone = gpu_check.host_time_summary(small_batch(5000.0), missing)
        assert alone.endswith("no GPU work measured at the recipe's batch to set them against")


def two_trainers(total_steps: int = 8) -> tuple[graphed_step.Trainer, graphed_step.Trainer, list]:
    """Two copies of the speedrun net from one initialisation, as bench/graphed_step.py makes
    them, and two batches of small random images."""
    config = parse_config(["--config", str(REPO / "configs" / "cifar10_speedrun.yaml"), "--dataset", "synthetic"])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    batches = list(zip(images.split(3), torch.randint(0, 10, (6,), generator=generator).split(3), strict=True))
    model = build_model("speedrun", 10).to(memory_format=torch.channels_last)
    first = graphed_step.Trainer(model, config, 2, total_steps)
    return first, graphed_step.Trainer(copy.deepcopy(model), config, 2, total_steps), batches


def test_the_graphed_step_bench_compares_every_tensor_of_the_two_copies():
    # On a GPU the bench says whether CUDA graphs keep the eager step's bits; here its eager half:
    # two copies trained on the same batches, past a lookahead update (step 5) that moves weights.
    first, second, batches = two_trainers()
    start = [tensor.clone() for tensor in second.state()]
    for trainer in (first, second):
        for _ in range(3):
            trainer.timed_pass(batches)
    assert first.steps == 6 and first.same_bits(second)
    # Every tensor but the frozen parameters moved, and the momentum buffers are compared too.
    names = list(first.model.state_dict())
    frozen = {name for name, parameter in first.model.named_parameters() if not parameter.requires_grad}
    moved = {name for name, a, b in zip(names, start, second.state(), strict=False) if not torch.equal(a, b)}
    assert moved == set(names) - frozen and len(second.state()) > len(start)
    with torch.no_grad():
        second.model.head.weight[0, 0] += 1e-3
    assert not first.same_bits(second)
    # NaNs of the same bits are the same bits (torch.equal calls them unequal).
    for trainer in (first, second):
        with torch.no_grad():
            trainer.model.head.weight.fill_(float("nan"))
    assert first.same_bits(second)


def test_capturing_the_graphs_leaves_the_copies_equal_and_the_batches_untouched(monkeypatch):
    # torch's capture needs CUDA. Its effects on the module and its sample, as its source has them:
    # warm-up forwards and backwards (autograd.grad) that move the BatchNorm statistics, and
    # replays that copy each call's inputs into the sample's tensors.
    def capture(module: torch.nn.Module, sample: tuple) -> torch.nn.Module:
        trained = [parameter for parameter in module.parameters() if parameter.requires_grad]
        for _ in range(3):
            torch.autograd.grad(module(*sample), trained)
        forward = module.forward

        def replay(*inputs: torch.Tensor) -> torch.Tensor:
            for static, given in zip(sample, inputs, strict=True):
                static.copy_(given)
            return forward(*sample)

        module.forward = replay
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    eager, graphed, batches = two_trainers()
    first_batch = [tensor.clone() for tensor in batches[0]]
    graphed.graph(batches[0])
    assert eager.same_bits(graphed)
    for trainer in (eager, graphed):
        trainer.timed_pass(batches)
    assert eager.same_bits(graphed)
    assert all(torch.equal(a, b) for a, b in zip(batches[0], first_batch, strict=True))


def test_stage_g_reads_what_the_graphed_step_bench_writes():
    figures = graphed_step.summary({"eager": [900.0, 1000.0, 1100.0], "graphed": [400.0, 500.0, 600.0]}, 1.5, 72, True)
    assert json.loads(json.dumps(figures)) == figures  # what --json writes
    line = gpu_check.graphs_summary(figures)
    assert line == "eager 1000 µs a step, graphed 500: 2.00x; bits after 72 steps equal"
    assert gpu_check.graphs_summary({**figures, "bitwise_equal": False}).endswith("DIFFER")


def test_the_benches_bit_check_compares_bits_not_values():
    # The GPU check's "same bits" verdicts (graphed_step, optimizer_step, forward_wrapper) rest on it.
    values = torch.tensor([1.0, float("nan"), 0.0])
    assert benchlib.bitwise_equal(values, values.clone())  # torch.equal: False, for the NaN
    assert not benchlib.bitwise_equal(values, torch.tensor([1.0, float("nan"), -0.0]))  # torch.equal: True
    assert not benchlib.bitwise_equal(values, values.double())
    assert not benchlib.bitwise_equal(values, values[:2])
    assert benchlib.bitwise_equal(torch.arange(3), torch.arange(3))
    layouts = torch.randn(2, 3, 4, 4)
    assert benchlib.bitwise_equal(layouts, layouts.contiguous(memory_format=torch.channels_last))
