"""What LevyCallback tells the user when the run departs from what the settings ask."""

from __future__ import annotations

import logging
import warnings

import torch
from test_callback_wiring import plain_trainer
from test_run_setup import _args, _loader
from trainer_utils import SKETCH, flat_params, run_stock

from hf_levy import LevyArguments, LevyCallback
from hf_levy._run_setup import start_run
from hf_levy.sketch import SketchDiscardedWarning


def nan_loss(model, batch):
    """The sketch's loss is NaN (as a model whose eval-mode forward overflows), training's is not."""
    return model(**batch).loss * float("nan")


def test_a_sketch_that_always_fails_warns_once_counts_and_retries_at_the_period(tmp_path, caplog):
    callback = LevyCallback(LevyArguments(**SKETCH, levy_scale=0.5), loss_fn=nan_loss)
    trainer, _ = plain_trainer(tmp_path / "failing", levy=callback, max_steps=8)
    with (
        caplog.at_level(logging.WARNING, logger="hf_levy._run"),
        warnings.catch_warnings(record=True) as w,
    ):
        warnings.simplefilter("always")
        trainer.train()
    # Refreshes at steps 0, 3 and 6 (the period), not at every step; logs at 2, 4, 6 (before step 6's), 8.
    windows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["curvature/failed_refreshes"] for h in windows] == [1.0, 2.0, 2.0, 3.0]
    assert trainer.state.log_history[-1]["curvature/failed_refreshes"] == 3.0  # in the run summary too
    failed = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert len(failed) == 1
    assert {r.name for r in caplog.records if "failed (" in r.getMessage()} == {"hf_levy._run"}
    assert "step 0" in failed[0] and "non-finite" in failed[0] and "no noise is added" in failed[0]
    assert not [x for x in w if issubclass(x.category, SketchDiscardedWarning)]
    assert callback.noise_draws == 0
    assert torch.equal(flat_params(trainer), flat_params(run_stock(tmp_path, max_steps=8)))


def test_num_eigenpairs_above_the_trainable_parameters_is_lowered_with_a_warning(caplog):
    model = torch.nn.Linear(3, 2)  # 8 trainable parameters
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=20, lanczos_num_iters=24)
    with caplog.at_level(logging.WARNING):
        run = start_run(levy, _args(), model, _loader())
    assert run.sketch.settings.num_eigenpairs == 8
    warned = [r.getMessage() for r in caplog.records if "num_eigenpairs=20" in r.getMessage()]
    assert len(warned) == 1 and "exceeds the 8 trainable parameters" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        start_run(LevyArguments(sketch_batch_size=4, num_eigenpairs=8), _args(), model, _loader())
    assert not [r for r in caplog.records if "num_eigenpairs" in r.getMessage()]


def test_the_cap_warning_counts_the_whole_run_and_needs_more_than_half_of_its_steps(caplog):
    from hf_levy.noise import NoiseDraw

    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_max_noise_ratio=2.0)
    coef = torch.zeros(2, dtype=torch.float64)

    def steps(run, capped_flags):
        for capped in capped_flags:
            for tally in (run.noise_window, run.noise_total):
                tally.add(NoiseDraw(coef, 0, capped), 1.0, 1.0)

    def warnings_after(run):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_levy._run"):
            run.warn_if_mostly_capped()
        return [r.getMessage() for r in caplog.records if "hit the cap" in r.getMessage()]

    half = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    steps(half, [True, False, True, False])
    assert warnings_after(half) == []  # exactly half: not more than half
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    steps(run, [True, True, True])
    run.log_metrics(summary=False, alpha=1.5)  # a log: the window starts afresh, the run's count goes on
    steps(run, [False, False])
    [message] = warnings_after(run)
    assert "levy_max_noise_ratio=2 x ||g|| on 3 of 5 steps (60%)" in message
    assert warnings_after(run) == []  # once per run
