"""hf_levy.recipes.small_data_tasks: sparse parity, sparse regression, noisy digits, the diagonal network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_levy.recipes import runner
from hf_levy.recipes.models import DiagonalLinearNetwork
from hf_levy.recipes.small_data_tasks import noisy_digits, sparse_parity, sparse_regression


def secret_positions(description: str) -> list[int]:
    return [int(i) for i in description.split("positions [")[1].split("]")[0].split(",")]


def test_sparse_parity_labels_are_the_parity_of_the_secret_bits_recomputed_by_hand():
    task = sparse_parity(num_bits=12, parity_bits=3, num_train=50, num_test=70, seed=4)
    assert len(task.train_dataset) == 50 and len(task.eval_dataset) == 70
    secret = secret_positions(task.description)
    assert len(set(secret)) == 3 and all(0 <= i < 12 for i in secret)
    for row in list(task.train_dataset) + list(task.eval_dataset):
        bits = row["pixel_values"]
        assert len(bits) == 12 and set(bits) <= {-1.0, 1.0}
        minus_ones = sum(1 for i in secret if bits[i] == -1.0)
        assert row["labels"] == minus_ones % 2
    labels = list(task.train_dataset["labels"]) + list(task.eval_dataset["labels"])
    assert 0.3 < np.mean(labels) < 0.7  # both classes occur


def test_sparse_parity_labels_depend_on_no_other_bit():
    task = sparse_parity(num_bits=8, parity_bits=2, num_train=400, num_test=1, seed=0)
    secret = secret_positions(task.description)
    x = np.array(task.train_dataset["pixel_values"])
    y = np.array(task.train_dataset["labels"])
    for i in range(8):
        agreement = np.mean((x[:, i] < 0) == y)  # a single bit says nothing about a parity of two
        assert abs(agreement - 0.5) < 0.1, (i, secret)


def test_sparse_regression_targets_equal_x_times_a_sparse_w_star():
    task = sparse_regression(num_features=20, num_nonzero=3, num_train=15, num_test=30, seed=2)
    x_train, y_train = np.array(task.train_dataset["pixel_values"]), np.array(task.train_dataset["labels"])
    x_test, y_test = np.array(task.eval_dataset["pixel_values"]), np.array(task.eval_dataset["labels"])
    assert x_train.shape == (15, 20) and x_test.shape == (30, 20)
    # w* from the 45 noiseless equations (more than the 20 unknowns): 3 entries of ±1, zeros elsewhere
    w_star, *_ = np.linalg.lstsq(np.vstack([x_train, x_test]), np.concatenate([y_train, y_test]), rcond=None)
    assert np.count_nonzero(np.abs(w_star) > 1e-4) == 3
    np.testing.assert_allclose(np.abs(w_star[np.abs(w_star) > 1e-4]), 1.0, atol=1e-4)
    np.testing.assert_allclose(x_test @ w_star, y_test, atol=1e-4)


def test_sparse_regression_noise_reaches_the_train_targets_only():
    clean = sparse_regression(num_features=10, num_nonzero=2, num_train=8, num_test=5, seed=1)
    noisy = sparse_regression(num_features=10, num_nonzero=2, num_train=8, num_test=5, noise_std=0.5, seed=1)
    assert noisy.train_dataset["pixel_values"] == clean.train_dataset["pixel_values"]
    assert noisy.eval_dataset["labels"] == clean.eval_dataset["labels"]
    assert noisy.train_dataset["labels"] != clean.train_dataset["labels"]


def test_relative_mse_is_one_for_zero_and_zero_for_perfect_predictions():
    task = sparse_regression(num_features=10, num_nonzero=2, num_train=8, num_test=50, seed=0)
    y = np.array(task.eval_dataset["labels"])
    assert task.compute_metrics(EvalPrediction(predictions=y.copy(), label_ids=y)) == {"relative_mse": 0.0}
    zero = task.compute_metrics(EvalPrediction(predictions=np.zeros_like(y), label_ids=y))
    assert zero["relative_mse"] == pytest.approx(1.0)
    half = task.compute_metrics(EvalPrediction(predictions=y / 2, label_ids=y))
    assert half["relative_mse"] == pytest.approx(0.25)


def test_diagonal_network_computes_u_squared_minus_v_squared_and_the_squared_loss():
    model = DiagonalLinearNetwork(in_features=4, init_scale=0.5)
    torch.testing.assert_close(model.weight, torch.zeros(4))  # u = v at the start: w = 0
    with torch.no_grad():
        model.u.copy_(torch.tensor([1.0, 2.0, 0.0, 1.0]))
        model.v.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    x, y = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 5.0]]), torch.tensor([3.0, 0.0])
    out = model(pixel_values=x, labels=y)
    torch.testing.assert_close(out["logits"], torch.tensor([1.0 + 3.0 - 1.0, 2.0]))
    torch.testing.assert_close(out["loss"], torch.tensor((0.0 + 4.0) / 2))
    with pytest.raises(ValueError, match="init_scale"):
        DiagonalLinearNetwork(init_scale=0.0)


def test_noisy_digits_flips_exactly_the_requested_share_and_keeps_the_test_set_clean():
    from hf_levy.recipes.tasks import digits

    clean = digits(num_train=200, seed=3)
    noisy = noisy_digits(num_train=200, noise_fraction=0.25, seed=3)
    assert noisy.train_dataset["pixel_values"] == clean.train_dataset["pixel_values"]
    changed = np.array(noisy.train_dataset["labels"]) != np.array(clean.train_dataset["labels"])
    assert changed.sum() == 50  # every flip lands on another class
    assert set(noisy.train_dataset["labels"]) <= set(range(10))
    assert noisy.eval_dataset["labels"] == clean.eval_dataset["labels"]
    assert (
        noisy_digits(num_train=200, noise_fraction=0.0, seed=3).train_dataset["labels"]
        == (clean.train_dataset["labels"])
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda s: sparse_parity(num_bits=10, num_train=30, num_test=20, seed=s),
        lambda s: sparse_regression(num_features=10, num_nonzero=2, num_train=8, num_test=5, seed=s),
        lambda s: noisy_digits(num_train=100, noise_fraction=0.2, seed=s),
    ],
    ids=["sparse_parity", "sparse_regression", "noisy_digits"],
)
def test_same_seed_same_data_other_seed_other_data_global_rng_untouched(build):
    state = torch.get_rng_state()
    first, again, other = build(0), build(0), build(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.train_dataset["labels"] == again.train_dataset["labels"]
    assert first.train_dataset["pixel_values"] == again.train_dataset["pixel_values"]
    assert first.eval_dataset["pixel_values"] == again.eval_dataset["pixel_values"]
    assert first.train_dataset["pixel_values"] != other.train_dataset["pixel_values"] or (
        first.train_dataset["labels"] != other.train_dataset["labels"]
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: sparse_parity(num_bits=1), "num_bits"),
        (lambda: sparse_parity(num_bits=5, parity_bits=6), "parity_bits"),
        (lambda: sparse_parity(num_train=0), "num_train"),
        (lambda: sparse_parity(num_test=2.5), "num_test"),
        (lambda: sparse_regression(num_nonzero=0), "num_nonzero"),
        (lambda: sparse_regression(num_features=3, num_nonzero=4), "num_nonzero"),
        (lambda: sparse_regression(noise_std=-1.0), "noise_std"),
        (lambda: noisy_digits(noise_fraction=1.0), "noise_fraction"),
        (lambda: noisy_digits(num_train=0), "num_train"),
    ],
)
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_the_tasks_are_registered_for_recipes():
    assert runner.TASKS["sparse_parity"] is sparse_parity
    assert runner.TASKS["sparse_regression"] is sparse_regression
    assert runner.TASKS["noisy_digits"] is noisy_digits


SPARSE_REGRESSION_RECIPE = """\
# purpose: the sparse-regression task through the recipe runner
task:
  name: sparse_regression
  num_features: 20
  num_nonzero: 2
  num_train: 12
  num_test: 200
