"""NoiseTally: the window and run shares of capped steps and clipped draws, and the mean noise sizes."""

from __future__ import annotations

import torch

from hf_levy._noise_tally import NoiseTally
from hf_levy.noise import NoiseDraw


def test_tally_fractions_and_means_over_known_draws():
    tally = NoiseTally()
    coef = torch.zeros(4, dtype=torch.float64)
    # (capped, clipped draws of 4, ‖ξ‖, ‖g‖)
    steps = [(True, 1, 2.0, 2.0), (False, 0, 1.0, 4.0), (True, 3, 3.0, 1.0), (True, 0, 0.5, 0.0)]
    for capped, clipped, noise_norm, grad_norm in steps:
        tally.add(NoiseDraw(coef, clipped, capped), noise_norm, grad_norm)
    metrics = tally.metrics()
    assert metrics["levy/capped_fraction"] == 0.75
    assert metrics["levy/clipped_fraction"] == 4 / 16
    assert metrics["levy/noise_norm"] == (2.0 + 1.0 + 3.0 + 0.5) / 4
    assert metrics["levy/noise_to_grad_ratio"] == (1.0 + 0.25 + 3.0 + 0.0) / 4
    assert NoiseTally().metrics() == {}
