"""The speedrun recipe (configs/cifar10_speedrun.yaml): its pieces against references,
and train.py runs of it that repeat bitwise and resume exactly after kill -9."""

from __future__ import annotations

import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO, read_manifest, train_ok
from test_resume import assert_same_run, start_training, wait_for_checkpoint
from torch import nn

from cifar.config import parse_config
from cifar.data import synthetic
from cifar.device_data import DeviceTrainBatches, augment_batch, augmentation_params, normalize
from cifar.lookahead import Lookahead
from cifar.models import SpeedrunNet, patch_covariance
from cifar.optim import build_optimizer, set_whitening_bias_training
from cifar.tta import tta_logits
from repro.loader import GlobalBatchSampler
from repro.seeds import SeedPlan

CPU = torch.device("cpu")
CONFIG = str(REPO / "configs" / "cifar10_speedrun.yaml")
# The recipe on tiny synthetic data: 4 steps an epoch, 2 epochs. These flags come after
# conftest's TINY flags, so they win over its small_cnn settings.
SPEEDRUN = [
    "--config", CONFIG,
    "--model", "speedrun",
    "--data-pipeline", "device",
    "--lr", "1.5",
    "--synthetic-train-size", "128",
    "--synthetic-test-size", "32",
    "--warmup-epochs", "0.5",
    "--whiten-bias-epochs", "1",
    "--lookahead-every", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def splits():
    return synthetic(64, 16)


def channel_stats(splits):
    return [torch.tensor(values).view(1, -1, 1, 1) for values in (splits.mean, splits.std)]


def test_reflect_translate_and_flip_match_torch_padding(splits):
    images = splits.train.images[:32]
    params = augmentation_params(SeedPlan(5).aug_array(0, np.arange(32)), 32, 32, 2)
    batch = augment_batch(images, torch.from_numpy(params), *channel_stats(splits), 2, 0, "reflect")
    padded = nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    for image, padded_image, (row, column, flip, _, _) in zip(batch, padded, params, strict=True):
        expected = padded_image[:, row : row + 32, column : column + 32]
        expected = expected.flip(-1) if flip else expected
        torch.testing.assert_close(image, normalize(expected[None].to(torch.uint8), *channel_stats(splits))[0])
    assert {0, 4} <= set(params[:, 0].tolist())  # the full range of shifts occurs


def test_alternating_flip_mirrors_each_sample_every_other_epoch(splits):
    sampler = GlobalBatchSampler(len(splits.train), 16, 9)
    batches = DeviceTrainBatches(
        splits.train, sampler, SeedPlan(9), splits.mean, splits.std, 0, CPU, padding=0, flip="alternating"
    )
    indices = np.arange(16)
    epochs = [batches.batch(epoch, indices)[0] for epoch in range(3)]
    assert torch.equal(epochs[1], epochs[0].flip(-1))
    assert torch.equal(epochs[2], epochs[0])
    plain = normalize(splits.train.images[:16], *channel_stats(splits))
    flipped = [not torch.equal(image, original) for image, original in zip(epochs[0], plain, strict=True)]
    assert 2 <= sum(flipped) <= 14  # a random half, not all or none
    # A sample's flip is its own: the same in another batch, in any order.
    reordered = batches.batch(1, indices[::-1])[0]  # a reversed view, as a caller may pass
    assert torch.equal(reordered, epochs[1].flip(0))


def test_alternating_flip_needs_the_device_pipeline():
    with pytest.raises(ValueError, match="alternating"):
        parse_config(["--config", CONFIG, "--data-pipeline", "dataloader"])


def test_tta_level_2_averages_mirrors_and_one_pixel_shifts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    images = torch.randn(6, 3, 8, 8)
    model(images)  # materialise the lazy layer

    def mirrored(views):
        return 0.5 * model(views) + 0.5 * model(views.flip(-1))

    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    shifts = [padded[:, :, 0:8, 0:8], padded[:, :, 2:10, 2:10]]
    expected = 0.5 * mirrored(images) + 0.5 * torch.stack([mirrored(view) for view in shifts]).mean(0)
    with torch.no_grad():
        torch.testing.assert_close(tta_logits(model, images, 2), expected)
        torch.testing.assert_close(tta_logits(model, images, 1), mirrored(images))
        assert torch.equal(tta_logits(model, images, 0), model(images))
    with pytest.raises(ValueError, match="level"):
        tta_logits(model, images, 3)


def test_whitening_layer_decorrelates_training_patches(splits):
    model = SpeedrunNet()
    images = normalize(splits.train.images, *channel_stats(splits))
    model.init_whitening(images)
    outputs = nn.functional.conv2d(images.double(), model.whiten.weight[:12].double())
    features = outputs.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = features.T @ features / len(features)
    # Unit variance along each direction, up to eps, and no correlation between directions.
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=0.05, rtol=0)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
    assert not model.whiten.weight.requires_grad


