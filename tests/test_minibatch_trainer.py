"""LevyTrainer with the real sub-batch noise ('minibatch', 'minibatch_topk'): on a linear regression small
enough to enumerate its sub-batches, the gradient the optimizer saw is g + κ(g_S − g) for a drawn sub-batch S,
with g and g_S in closed form (and the top-K projector from a dense eigendecomposition)."""

from __future__ import annotations

import itertools
import math
import pathlib
import sys

import pytest
import torch
from test_distributed import torchrun
from trainer_utils import flat_params, run_levy, run_stock

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distributed"))
from minibatch_train import LEARNING_RATE, regression_data, train  # noqa: E402

X, Y = regression_data()


def gradient(w: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """∇ of the mean squared error over ``rows``, (2/|S|) X_Sᵀ(X_S w − y_S)."""
    x, y = X[rows], Y[rows]
    return 2 * x.T @ (x @ w - y) / len(rows)


def seen_gradients(before, after) -> list[torch.Tensor]:
    return [(b - a) / LEARNING_RATE for b, a in zip(before, after, strict=True)]


def matching_subsets(w, seen, size, law) -> list[tuple[int, ...]]:
    """The sub-batches S of ``size`` examples for which ``law(g, g_S)`` is the gradient the optimizer saw."""
    g = gradient(w, list(range(len(Y))))
    return [
        s
        for s in itertools.combinations(range(len(Y)), size)
        if torch.allclose(law(g, gradient(w, list(s))), seen, rtol=1e-9, atol=1e-12)
    ]


def check_every_step(recorder, size, law) -> list[tuple[int, ...]]:
    """Each step matches exactly one sub-batch; returns them."""
    found = []
    for w, seen in zip(recorder.before, seen_gradients(recorder.before, recorder.after), strict=True):
        matches = matching_subsets(w, seen, size, law)
        assert len(matches) == 1, f"step gradient {seen.tolist()} matches sub-batches {matches}"
        found.append(matches[0])
    return found


def test_the_optimizer_sees_the_gradient_of_a_drawn_sub_batch_at_scale_one(tmp_path):
    _, recorder = train(str(tmp_path))
    found = check_every_step(recorder, 2, lambda g, g_s: g_s)
    assert len(set(found)) > 1  # a new draw each step


def test_kappa_rescales_the_sub_batch_noise_to_the_virtual_batch(tmp_path):
    kappa = math.sqrt((1 / 3 - 1 / 6) / (1 / 2 - 1 / 6))  # b' = 3, b = 2, B = 6
    _, recorder = train(str(tmp_path), levy_virtual_batch_size=3, levy_scale=1.0)
    check_every_step(recorder, 2, lambda g, g_s: g + kappa * (g_s - g))
    _, half = train(str(tmp_path / "half"), levy_scale=0.5)
    check_every_step(half, 2, lambda g, g_s: g + 0.5 * (g_s - g))


def test_clipping_shrinks_the_sub_batch_gradient_by_the_full_batch_factor(tmp_path):
    """max_grad_norm binding on every step: the optimizer sees r·(g + κ(g_S − g)), r = max/(‖g‖ + 1e-6)."""
    limit = 1e-3

    def law(g, g_s):
        return limit / (float(g.norm()) + 1e-6) * (g + 0.5 * (g_s - g))

    _, recorder = train(str(tmp_path), max_grad_norm=limit, levy_scale=0.5)
    check_every_step(recorder, 2, law)


def test_minibatch_topk_adds_the_projection_on_the_top_eigenvectors_and_logs_its_share(tmp_path):
    hessian = (
        2 * X.T @ X / len(Y)
    )  # the loss is quadratic: the sketch batch (all six examples) has this Hessian
    vectors = torch.linalg.eigh(hessian).eigenvectors[:, -2:]
    projector = vectors @ vectors.T
    trainer, recorder = train(str(tmp_path), levy_noise_basis="minibatch_topk")
    found = check_every_step(recorder, 2, lambda g, g_s: g + projector @ (g_s - g))
    shares = [h["levy/topk_noise_share"] for h in trainer.state.log_history if "levy/topk_noise_share" in h]
    expected = []
    for w, s in zip(recorder.before, found, strict=True):
        d = gradient(w, list(s)) - gradient(w, list(range(len(Y))))
        expected.append(float((projector @ d).square().sum() / d.square().sum()))
    assert shares == pytest.approx(expected, rel=1e-6)


def test_minibatch_runs_no_sketch_and_logs_the_noise_ratio(tmp_path):
    trainer, recorder = train(str(tmp_path), levy_scale=1.0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert not any(key.startswith("curvature/") for h in trainer.state.log_history for key in h)
    assert trainer.levy_callback.run.sketch.ready is False
    ratios = [h["levy/noise_to_grad_ratio"] for h in logs]
    seen = seen_gradients(recorder.before, recorder.after)
    for ratio, w, g_final in zip(ratios, recorder.before, seen, strict=True):
        g = gradient(w, list(range(len(Y))))
        assert ratio == pytest.approx(float((g_final - g).norm() / g.norm()), rel=1e-9)
    assert "levy/alpha" not in logs[0]  # no α-stable law in this noise


def test_scale_zero_is_the_stock_trainer_bit_for_bit(tmp_path):
    levy = run_levy(tmp_path, levy_noise_basis="minibatch", levy_noise_batch_size=4, levy_scale=0.0)
    stock = run_stock(tmp_path)
    assert torch.equal(flat_params(levy), flat_params(stock))
    topk = run_levy(
        tmp_path, name="topk", levy_noise_basis="minibatch_topk", levy_noise_batch_size=4, levy_scale=0
    )
    assert torch.equal(flat_params(topk), flat_params(stock))


def test_the_sub_batch_must_be_smaller_than_the_step_batch(tmp_path):
    with pytest.raises(
        ValueError, match="levy_noise_batch_size=6 must be >= 1 and smaller than the 6 examples"
    ):
        train(str(tmp_path), levy_noise_batch_size=6)


def test_the_minibatch_bases_need_levy_noise_batch_size():
    from hf_levy import LevyConfig

    with pytest.raises(
        ValueError, match="levy_noise_batch_size must be set with levy_noise_basis='minibatch'"
    ):
        LevyConfig("out", levy_noise_basis="minibatch")
    with pytest.raises(ValueError, match="levy_noise_batch_size must be None or an integer >= 1, got 0"):
        LevyConfig("out", levy_noise_batch_size=0)


def test_a_plain_callback_is_refused_since_no_event_carries_the_step_batch(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_levy import LevyArguments, LevyCallback

    x, y = regression_data()
    from minibatch_train import Regression

    trainer = Trainer(
        model=Regression(),
        args=TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to="none", max_grad_norm=0.0),
        train_dataset=Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}),
        data_collator=default_data_collator,
        callbacks=[LevyCallback(LevyArguments(levy_noise_basis="minibatch", levy_noise_batch_size=2))],
    )
    with pytest.raises(ValueError, match="draws its sub-batch from each optimizer step's batch"):
        trainer.train()


