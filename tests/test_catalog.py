"""The shipped recipes: addressed by name or by file (a file wins), listed with their purpose and runtime,
copied for editing; a bad name gets the names and the closest one."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from hf_levy.recipes import catalog
from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import load_recipe

CLONE_RECIPES = pathlib.Path(__file__).parents[1] / "recipes"


def test_the_recipes_ship_inside_the_package_and_a_clone_sees_the_same_files():
    shipped = catalog.shipped()
    assert "modular_addition" in shipped
    assert all(path.parent == catalog.CONFIGS for path in shipped.values())
    assert sorted(p.name for p in CLONE_RECIPES.glob("*.yaml")) == sorted(p.name for p in shipped.values())


@pytest.mark.parametrize("name", sorted(catalog.shipped()))
def test_every_shipped_header_has_purpose_command_hardware_runtime_and_outcome(name):
    fields = catalog.header_fields(catalog.shipped()[name])
    assert set(fields) == {"purpose", "command", "hardware", "runtime", "outcome"}, fields
    assert all(fields.values()) and len(fields["purpose"]) <= 120, fields


def test_a_name_loads_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("modular_addition")
    assert recipe.path == catalog.CONFIGS / "modular_addition.yaml" and recipe.name == "modular_addition"


def test_a_file_of_that_name_wins_over_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "modular_addition").write_text("# mine\n")
    assert catalog.resolve("modular_addition") == pathlib.Path("modular_addition")
    elsewhere = tmp_path / "my.yaml"
    elsewhere.write_text("# mine\n")
    assert catalog.resolve(str(elsewhere)) == elsewhere


def test_an_unknown_name_lists_the_names_and_the_closest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--config", "modular_adition"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'modular_adition'" in err and "did you mean 'modular_addition'?" in err, err
    assert "digits_sgd" in err and "python_bytes_lm" in err  # the list of names


def test_a_missing_yaml_path_points_to_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--config digits_sgd"):
        catalog.resolve("recipes/digits_sgd.yaml")


def test_ls_shows_each_recipe_with_its_purpose_and_runtime(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name, path in catalog.shipped().items():
        fields = catalog.header_fields(path)
        runtime = fields["runtime"].split(" (")[0]  # up to its first parenthesis (how it was measured)
        assert re.search(
            rf"^{name} +{re.escape(fields['purpose'])}\n +runtime: {re.escape(runtime)}$", out, re.M
        ), name


def test_cp_copies_a_shipped_recipe_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "digits_sgd", str(dest)]) == 0
    assert dest.read_text() == catalog.shipped()["digits_sgd"].read_text()
    assert main(["cp", "digits_sgd", str(tmp_path)]) == 0 and (tmp_path / "digits_sgd.yaml").is_file()
    assert main(["cp", "modular_addition", str(dest)]) == 2
    assert (
        "exists" in capsys.readouterr().err
        and dest.read_text() == catalog.shipped()["digits_sgd"].read_text()
    )
    assert main(["cp", "digits_sdg", str(tmp_path / "x.yaml")]) == 2
    assert "did you mean 'digits_sgd'?" in capsys.readouterr().err


# What a pip user has: the hf-levy script (by its path under a launcher), the launchers, shipped recipe names and
# the example files `hf-levy cp` fetches. A clone's paths (.venv/bin/, recipes/, examples/) and make are not.
PROGRAMS = ("hf-levy ", "torchrun ", "accelerate launch ")


@pytest.mark.parametrize("name", sorted(catalog.shipped()))
def test_every_shipped_command_names_only_what_a_pip_user_has(name):
    from hf_levy.recipes.cli import build_parser

    command = catalog.header_fields(catalog.shipped()[name])["command"]
    command = re.sub(r"(?<!\$)\([^)]*\)", "", command)  # asides in parentheses, not $(which hf-levy)
    commands = re.split(r"\s+(?=(?:hf-levy|torchrun|accelerate launch) )", command.strip())
    configs = []
    for line in commands:
        words = line.split()
        while "=" in words[0]:  # environment variables
            words.pop(0)
        assert " ".join(words).startswith(PROGRAMS), (name, line)
        if words[0] != "hf-levy":  # a launcher runs the script by its path
            words = words[words.index("$(which") + 2 :] if "$(which" in words else []
            assert words, f"{name}: a launcher must run $(which hf-levy): {line!r}"
        else:
            words = words[1:]
        args, _ = build_parser().parse_known_args(words)
        assert args.command in ("compare", "train"), (name, line)
        configs.append(args.config)
        for word in words:
            assert "/" not in word and not word.startswith(".venv"), f"{name}: {word!r} is a clone's path"
            if word.endswith((".json", ".py", ".yaml")):
                assert word in catalog.examples(), f"{name}: {word!r} is not a file hf-levy cp fetches"
    assert name in configs and set(configs) <= set(catalog.shipped()), (name, configs)


def test_cp_fetches_the_example_script_and_its_deepspeed_config_and_the_wheel_ships_them(tmp_path, capsys):
    import tomllib

    assert set(catalog.examples()) >= {"train_tiny_llama.py", "ds_zero2.json"}
    assert main(["cp", "train_tiny_llama.py", str(tmp_path)]) == 0
    assert (tmp_path / "train_tiny_llama.py").read_bytes() == catalog.examples()[
        "train_tiny_llama.py"
    ].read_bytes()
    assert main(["cp", "ds_zero2.json", str(tmp_path / "zero2.json")]) == 0
    assert json.loads((tmp_path / "zero2.json").read_text())["zero_optimization"] == {"stage": 2}
    assert main(["cp", "ds_zero2.json", str(tmp_path / "zero2.json")]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    # The wheel's package data takes every example file (the build itself is .ci/package_check's).
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hf_levy.recipes.examples"]
    assert all(any(path.match(p) for p in patterns) for path in catalog.examples().values()), patterns


def test_ls_names_the_example_files(capsys):
    assert main(["ls"]) == 0
    assert (
        "Examples to copy (hf-levy cp FILE .): ds_zero2.json, train_tiny_llama.py." in capsys.readouterr().out
    )
