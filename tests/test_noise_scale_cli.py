"""``hf-levy noise-scale`` on a shipped tiny recipe, in-process through the command's main function."""

from __future__ import annotations

import re

import pytest

from hf_levy.noise_scale import gradient_noise_scale
from hf_levy.recipes.cli import main
from hf_levy.recipes.recipe import load_recipe
from hf_levy.recipes.runner import build_recipe_model, build_task


def printed_b_simple(text: str) -> tuple[float, float, float]:
    found = re.search(r"B_simple = (\S+) examples, 95% bootstrap interval \[(\S+), (\S+)\]", text)
    assert found, text
    return tuple(float(x) for x in found.groups())


def test_it_prints_the_estimate_of_the_recipes_model_with_its_interval_and_batch_sizes(capsys):
    flags = ["--small_batch_size", "16", "--big_batch_size", "64", "--num_draws", "4", "--seed", "1"]
    assert main(["noise-scale", "--config", "modular_addition", "--arm", "stock_full_batch", *flags]) == 0
    out = capsys.readouterr().out
    assert "modular_addition, arm stock_full_batch: model at initialization (seed 1)" in out
    assert "from 4 draws of a small batch b = 16 and a big batch B = 64" in out
    # The same estimate, computed here from the recipe's model built with the same seed.
    recipe = load_recipe("modular_addition")
    task = build_task(recipe)
    expected = gradient_noise_scale(
        build_recipe_model(recipe, task, 1),
        task.train_dataset,
        collate_fn=task.data_collator,
        small_batch_size=16,
        big_batch_size=64,
        num_draws=4,
        seed=1,
    )
    value, low, high = printed_b_simple(out)
    assert value == pytest.approx(expected.b_simple, rel=1e-3)
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-3)
    assert low <= value <= high


def test_the_batch_sizes_default_to_the_arms_noise_batch_and_examples_per_step(capsys):
    # minibatch_scale_1: levy_noise_batch_size 128 at full batch (1,044 pairs of a + b mod 59 for training)
    argv = ["noise-scale", "--config", "noise_sources_modular_addition", "--arm", "minibatch_scale_1"]
    assert main([*argv, "--num_draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "small batch b = 128 and a big batch B = 1044 (with replacement from the 1044 training" in out
    assert re.search(r"the arm's batch per optimizer step, 1044 examples, is \S+ x B_simple", out), out


def test_a_small_batch_not_below_the_big_one_is_an_error_naming_the_flags(capsys):
    argv = [
        "noise-scale",
        "--config",
        "modular_addition",
        "--small_batch_size",
        "64",
        "--big_batch_size",
        "64",
    ]
    assert main(argv) == 2
    assert "--small_batch_size 64 and --big_batch_size 64" in capsys.readouterr().err


@pytest.mark.slow
def test_under_torchrun_the_ranks_share_the_batches_and_the_main_process_prints_once(capsys):
    import os
    import pathlib
    import subprocess
    import sys

    flags = ["--small_batch_size", "16", "--big_batch_size", "64", "--num_draws", "4", "--seed", "1"]
    args = ["noise-scale", "--config", "modular_addition", "--arm", "stock_full_batch", *flags]
    assert main(args) == 0
    alone = printed_b_simple(capsys.readouterr().out)
    root = pathlib.Path(__file__).parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "hf_levy.recipes.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("B_simple = ") == 1, result.stdout
    # With the group started each rank takes its share of every batch (gradient_noise_scale's split, checked
    # against one process in test_noise_scale); the estimate is one process's to rounding.
    assert printed_b_simple(result.stdout) == pytest.approx(alone, rel=1e-3)