model:
  architecture: DiagonalLinearNetwork
  in_features: 20
  init_scale: 0.05
target:
  metric: eval_relative_mse
  value: 0.0
  greater_is_better: false
  stop: false
args:
  learning_rate: 0.2
  max_steps: 200
  eval_strategy: steps
  eval_steps: 200
  logging_steps: 200
  save_strategy: 'no'
  report_to: none
  use_cpu: true
  disable_tqdm: true
  per_device_train_batch_size: full
  per_device_eval_batch_size: 200
arms:
  stock:
    trainer: stock
  levy:
    trainer: levy
    num_eigenpairs: 2
    sketch_batch_size: 12
seeds: [0]
"""


def test_a_recipe_trains_sparse_regression_with_the_diagonal_network(tmp_path):
    # 12 examples in 20 dimensions: the zero weights the network starts from predict relative MSE 1, the
    # 2-sparse w* predicts 0; small-initialization gradient descent heads for the sparse interpolator.
    from hf_levy.recipes.recipe import load_recipe

    path = tmp_path / "sparse_regression.yaml"
    path.write_text(SPARSE_REGRESSION_RECIPE)
    recipe = load_recipe(path)
    for arm in ("stock", "levy"):
        summary = runner.train_arm(recipe, arm, tmp_path / "run", seed=0)
        assert summary["final_metric"] < 0.3, (arm, summary["final_metric"])  # 1.0 at the start


def test_a_typo_in_the_diagonal_network_keys_is_refused_at_load(tmp_path):
    from hf_levy.recipes.recipe import RecipeError, load_recipe

    path = tmp_path / "typo.yaml"
    path.write_text(SPARSE_REGRESSION_RECIPE.replace("init_scale: 0.05", "init_scael: 0.05"))
    with pytest.raises(
        RecipeError, match="unknown key 'init_scael' for DiagonalLinearNetwork; did you mean 'init_scale'"
    ):
        load_recipe(path)
