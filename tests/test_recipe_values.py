"""Recipe values and command-line flags get their field's type, or one line naming the key, value and type."""

from __future__ import annotations

import pytest
import yaml

from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import RecipeError, arm_config, load_recipe, parse_overrides

RECIPE = {
    "task": {"name": "modular_addition", "modulus": 7, "train_fraction": 0.5},
    "model": {"hidden_size": 16, "intermediate_size": 32},
    "args": {"max_steps": 2, "report_to": "none"},
    "arms": {"levy": {"trainer": "levy"}},
}


def write(tmp_path, **args):
    path = tmp_path / "r.yaml"
    path.write_text("# header\n" + yaml.safe_dump({**RECIPE, "args": {**RECIPE["args"], **args}}))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"learning_rate": "fast"}, "args: learning_rate: expected a float, got 'fast'"),
        ({"levy_alpha": [1, 2]}, "args: levy_alpha: expected a float, got [1, 2]"),
        ({"max_steps": 2.5}, "args: max_steps: expected an integer, got 2.5"),
        ({"bf16": "maybe"}, "args: bf16: expected a bool, got 'maybe'"),
        ({"levy_scale_mode": "percent"}, "args: levy_scale_mode: expected one of 'relative', 'absolute', got 'percent'"),
        ({"log_level": "loud"}, "args: log_level: expected one of ["),
    ],
)  # fmt: skip
def test_a_wrongly_typed_recipe_value_is_one_line_naming_key_value_and_type(tmp_path, capsys, args, message):
    recipe = write(tmp_path, **args)
    assert main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1, err  # one line, no usage text
    assert err.startswith(f"hf-levy: error: {recipe}: {message}"), err


def test_a_wrongly_typed_flag_is_one_line_too(tmp_path, capsys):
    recipe = write(tmp_path)
    assert main(["train", "--config", str(recipe), "--learning_rate", "fast"]) == 2
    err = capsys.readouterr().err
    assert err == "hf-levy: error: command line: learning_rate: expected a float, got 'fast'\n"


def test_strings_convert_as_on_a_command_line(tmp_path):
    recipe = load_recipe(write(tmp_path, learning_rate="1e-3", use_cpu="true", include_for_metrics="inputs"))
    config = arm_config(recipe, "levy", output_dir=str(tmp_path), seed=0, train_size=10)
    assert (
        config.learning_rate == 0.001 and config.use_cpu is True and config.include_for_metrics == ["inputs"]
    )


def test_a_bare_bool_flag_means_true_as_with_hf_argument_parser(tmp_path):
    assert parse_overrides(["--bf16", "--max_steps", "3", "--use-cpu"]) == {
        "bf16": "true",
        "max_steps": "3",
        "use_cpu": "true",
    }
    recipe = load_recipe(write(tmp_path))
    config = arm_config(
        recipe,
        "levy",
        output_dir=str(tmp_path),
        seed=0,
        train_size=10,
        overrides=parse_overrides(["--use_cpu"]),
    )
    assert config.use_cpu is True
    with pytest.raises(RecipeError, match="--max_steps needs a value"):
        parse_overrides(["--max_steps", "--bf16"])


def test_a_value_levy_config_refuses_names_the_recipe_and_the_arm(tmp_path):
    recipe = load_recipe(write(tmp_path, levy_alpha=3.0))
    with pytest.raises(RecipeError, match=r"r\.yaml: arm 'levy': levy_alpha must be in \(0, 2\], got 3\.0"):
        arm_config(recipe, "levy", output_dir=str(tmp_path), seed=0, train_size=10)
