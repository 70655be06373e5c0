"""The report's verdict is computed from the summaries."""

from __future__ import annotations

from hf_levy.report import arm_table, capped_warning, verdict


def summary(arm, trainer, batch, steps_to_target, final, basis="hessian", seed=0, epochs=None, seconds=None):
    return {
        "arm": arm, "seed": seed, "trainer": trainer, "global_batch_size": batch, "steps": 500, "levy_alpha": None,
        "levy_noise_basis": basis if trainer == "levy" else None, "steps_to_target": steps_to_target,
        "epochs_to_target": epochs, "seconds_to_target": seconds, "final_metric": final, "best_metric": final,
        "sketch_share": None,
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


def test_report_shows_the_truncation_shares_and_names_the_arms_whose_noise_the_cap_set():
    runs = [
        {
            **summary("capped", "levy", 100, 50, 0.9, seed=0),
            "capped_fraction": 0.75,
            "clipped_fraction": 0.01,
        },
        {
            **summary("capped", "levy", 100, 60, 0.9, seed=1),
            "capped_fraction": 0.45,
            "clipped_fraction": 0.03,
        },
        {**summary("free", "levy", 100, 70, 0.9), "capped_fraction": 0.02, "clipped_fraction": 0.0},
        summary("stock", "stock", 100, 80, 0.9),
    ]
    [paragraph, _] = capped_warning(runs)
    assert "capped (60% of steps)" in paragraph and "free" not in paragraph
    table = arm_table(runs)
    assert table[0].endswith("| capped | clipped |")
    assert table[2].endswith("| 0.6 ± 0.21 | 0.02 ± 0.014 |") and table[4].endswith("| — | — |")
    assert capped_warning(runs[2:]) == []
