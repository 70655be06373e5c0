"""hf_levy.recipes.tasks: the modular-addition data, its metric, and models built from config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_levy.recipes.models import build_model
from hf_levy.recipes.tasks import modular_addition

TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)


def pairs(dataset) -> list[tuple[int, int]]:
    return [(row[0], row[1]) for row in dataset["input_ids"]]


def test_every_pair_appears_once_with_the_right_answer_and_only_the_answer_labelled():
    p = 11
    task = modular_addition(p, train_fraction=0.4, seed=3)
    rows = list(task.train_dataset) + list(task.eval_dataset)
    assert sorted((r["input_ids"][0], r["input_ids"][1]) for r in rows) == [
        (a, b) for a in range(p) for b in range(p)
    ]
    for r in rows:
        a, b, eq, c = r["input_ids"]
        assert eq == p
        assert c == (a + b) % p == int(np.remainder(a + b, p))  # recomputed apart from the module
        assert r["labels"] == [-100, -100, -100, c]
    assert task.vocab_size == p + 1


@pytest.mark.parametrize(("p", "fraction"), [(7, 0.3), (13, 0.5), (23, 0.9)])
def test_splits_are_disjoint_and_of_the_requested_size(p, fraction):
    task = modular_addition(p, fraction, seed=0)
    train, test = set(pairs(task.train_dataset)), set(pairs(task.eval_dataset))
    assert len(task.train_dataset) == len(train) == round(fraction * p * p)
    assert len(task.eval_dataset) == len(test) == p * p - round(fraction * p * p)
    assert not train & test


def test_the_split_depends_on_the_seed_only_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first, again = modular_addition(13, 0.3, seed=5), modular_addition(13, 0.3, seed=5)
    other = modular_addition(13, 0.3, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.train_dataset["input_ids"] == again.train_dataset["input_ids"]
    assert first.eval_dataset["input_ids"] == again.eval_dataset["input_ids"]
    assert set(pairs(first.train_dataset)) != set(pairs(other.train_dataset))


def test_accuracy_counts_exactly():
    task = modular_addition(7, 0.5, seed=0)
    labels = np.array(task.eval_dataset["labels"])
    answers = labels[:, -1]
    perfect = task.compute_metrics(EvalPrediction(predictions=answers.copy(), label_ids=labels))
    assert perfect == {"accuracy": 1.0}
    constant = task.compute_metrics(EvalPrediction(predictions=np.full_like(answers, 3), label_ids=labels))
    assert constant["accuracy"] == pytest.approx(np.count_nonzero(answers == 3) / len(answers), abs=0)
    wrong = task.compute_metrics(EvalPrediction(predictions=(answers + 1) % 7, label_ids=labels))
    assert wrong == {"accuracy": 0.0}


def test_preprocess_keeps_the_argmax_at_the_eq_position():
    logits = torch.zeros(3, 4, 8)
    logits[:, 2, :] = torch.nn.functional.one_hot(torch.tensor([5, 0, 7]), 8).float()
    logits[:, 3, 1] = 10.0  # the answer position's own logit predicts beyond the sequence: ignored
    logits[:, 1, 2] = 10.0
    task = modular_addition(7, 0.5)
    assert task.preprocess_logits_for_metrics(logits, None).tolist() == [5, 0, 7]
    assert task.preprocess_logits_for_metrics((logits, "past"), None).tolist() == [5, 0, 7]


def test_the_model_loss_is_the_cross_entropy_of_the_answer_alone():
    task = modular_addition(7, 0.5, seed=0)
    model = build_model(vocab_size=task.vocab_size, seed=1, **TINY)
    batch = task.data_collator([task.train_dataset[i] for i in range(10)])
    out = model(**batch)
    manual = F.cross_entropy(out.logits[:, 2].float(), batch["input_ids"][:, 3])
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=0)


def test_trainer_evaluate_reports_the_accuracy_of_the_answer_argmax(tmp_path):
    task = modular_addition(7, 0.5, seed=0)
    model = build_model(vocab_size=task.vocab_size, seed=0, **TINY)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=16, use_cpu=True, report_to="none"
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=task.eval_dataset,
        data_collator=task.data_collator,
        compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
    )
    accuracy = trainer.evaluate()["eval_accuracy"]
    batch = task.data_collator(list(task.eval_dataset))
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"]).logits[:, 2].argmax(-1)
    assert accuracy == pytest.approx(
        (predicted == batch["input_ids"][:, 3]).double().mean().item(), abs=1e-12
    )


def test_build_model_is_seeded_eager_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model(vocab_size=8, seed=0, **TINY)
    b = build_model(vocab_size=8, seed=0, **TINY)
    c = build_model(vocab_size=8, seed=1, **TINY)
    assert torch.equal(torch.get_rng_state(), state)
    flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in (a, b, c)]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])
    assert a.config._attn_implementation == "eager"
    assert (a.config.hidden_size, a.config.vocab_size, a.config.num_hidden_layers) == (16, 8, 1)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: modular_addition(1), ["modulus", "1"]),
        (lambda: modular_addition(7.5), ["modulus", "7.5"]),
        (lambda: modular_addition(7, 0.0), ["train_fraction", "0.0"]),
        (lambda: modular_addition(7, 1.5), ["train_fraction", "1.5"]),
        (lambda: modular_addition(3, 0.01), ["train_fraction=0.01", "0 for training"]),
        (lambda: build_model("NoSuchModel", vocab_size=8), ["NoSuchModel", "LlamaForCausalLM"]),
        (lambda: build_model("LlamaConfig", vocab_size=8), ["LlamaConfig"]),
        (lambda: build_model(hidden_size=8), ["vocab_size", "task.vocab_size"]),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for word in words:
        assert word in str(err.value)
