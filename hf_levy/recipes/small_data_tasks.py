"""Small-data tasks without grokking's long plateau, for the batch-gap question.

The question: "does a small batch reach a held-out target in fewer optimizer steps than the full batch?"
(docs/research/task_search.md holds the answers).

- :func:`sparse_parity`: the parity of ``k`` secret bits of ``n`` random ±1 bits (Barak et al. 2022), for the
  MLP of the digits recipe (``MLPClassifier``); the metric is test accuracy on fresh strings.
- :func:`sparse_regression`: ``y = X·w*`` with a ``k``-sparse ``w*`` and fewer examples than features, for a
  diagonal linear network ``w = u⊙u − v⊙v`` (:class:`hf_levy.recipes.models.DiagonalLinearNetwork`;
  Woodworth et al. 2020, Pesme et al. 2021); the metric is the test mean squared error relative to
  ``mean(y²)``.
- :func:`noisy_digits`: scikit-learn's 8×8 digits with a fraction of the training labels replaced by
  another class (label-noise memorization, Zhang et al. 2017); the metric is accuracy on clean test labels.

Inputs are the ``pixel_values`` that :class:`hf_levy.recipes.models.MLPClassifier` takes. Every draw comes
from a ``torch.Generator`` seeded by the task's ``seed``; the global RNG is never touched. Nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import EvalPrediction, default_data_collator

from hf_levy.recipes.tasks import Task, class_accuracy, class_predictions


def _count(name: str, value: object, minimum: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}: e.g. {example}")
    return value


def _at_most(name: str, value: int, bound_name: str, bound: int, example: str) -> None:
    if value > bound:
        raise ValueError(f"{name} must be at most {bound_name}={bound}, got {value!r}: e.g. {example}")


def _features(x: torch.Tensor, labels: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"pixel_values": x.tolist(), "labels": labels.tolist()})


def sparse_parity(
    num_bits: int = 30,
    parity_bits: int = 3,
    num_train: int = 1000,
    num_test: int = 2000,
    seed: int = 0,
) -> Task:
    """Strings of ``num_bits`` uniform ±1 bits labelled by the parity of ``parity_bits`` secret positions.

    The label is 1 when an odd number of the secret bits are −1 (the product of the secret bits is −1), else
    0; the secret positions are a seeded random subset (listed in the description). The train set holds
    ``num_train`` strings, the test set ``num_test`` other fresh draws (the same string can occur in both
    only by chance, with probability ~``num_test·num_train/2**num_bits``). Metric: test accuracy (0.5 is
    chance, the labels are balanced in expectation). Learning it is known to take a plateau of
    ~``num_bits**(parity_bits - 1)`` steps before the features appear, so the curve looks grokking-like.
    """
    _count("num_bits", num_bits, 2, "num_bits=30")
    _count("parity_bits", parity_bits, 1, "parity_bits=3")
    _at_most("parity_bits", parity_bits, "num_bits", num_bits, "parity_bits=3")
    _count("num_train", num_train, 1, "num_train=1000")
    _count("num_test", num_test, 1, "num_test=2000")
    g = torch.Generator().manual_seed(seed)
    secret = torch.randperm(num_bits, generator=g)[:parity_bits].sort().values
    bits = torch.randint(0, 2, (num_train + num_test, num_bits), generator=g).float() * 2 - 1
    labels = (bits[:, secret].prod(dim=1) < 0).long()
    return Task(
        train_dataset=_features(bits[:num_train], labels[:num_train]),
        eval_dataset=_features(bits[num_train:], labels[num_train:]),
        data_collator=default_data_collator,
        compute_metrics=class_accuracy,
        preprocess_logits_for_metrics=class_predictions,
        vocab_size=2,
        description=(
            f"sparse parity: {parity_bits} of {num_bits} ±1 bits (positions {secret.tolist()}), "
            f"{num_train} train / {num_test} test strings (seed={seed})"
        ),
    )


def regression_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's prediction of each example, shape (B,)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.reshape(-1)


def relative_mse(eval_pred: EvalPrediction) -> dict[str, float]:
    """``mean((ŷ − y)²) / mean(y²)``: 1 for the zero predictor, 0 for a perfect one (key ``relative_mse``)."""
    predictions = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1)
    targets = np.asarray(eval_pred.label_ids, dtype=np.float64).reshape(-1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"got {predictions.shape[0]} predictions for {targets.shape[0]} targets: pass "
            "preprocess_logits_for_metrics=task.preprocess_logits_for_metrics to the Trainer"
        )
    return {"relative_mse": float(np.mean((predictions - targets) ** 2) / np.mean(targets**2))}


def sparse_regression(
    num_features: int = 100,
    num_nonzero: int = 5,
    num_train: int = 40,
    num_test: int = 1000,
    noise_std: float = 0.0,
    seed: int = 0,
) -> Task:
    """Sparse linear regression ``y = X·w* (+ noise)``.

    ``X`` is standard normal, ``w*`` has ``num_nonzero`` entries of ±1 (seeded positions and signs) and
    zeros elsewhere.

    With fewer training examples than features, many weight vectors fit the train set exactly and only the
    sparse one generalizes. The train targets carry Gaussian noise of ``noise_std``; the test targets are
    noiseless. Metric: ``relative_mse`` (test MSE over ``mean(y²)``; ``eval_loss`` is the plain test MSE).
    The model is :class:`hf_levy.recipes.models.DiagonalLinearNetwork`.
    """
    _count("num_features", num_features, 1, "num_features=100")
    _count("num_nonzero", num_nonzero, 1, "num_nonzero=5")
    _at_most("num_nonzero", num_nonzero, "num_features", num_features, "num_nonzero=5")
    _count("num_train", num_train, 1, "num_train=40")
    _count("num_test", num_test, 1, "num_test=1000")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}: e.g. noise_std=0.0")
    g = torch.Generator().manual_seed(seed)
    support = torch.randperm(num_features, generator=g)[:num_nonzero]
    w_star = torch.zeros(num_features)
    w_star[support] = torch.randint(0, 2, (num_nonzero,), generator=g).float() * 2 - 1
    x = torch.randn(num_train + num_test, num_features, generator=g)
    y = x @ w_star
    noise = torch.randn(num_train, generator=g) * noise_std
    y_train = y[:num_train] + noise
    return Task(
        train_dataset=_features(x[:num_train], y_train),
        eval_dataset=_features(x[num_train:], y[num_train:]),
        data_collator=default_data_collator,
        compute_metrics=relative_mse,
        preprocess_logits_for_metrics=regression_predictions,
        vocab_size=1,
        description=(
            f"sparse regression: {num_nonzero}-sparse w* in {num_features} dims, {num_train} train / "
            f"{num_test} test examples, train noise std {noise_std} (seed={seed})"
        ),
    )


def noisy_digits(num_train: int = 500, noise_fraction: float = 0.3, seed: int = 0) -> Task:
    """:func:`hf_levy.recipes.tasks.digits` with a share of the training labels flipped; clean test labels.

    ``round(noise_fraction · num_train)`` training labels are replaced by another class, drawn uniformly
    among the other nine (seeded).

    The split is the digits task's for the same ``seed``. Metric: clean test accuracy; a model that
    memorizes the flipped labels loses some of it.
    """
    from hf_levy.recipes.tasks import digits

    if not 0 <= noise_fraction < 1:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction!r}: e.g. noise_fraction=0.3")
    clean = digits(num_train=num_train, seed=seed)
    labels = torch.tensor(clean.train_dataset["labels"])
    g = torch.Generator().manual_seed(seed + 1_000_003)
    flipped = torch.randperm(num_train, generator=g)[: round(noise_fraction * num_train)]
    labels[flipped] = (labels[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    train = clean.train_dataset.remove_columns("labels").add_column("labels", labels.tolist())
    return Task(
        train_dataset=train,
        eval_dataset=clean.eval_dataset,
        data_collator=default_data_collator,
        compute_metrics=class_accuracy,
        preprocess_logits_for_metrics=class_predictions,
        vocab_size=10,
        description=(
            f"sklearn digits, {len(flipped)} of {num_train} train labels flipped (noise_fraction="
            f"{noise_fraction}, seed={seed}); {len(clean.eval_dataset)} clean test images"
        ),
    )
