"""The config schema: YAML, then flags; unknown keys and wrong types named."""

from __future__ import annotations

import pytest
from torch import nn

from cifar import models
from cifar.config import ConfigError, build_parser, config_differences, parse_config


def test_yaml_fills_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 5e-4\noverwrite: true\nmodel_seed: 7\n")
    config = parse_config(["--config", str(path), "--epochs", "4", "--no-overwrite"])
    assert (config.epochs, config.lr, config.overwrite, config.model_seed) == (4, 5e-4, False, 7)
    assert parse_config(["--model-seed", "none"]).model_seed is None
    assert parse_config(["--log-with", "none"]).log_with == "none"  # a choice of its own, not an empty value


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("epochs: true\n", "'epochs' must be int"),
        ("batch_size: 12.5\n", "'batch_size' must be int"),
        ("model: vgg\n", "'model' must be one of"),
        ("log_with: comet_ml\n", "'log_with' must be one of tensorboard, wandb, mlflow, aim, none"),
        ("- a list\n", "must hold a mapping"),
        ("epochs: '1\n", "is not valid YAML"),
        ("seed: null\n", "'seed' cannot be empty"),
        ("tta_level: 3\n", r"tta_level must be in \[0, 2\], got 3"),  # cifar/tta.py's levels
    ],
)
def test_bad_yaml_values_are_named(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(path)])


def test_defaults_fit_a_gpu():
    # The DataLoader, one image at a time, cannot feed a GPU: the device pipeline can.
    defaults = parse_config([])
    assert defaults.data_pipeline == "device"
    assert defaults.mixed_precision == "auto"


def test_run_control_keys_do_not_make_a_different_run():
    base = parse_config([])
    previous = {**vars(base), "num_workers": 7, "resume": "auto", "max_steps": 3, "log_with": "wandb"}
    assert config_differences(previous, base) == []
    assert config_differences({**vars(base), "lr": 1.0}, base) == [f"lr: 1.0 -> {base.lr!r}"]


def test_a_registered_model_is_a_config_choice(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))  # the registration ends with the test
    with pytest.raises(ConfigError, match=r"'model' must be one of small_cnn, .*, speedrun, got 'linear'"):
        parse_config(["--model", "linear"])
    models.register_model(
        "linear", lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    )
    assert parse_config(["--model", "linear"]).model == "linear"
    assert "--model {small_cnn,small_cnn_dropout,resnet18,resnet9,speedrun,linear}" in build_parser().format_help()
    assert models.build_model("linear", 7)[1].out_features == 7
    with pytest.raises(ValueError, match="'linear' is already registered"):
        models.register_model("linear", nn.Identity)
    with pytest.raises(ValueError, match="a model name is letters, digits"):
        models.register_model("../linear", nn.Identity)


def test_every_flags_help_gives_its_default():
    # README says --help lists every setting with its default; the on/off flags gave none,
    # so channels_last, on by default, could not be told from the others.
    import dataclasses

    from cifar.config import TrainConfig

    actions = {action.dest: action for action in build_parser()._actions}
    for spec in dataclasses.fields(TrainConfig):
        shown = "on" if spec.default is True else "off" if spec.default is False else str(spec.default)
        assert actions[spec.name].help.endswith(f"(default: {shown})"), (spec.name, actions[spec.name].help)
