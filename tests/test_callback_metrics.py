"""The curvature/ metrics of a refresh: the step it was computed at, and seconds that add up."""

from __future__ import annotations

import pytest
from test_callback_wiring import plain_trainer
from trainer_utils import run_levy


def test_each_refresh_is_logged_at_the_step_it_was_computed_at(tmp_path):
    # Refreshes at steps 0 and 3 (training logs at 2, 4, 6): each gets an entry of its own at its step.
    trainer = run_levy(tmp_path, levy_scale=0.5)
    logged = [
        (h["step"], h["curvature/sketch_step"], "loss" in h)
        for h in trainer.state.log_history
        if "curvature/sketch_step" in h
    ]
    assert logged == [(0, 0.0, False), (3, 3.0, False)]


def test_with_callbacks_list_a_refresh_joins_the_next_training_log(tmp_path):
    # No trainer to log through: the refreshes at 0 and 3 ride on the training logs at 2 and 4.
    trainer, _ = plain_trainer(tmp_path / "listed", max_steps=6)
    trainer.train()
    logged = [
        (h["step"], h["curvature/sketch_step"])
        for h in trainer.state.log_history
        if "curvature/sketch_step" in h
    ]
    assert logged == [(2, 0.0), (4, 3.0)]


def test_refresh_seconds_include_the_calibration_and_add_up_to_the_total(tmp_path):
    # Refreshes at 0, 3 and 6 and training logs every 4 steps: two refreshes share the first window, yet
    # each has its own entry, so every refresh's seconds are logged exactly once.
    trainer = run_levy(
        tmp_path,
        max_steps=8,
        logging_steps=4,
        levy_scale=0.5,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
    )
    refreshes = [h for h in trainer.state.log_history if "curvature/sketch_seconds" in h]
    assert [h["step"] for h in refreshes] == [0, 3, 6]
    for h in refreshes:
        assert 0 < h["curvature/calibration_seconds"] < h["curvature/sketch_seconds"]
    total = trainer.state.log_history[-1]["curvature/sketch_seconds_total"]
    assert sum(h["curvature/sketch_seconds"] for h in refreshes) == pytest.approx(total, rel=1e-12)