@pytest.mark.slow
def test_under_ddp_every_rank_adds_the_same_noise_of_a_sub_batch_drawn_across_ranks(tmp_path):
    """Two gloo ranks, three examples each, one sub-batch example from each rank: the ranks agree, and the
    step is the gradient of some two-example sub-batch of the six (the ranks' shares averaged)."""
    fields = '{"gradient_accumulation_steps": 1, "max_steps": 3, "ddp_backend": "gloo"}'
    ranks = torchrun(
        tmp_path,
        "--fields",
        fields,
        script=pathlib.Path(__file__).parent / "distributed" / "minibatch_train.py",
    )
    for a, b in zip(ranks[0]["after"], ranks[1]["after"], strict=True):
        assert torch.equal(a, b)
    recorder = type("R", (), {"before": ranks[0]["before"], "after": ranks[0]["after"]})
    check_every_step(recorder, 2, lambda g, g_s: g_s)


def test_a_resumed_minibatch_run_equals_the_uninterrupted_one(tmp_path):
    """No sketch to save: the state file holds the schedule and the run's tally, and the sub-batches are
    redrawn from the step, so the resumed run draws what the uninterrupted one drew."""
    settings = dict(
        levy_noise_basis="minibatch", levy_noise_batch_size=4, save_strategy="steps", save_steps=3
    )
    full = run_levy(tmp_path, name="full", **settings)
    resumed = run_levy(tmp_path, name="resumed", resume=str(tmp_path / "full" / "checkpoint-3"), **settings)
    assert torch.equal(flat_params(full), flat_params(resumed))
    assert resumed.levy_callback.run.noise_total.steps == 6
