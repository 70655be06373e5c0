"""levy/gradient_noise_scale in LevyTrainer's logs, against the ratio of moving averages computed by hand.

Ground truth: the float64 linear regression of tests/distributed/minibatch_train.py (six examples, B = 6 per
optimizer step, plain SGD), whose gradients are written in closed form. Each step's small batch S (b = 2) is
found independently of the library: where the 'minibatch' noise is injected at levy_scale 1, the optimizer
saw exactly g_S, so S is the one 2-subset whose closed-form gradient equals the step; where the measurement
costs an extra gradient (levy_scale 0, the Hessian basis), S is redrawn with hf_levy.minibatch's functions
from the micro-batches a recording collator saw. Then ‖G_S‖², ‖G‖² → the two-batch estimates (McCandlish et
al. 2018, App. A, with the finite-population correction of batches drawn without replacement, written out
here) → EMAs with β = 0.95 → their ratio, logged at every step.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from test_minibatch_trainer import X, Y, check_every_step, gradient
from transformers import default_data_collator

from hf_levy import _rng
from hf_levy._rng import step_generator
from hf_levy.minibatch import subbatch_rows

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distributed"))
from minibatch_train import train  # noqa: E402

KEY = "levy/gradient_noise_scale"
BETA, SMALL, BIG, N = 0.95, 2, 6, 6  # the step's batch is the whole training set


def expected_log(weights: list[torch.Tensor], subsets: list[tuple[int, ...]], every: int = 1) -> list:
    """The value logged after each step (None: nothing logged), from the weights before each step and the
    small batches of the steps that measured (every ``every``-th from step 0)."""
    square_norm_ema = trace_ema = 0.0
    logged = []
    for step, w in enumerate(weights):
        if step % every == 0:
            small = float(gradient(w, list(subsets[step // every])).square().sum())
            big = float(gradient(w, list(range(BIG))).square().sum())
            # Without replacement from the N = 6 examples: E‖g_n‖² = ‖G‖² + tr(Σ)·(N − n)/(n(N − 1)).
            u_small, u_big = ((N - n) / (n * (N - 1)) for n in (SMALL, BIG))
            square_norm = (u_small * big - u_big * small) / (
                u_small - u_big
            )  # = big: a full batch has no noise
            trace = (small - big) / (u_small - u_big)
            square_norm_ema = BETA * square_norm_ema + (1 - BETA) * square_norm
            trace_ema = BETA * trace_ema + (1 - BETA) * trace
        logged.append(trace_ema / square_norm_ema if square_norm_ema > 0 else None)
    return logged


def logged(trainer) -> list:
    return [h.get(KEY) for h in trainer.state.log_history if "loss" in h]


class RecordingCollator:
    """default_data_collator that remembers which examples (rows of X) each micro-batch held, in order. The
    sketch batch (all six examples) goes through it too, and is left out."""

    def __init__(self):
        self.examples: list[list[int]] = []

    def __call__(self, features):
        batch = default_data_collator(features)
        if len(features) == 3:
            self.examples.append([int(torch.nonzero((X == x.double()).all(1))[0]) for x in batch["x"]])
        return batch


def redrawn_subsets(collator: RecordingCollator, steps: list[int], seed: int = 0) -> list[tuple[int, ...]]:
    """The sub-batch each of ``steps`` drew: two micro-batches of three per step, rows by the step's stream."""
    subsets = []
    for step in steps:
        micro = collator.examples[2 * step : 2 * step + 2]
        rows = subbatch_rows([len(m) for m in micro], SMALL, step_generator(seed + _rng.MINIBATCH, step))
        subsets.append(
            tuple(sorted(m[int(r)] for m, picked in zip(micro, rows, strict=True) for r in picked))
        )
    return subsets


def assert_logs(actual: list, expected: list) -> None:
    assert [a is None for a in actual] == [e is None for e in expected], (actual, expected)
    assert any(e is not None for e in expected)
    for a, e in zip(actual, expected, strict=True):
        if e is not None:
            assert a == pytest.approx(e, rel=1e-9), (actual, expected)


def test_free_with_the_minibatch_noise_it_is_the_ratio_of_moving_averages_of_the_drawn_sub_batches(tmp_path):
    trainer, recorder = train(str(tmp_path), max_steps=8)  # levy_scale 1: the optimizer sees g_S
    subsets = check_every_step(recorder, SMALL, lambda g, g_s: g_s)
    assert_logs(logged(trainer), expected_log(recorder.before, subsets))


def test_at_scale_zero_an_extra_sub_batch_gradient_measures_it_and_training_is_unchanged(tmp_path):
    collator = RecordingCollator()
    trainer, recorder = train(
        str(tmp_path / "on"),
        collator=collator,
        max_steps=6,
        levy_scale=0.0,
        gradient_noise_scale_every_n_steps=1,
    )
    assert_logs(logged(trainer), expected_log(recorder.before, redrawn_subsets(collator, list(range(6)))))
    off, _ = train(str(tmp_path / "off"), max_steps=6, levy_scale=0.0)
    assert torch.equal(trainer.model.w, off.model.w)
    assert KEY not in {k for h in off.state.log_history for k in h}  # None: not free at scale 0, so off