def test_the_whitening_covariance_is_computed_where_the_images_are():
    # train.py passes images on the run's device, so that on a GPU the covariance does not take
    # the host's one thread (0.6 s); on the meta device a copy to the host would raise.
    images = torch.empty(8, 3, 32, 32, device="meta")
    assert patch_covariance(images, SpeedrunNet.WHITEN_KERNEL).device.type == "meta"


def test_the_whitening_bench_tells_rounding_from_a_wrong_layout():
    # On the H200 machine's Xeon the two covariance layouts of bench/whitening.py differed in
    # the last bits (another summation order), and the bench, which demanded bitwise equality,
    # failed and timed nothing; a layout error must still fail it.
    sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
    import whitening

    images = torch.randn(5000, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    covariance = patch_covariance(images, SpeedrunNet.WHITEN_KERNEL)
    reordered = patch_covariance(images.flip(0), SpeedrunNet.WHITEN_KERNEL)
    assert not torch.equal(reordered, covariance)
    assert whitening.largest_difference(covariance, reordered) <= whitening.ROUNDING
    swapped = torch.arange(12)
    swapped[[1, 2]] = swapped[[2, 1]]
    assert whitening.largest_difference(covariance, covariance[swapped][:, swapped]) > whitening.ROUNDING
    one_row_per_patch = whitening.covariance_one_row_per_patch(images)
    assert whitening.largest_difference(covariance, one_row_per_patch) <= whitening.ROUNDING


def test_lookahead_updates_every_n_steps_and_hands_over_the_slow_weights_at_the_end():
    model = nn.Linear(2, 2)
    lookahead = Lookahead(model, every=2, total_steps=4)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(1)  # not an update step: the fast weights stay
    assert torch.equal(model.weight, start + 1)
    lookahead.after_step(2)
    decay = lookahead.decay(2)
    torch.testing.assert_close(model.weight, start + (1 - decay))
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(4)  # the last step: the model takes the slow weights
    torch.testing.assert_close(model.weight, lookahead.slow["weight"])


def test_optimizer_groups_follow_the_recipe():
    config = parse_config(["--config", CONFIG])
    model = SpeedrunNet()
    optimizer, scheduler = build_optimizer(config, model, steps_per_epoch=48)
    by_parameter = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert id(model.whiten.weight) not in by_parameter  # frozen
    norm_bias = by_parameter[id(model.body[0][2].bias)]
    conv = by_parameter[id(model.body[0][0].weight)]
    whitening = by_parameter[id(model.whiten.bias)]
    assert norm_bias["initial_lr"] == pytest.approx(64 * conv["initial_lr"])
    # Each step decays every parameter by the same lr x weight decay.
    assert norm_bias["initial_lr"] * norm_bias["weight_decay"] == pytest.approx(
        conv["initial_lr"] * conv["weight_decay"]
    )
    assert conv["lr"] == pytest.approx(0.2 * 1.5 + 0.8 * 1.5 / 110)  # warm-up starts at 0.2 x lr
    for _ in range(3 * 48):
        optimizer.step()
        scheduler.step()
    assert whitening["lr"] == 0.0  # the whitening bias trains for 3 epochs only
    assert conv["lr"] > 0.0


def train_speedrun_net(epochs: int, steps_per_epoch: int, *, switch_whitening_bias: bool) -> nn.Module:
    """A SpeedrunNet trained by the recipe's optimizer on random images, the whitening
    bias's gradient switched per epoch as train.py switches it, or always on."""
    config = parse_config(["--config", CONFIG, "--whiten-bias-epochs", "1"])
    torch.manual_seed(0)
    model = SpeedrunNet()
    optimizer, scheduler = build_optimizer(config, model, steps_per_epoch)
    data = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        if switch_whitening_bias:
            set_whitening_bias_training(model, epoch, config)
        for _ in range(steps_per_epoch):
            images, labels = torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data)
            nn.functional.cross_entropy(model(images), labels, label_smoothing=0.2).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return model


