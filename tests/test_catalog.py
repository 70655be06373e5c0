"""The shipped recipes: addressed by name or by file (a file wins), listed with their purpose and runtime,
copied for editing; a bad name gets the names and the closest one."""

from __future__ import annotations

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
