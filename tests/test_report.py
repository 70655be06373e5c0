"""The report's verdict is computed from the summaries."""

from __future__ import annotations

from hf_levy.report import verdict


def summary(arm, trainer, batch, steps_to_target, final, basis="hessian", seed=0, epochs=None, seconds=None):
    return {
        "arm": arm, "seed": seed, "trainer": trainer, "global_batch_size": batch, "steps": 500,
        "levy_noise_basis": basis if trainer == "levy" else None, "steps_to_target": steps_to_target,
        "epochs_to_target": epochs, "seconds_to_target": seconds, "final_metric": final,
    }  # fmt: skip


def test_verdict_names_the_winner_and_the_ratio():
    text = verdict(
        [
            summary("levy", "levy", 1000, 200, 0.97, epochs=200, seconds=50.0),
            summary("full", "stock", 1000, 400, 0.96),
            summary("small", "stock", 64, 3000, 0.98, epochs=192, seconds=80.0),
        ],
        "eval_accuracy",
        0.95,
    )
    assert "LevyTrainer (levy) reached eval_accuracy ≥ 0.95 in 200 steps" in text
    assert "2.00x fewer steps" in text
    assert "200 epochs for levy vs 192 epochs for small" in text
    assert "0.97 (levy), 0.96 (full), 0.98 (small)" in text


def test_verdict_reports_an_arm_that_never_reached_the_target_and_lower_is_better():
    text = verdict(
        [summary("levy", "levy", 256, None, 2.5), summary("big", "stock", 256, 100, 2.1)],
        "eval_loss",
        2.2,
        greater_is_better=False,
    )
    assert "did not reach eval_loss ≤ 2.2 in 1 of 1 seeds" in text
    assert "Stock reached the target and LevyTrainer did not." in text