def test_the_whitening_bias_gradient_stops_after_its_epochs_and_no_weight_changes():
    switched = train_speedrun_net(3, 2, switch_whitening_bias=True)
    always = train_speedrun_net(3, 2, switch_whitening_bias=False)
    assert not switched.whiten.bias.requires_grad and switched.whiten.bias.grad is None
    assert always.whiten.bias.requires_grad
    for name, tensor in always.state_dict().items():
        assert torch.equal(switched.state_dict()[name], tensor), name


def test_under_ddp_the_whitening_bias_keeps_its_gradient():
    # DDP waits for a gradient of every parameter it was built with: a bias switched off
    # makes the next step raise "Expected to have finished reduction in the prior iteration".
    config = parse_config(["--config", CONFIG, "--whiten-bias-epochs", "1"])
    model = SpeedrunNet()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        for epoch in range(3):
            set_whitening_bias_training(model, epoch, config, always=True)
            wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
        assert model.whiten.bias.requires_grad
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def speedrun_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("speedrun") / "run"
    train_ok(run_dir, *SPEEDRUN)
    return run_dir


@pytest.mark.slow  # the kill -9 test below ends equal to this reference, another run of the recipe
def test_speedrun_repeats_bitwise(speedrun_reference, tmp_path):
    manifest = train_ok(tmp_path / "again", *SPEEDRUN)
    assert manifest["weights_sha256"] == read_manifest(speedrun_reference)["weights_sha256"]
    assert manifest["config"]["model"] == "speedrun"
    assert manifest["step"] == 8


def test_train_py_stops_the_whitening_bias_gradient_after_its_epochs(speedrun_reference):
    # SGD leaves a parameter without a gradient alone: the bias's momentum buffer, which its
    # weight decay alone would move, stays as epoch 1 (the one whitening epoch) left it.
    def whitening_bias_momentum(step):
        state = torch.load(speedrun_reference / "checkpoints" / f"step-{step:08d}" / "optimizer.pt")
        *_, whitening = state["param_groups"]
        return state["state"][whitening["params"][0]]["momentum_buffer"]

    assert torch.equal(whitening_bias_momentum(4), whitening_bias_momentum(8))


def latest_step(run_dir) -> int:
    steps = [int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("step-*") if "." not in path.name]
    return max(steps, default=0)


def test_speedrun_resumes_bitwise_after_kill_9(speedrun_reference, tmp_path):
    # Killed once a checkpoint after step 3 exists: it holds lookahead state, which the resume must restore.
    run_dir = tmp_path / "run"
    args = (*SPEEDRUN, "--checkpoint-every", "1", "--resume", "auto")
    process = start_training(run_dir, *args)
    wait_for_checkpoint(run_dir, process, timeout=240)
    while process.poll() is None and latest_step(run_dir) < 4:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before the kill: nothing was resumed"
    train_ok(run_dir, *args)
    assert_same_run(run_dir, speedrun_reference)


def test_two_ranks_see_the_samples_and_augmentation_of_one(splits):
    options = {"padding": 2, "padding_mode": "reflect", "flip": "alternating"}

    def epoch_batches(rank, world_size):
        sampler = GlobalBatchSampler(len(splits.train), 16, 4, rank=rank, world_size=world_size)
        batches = DeviceTrainBatches(splits.train, sampler, SeedPlan(4), splits.mean, splits.std, 0, CPU, **options)
        sampler.set_epoch(1)
        return list(batches)

    whole = epoch_batches(0, 1)
    shards = [epoch_batches(rank, 2) for rank in range(2)]
    for step, (images, labels) in enumerate(whole):
        assert torch.equal(images, torch.cat([shards[0][step][0], shards[1][step][0]]))
        assert torch.equal(labels, torch.cat([shards[0][step][1], shards[1][step][1]]))