def test_with_the_hessian_noise_it_is_measured_every_n_steps_before_the_noise(tmp_path):
    collator = RecordingCollator()
    trainer, recorder = train(
        str(tmp_path),
        collator=collator,
        max_steps=6,
        levy_noise_basis="hessian",
        levy_scale=0.5,
        gradient_noise_scale_every_n_steps=2,
    )
    expected = expected_log(recorder.before, redrawn_subsets(collator, [0, 2, 4]), every=2)
    assert_logs(logged(trainer), expected)


def test_zero_turns_it_off_even_where_it_is_free(tmp_path):
    trainer, _ = train(str(tmp_path), max_steps=2, gradient_noise_scale_every_n_steps=0)
    assert KEY not in {k for h in trainer.state.log_history for k in h}


def test_a_resumed_run_logs_what_the_uninterrupted_one_logged(tmp_path):
    """The moving averages are in the checkpoint: without them the resumed run would restart them."""
    settings = dict(max_steps=8, save_strategy="steps", save_steps=4)
    full, _ = train(str(tmp_path / "full"), **settings)
    resumed, _ = train(str(tmp_path / "resumed"), resume=str(tmp_path / "full" / "checkpoint-4"), **settings)
    after = [h.get(KEY) for h in resumed.state.log_history if "loss" in h and h["step"] > 4]
    assert after == logged(full)[4:]  # None where the averaged ‖G‖² fell to <= 0 near the minimum, in both
    assert after[0] is not None
    assert resumed.levy_callback.run.noise_scale.steps == 8


def test_it_needs_levy_noise_batch_size_and_a_count_of_steps():
    from hf_levy import LevyConfig

    with pytest.raises(
        ValueError, match="levy_noise_batch_size must be set with gradient_noise_scale_every_n_steps=4"
    ):
        LevyConfig("out", gradient_noise_scale_every_n_steps=4)
    with pytest.raises(
        ValueError, match="gradient_noise_scale_every_n_steps must be None or an integer >= 0"
    ):
        LevyConfig("out", gradient_noise_scale_every_n_steps=-1)


def test_the_small_batch_must_be_smaller_than_the_step_batch(tmp_path):
    with pytest.raises(
        ValueError, match="levy_noise_batch_size=6 \\(the small batch of gradient_noise_scale"
    ):
        train(
            str(tmp_path),
            levy_noise_basis="hessian",
            levy_noise_batch_size=6,
            gradient_noise_scale_every_n_steps=1,
        )


def test_a_plain_callback_is_refused_since_no_event_carries_the_step_batch(tmp_path):
    from datasets import Dataset
    from minibatch_train import Regression
    from transformers import Trainer, TrainingArguments

    from hf_levy import LevyArguments, LevyCallback

    levy = LevyArguments(levy_noise_batch_size=2, gradient_noise_scale_every_n_steps=1)
    trainer = Trainer(
        model=Regression(),
        args=TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to="none"),
        train_dataset=Dataset.from_dict({"x": X.tolist(), "labels": Y.tolist()}),
        data_collator=default_data_collator,
        callbacks=[LevyCallback(levy)],
    )
    with pytest.raises(ValueError, match="gradient_noise_scale_every_n_steps=1 draws its sub-batch"):
        trainer.train()


@pytest.mark.slow
def test_under_ddp_both_ranks_log_the_ratio_of_moving_averages_of_the_sub_batches_drawn_across_ranks(
    tmp_path,
):
    """Two gloo ranks of three examples, one sub-batch example each: ‖g_b‖² of the averaged shares, ‖g‖² of the
    all-reduced gradient, the same ground truth as on one process, on both ranks."""
    from test_distributed import torchrun

    fields = '{"gradient_accumulation_steps": 1, "max_steps": 6, "ddp_backend": "gloo"}'
    ranks = torchrun(
        tmp_path,
        "--fields",
        fields,
        script=pathlib.Path(__file__).parent / "distributed" / "minibatch_train.py",
    )
    recorder = type("R", (), {"before": ranks[0]["before"], "after": ranks[0]["after"]})
    subsets = check_every_step(recorder, SMALL, lambda g, g_s: g_s)
    expected = expected_log(recorder.before, subsets)
    for rank in ranks:
        assert_logs([h.get(KEY) for h in rank["log"] if "loss" in h], expected)


def test_deepspeed_is_refused_naming_the_setting():
    from minibatch_train import Regression

    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run

    class DeepSpeedZeroOptimizer:  # what hf_levy._zero_space.uses_deepspeed recognises by name
        pass

    levy = LevyArguments(levy_noise_batch_size=2, gradient_noise_scale_every_n_steps=1)
    with pytest.raises(ValueError, match="gradient_noise_scale_every_n_steps=1 needs a second backward"):
        start_run(levy, None, Regression(), None, DeepSpeedZeroOptimizer())
