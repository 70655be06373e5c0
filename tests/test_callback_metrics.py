"""The curvature/ metrics of a refresh: the step it was computed at, and seconds that add up."""

from __future__ import annotations

import pytest
from trainer_utils import run_levy


def test_each_logged_refresh_names_the_step_it_was_computed_at(tmp_path):
    # Refreshes at steps 0 and 3 are logged at the next logging steps, 2 and 4.
    trainer = run_levy(tmp_path, levy_scale=0.5)
    logged = [
        (h["step"], h["curvature/sketch_step"])
        for h in trainer.state.log_history
        if "curvature/sketch_step" in h
    ]
    assert logged == [(2, 0.0), (4, 3.0)]


def test_refresh_seconds_include_the_calibration_and_add_up_to_the_total(tmp_path):
    # Every logging window holds at most one refresh, so every refresh's seconds are logged exactly once.
    trainer = run_levy(tmp_path, levy_scale=0.5, levy_virtual_batch_size=2, calibration_num_microbatches=32)
    refreshes = [h for h in trainer.state.log_history if "curvature/sketch_seconds" in h]
    assert len(refreshes) == 2
    for h in refreshes:
        assert 0 < h["curvature/calibration_seconds"] < h["curvature/sketch_seconds"]
    total = trainer.state.log_history[-1]["curvature/sketch_seconds_total"]
    assert sum(h["curvature/sketch_seconds"] for h in refreshes) == pytest.approx(total, rel=1e-12)
    assert refreshes[-1]["curvature/sketch_seconds_total"] == pytest.approx(total, rel=1e-12)
