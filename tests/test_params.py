"""One parameter model per step: the CLI's options and the flows' forms come from the same
fields, with the same defaults, bounds and cross-field rules.
"""

from __future__ import annotations

import typer
import typer.main
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.cli.options import step_options
from specdeepmap.params import (
    BaselineParams,
    ChipParams,
    EvaluateParams,
    MapParams,
    SplitParams,
    TrainParams,
)

runner = CliRunner()

#: command → the step model its options come from
COMMANDS = {
    "chip": ChipParams,
    "split": SplitParams,
    "train": TrainParams,
    "test": EvaluateParams,
    "map": MapParams,
    "baseline": BaselineParams,
}


def _options(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def test_every_field_is_an_option_with_the_fields_default():
    for command, model in COMMANDS.items():
        options = _options(command)
        for name, field in model.model_fields.items():
            assert name in options, f"{command}: no option for {model.__name__}.{name}"
            default = field.get_default(call_default_factory=True)
            # a list is a repeatable option whose absence (None) stands for the default
            assert options[name].default == (None if default == [] else default), name
            if field.description:
                assert options[name].help == field.description


def test_the_flows_take_the_core_models():
    from flows.params import MapFlowParams, ScheduledMappingParams, TrainingPipelineParams

    fields = TrainingPipelineParams.model_fields
    assert fields["chip"].annotation is ChipParams
    assert fields["split"].annotation is SplitParams
    assert fields["train"].annotation is TrainParams
    assert MapFlowParams.model_fields["map"].annotation is MapParams
    assert ScheduledMappingParams.model_fields["map"].annotation is MapParams


def test_generated_options_build_the_model():
    probe = typer.Typer()
    seen: list[ChipParams] = []

    @probe.command()
    @step_options(ChipParams)
    def run(image: str, params: ChipParams, workers: int = 1) -> None:
        seen.append(params)
        print(image, workers)

    done = runner.invoke(probe, ["scene.tif", "--tile-x", "64", "--step-y", "32", "--workers", "3"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "scene.tif 3"
    assert seen[0] == ChipParams(tile_x=64, step_y=32)
    assert seen[0].tile_size == (64, 256) and seen[0].stride == (256, 32)


def test_the_cli_refuses_bad_values_before_any_work(tmp_path):
    missing = str(tmp_path / "no-such-dataset")
    # a bound of the model: click reports the option by name
    done = runner.invoke(app, ["chip", "a.tif", "b.tif", str(tmp_path / "c"), "--tile-x", "0"])
    assert done.exit_code == 2 and "--tile-x" in done.output
    # a cross-field rule: refused before the (missing) dataset is read
    done = runner.invoke(app, ["train", missing, "--distill"])
    assert done.exit_code == 2 and "set ensemble >= 2" in done.output, done.output
    done = runner.invoke(app, ["split", missing, "--train", "80", "--validation", "30"])
    assert done.exit_code == 2 and "add up to 120" in done.output, done.output
    # an exclusive bound that click does not know: the model's message names the field
    done = runner.invoke(app, ["split", missing, "--scaler", "0"])
    assert done.exit_code == 2 and "scaler: Input should be greater than 0" in done.output
    assert not (tmp_path / "c").exists()


def test_architecture_accepts_specdeepmaps_names():
    assert TrainParams(architecture="U-Net++").architecture == "unetplusplus"
    assert TrainParams(architecture="DeepLabV3+").architecture == "deeplabv3plus"


def test_precision_32_may_be_given_as_a_number():
    """A YAML or JSON ``precision: 32`` (a number there) is Lightning's "32"; others refused."""
    import pytest

    from specdeepmap.errors import InvalidParameterError

    assert TrainParams(precision=32).precision == "32"
    assert TrainParams(precision="bf16-mixed").precision == "bf16-mixed"
    for bad in (16, True, "64"):
        with pytest.raises(InvalidParameterError, match="precision: Input should be"):
            TrainParams(precision=bad)


def test_train_config_is_the_recipe_and_the_plumbing():
    from specdeepmap.training import TrainConfig

    recipe = TrainParams(epochs=3, seed=7, cutmix=0.0)
    config = TrainConfig.from_params(recipe, dataset="d", out="o", workers=2)
    assert config.recipe == recipe and config.seed == 7 and config.workers == 2
