"""The report's verdict is computed from the summaries."""

from __future__ import annotations

from hf_levy.recipes.report import alpha_study, arm_table, calibrated_arms, capped_warning, verdict


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


def study(alpha, scale, steps, capped=0.0):
    return [
        {**summary(f"s{scale}_a{alpha}", "levy", 100, x, 0.9, seed=i), "levy_alpha": alpha, "levy_scale": scale,
         "capped_fraction": capped, "clipped_fraction": 0.0}
        for i, x in enumerate(steps)
    ]  # fmt: skip


def test_alpha_study_says_faster_only_when_every_seed_beats_every_gaussian_seed():
    runs = [
        *study(2.0, 1.0, [600, 700, 650]),
        *study(1.5, 1.0, [500, 590, 550]),  # every seed faster than 600
        *study(1.2, 1.0, [500, 600, 550]),  # ties with the fastest Gaussian seed: within the spread
        *study(2.0, 0.3, [900, 950, None]),  # a seed that missed counts as slowest
        *study(1.8, 0.3, [1000, 1100, 1200], capped=0.2),
    ]
    text = "\n".join(alpha_study(runs))
    assert (
        "| 1 | 1.5 | 3/3 | 500, 590, 550 | 547 ± 45 | — | 0 ± 0 | 0 ± 0 | faster beyond the seed spread |"
        in text
    )
    assert "| 1 | 1.2 | 3/3 | 500, 600, 550 | 550 ± 50 | — | 0 ± 0 | 0 ± 0 | within the seed spread |" in text
    assert "| 0.3 | 2 | 2/3 | 900, 950, — |" in text
    assert (
        "| 0.3 | 1.8 | 3/3 | 1000, 1100, 1200 | 1.1e+03 ± 1e+02 | — | 0.2 ± 0 | 0 ± 0 | within the seed spread |"
        in text
    )
    assert "Yes: α = 1.5 at levy_scale 1 reached" in text
    assert "Confounded:" in text and "α = 1.8 at levy_scale 0.3" in text


def test_alpha_study_answers_no_and_needs_a_gaussian_reference():
    runs = [*study(2.0, 1.0, [600, 700]), *study(1.5, 1.0, [800, 900])]
    text = "\n".join(alpha_study(runs))
    assert "slower beyond the seed spread" in text and "No: at every noise level" in text
    assert "Confounded" not in text
    assert alpha_study(study(1.5, 1.0, [1, 2]) + study(1.2, 1.0, [1, 2])) == []


def test_calibrated_arms_table_lists_k_steps_ratio_and_variance_share():
    runs = [
        summary("stock_small", "stock", 128, 800, 0.95),
        *[
            {**summary("calibrated_k16", "levy", 1044, x, 0.95, seed=i), "num_eigenpairs": 16,
             "levy_virtual_batch_size": 128, "noise_to_grad_ratio": r, "noise_variance_share": 0.3}
            for i, (x, r) in enumerate([(1200, 0.2), (None, 0.4)])
        ],
    ]  # fmt: skip
    lines = calibrated_arms(runs)
    assert "| stock_small | 128 | — | — | 1/1 | 800 | — | — |" in lines
    assert "| calibrated_k16 | 1044 | 128 | 16 | 1/2 | 1200, — | 0.3 ± 0.14 | 0.3 ± 0 |" in lines
    assert calibrated_arms([summary("stock_small", "stock", 128, 800, 0.95)]) == []


def seeds(arm, trainer, batch, steps_per_seed, final=0.9):
    return [summary(arm, trainer, batch, x, final, seed=i) for i, x in enumerate(steps_per_seed)]


def test_an_arm_where_only_some_seeds_reached_the_target_is_not_reached():
    # Stock missed on seed 1 (ran 500 steps): not "reached in 400 steps", and no ratio of the seeds that did.
    text = verdict([*seeds("levy", "levy", 1000, [200, 210]), *seeds("full", "stock", 1000, [400, None])],
                   "eval_accuracy", 0.95)  # fmt: skip
    assert (
        "the stock Trainer (full) did not reach eval_accuracy ≥ 0.95 in 1 of 2 seeds (up to 500 steps)"
        in text
    )
    assert "LevyTrainer needed fewer steps than stock at the same batch size on every seed" in text
    assert "2.00x (seed 0), >2.38x (seed 1)" in text and "x fewer" not in text
    # LevyTrainer missed on seed 1, where stock reached the target: faster on one seed, slower on the other.
    text = verdict([*seeds("levy", "levy", 1000, [200, None]), *seeds("full", "stock", 1000, [400, 400])],
                   "eval_accuracy", 0.95)  # fmt: skip
    assert "LevyTrainer (levy) did not reach eval_accuracy ≥ 0.95 in 1 of 2 seeds" in text
    assert "No every-seed difference in steps" in text and "2.00x (seed 0), <0.80x (seed 1)" in text


def test_fewer_steps_are_claimed_only_when_every_seed_agrees_and_the_factor_is_the_median_ratio():
    stock = seeds("full", "stock", 1000, [400, 400, 400])
    # Ratios 2, 1.33 and 0.8: the means (333 vs 400) would say 1.2x fewer; seed 2 says more.
    text = verdict([*seeds("levy", "levy", 1000, [200, 300, 500]), *stock], "eval_accuracy", 0.95)
    assert "fewer steps" not in text and "more steps" not in text
    assert "per seed: 2.00x (seed 0), 1.33x (seed 1), 0.80x (seed 2)" in text
    # Ratios 2, 1.6 and 4, every one above 1: the median ratio is 2 (the means would say 2.18x).
    text = verdict([*seeds("levy", "levy", 1000, [200, 250, 100]), *stock], "eval_accuracy", 0.95)
    assert (
        "LevyTrainer needed 2.00x fewer steps than stock at the same batch size (median; fewer on every seed"
        in text
    )
    assert "reached eval_accuracy ≥ 0.95 on every seed, in 200 steps (median; seeds: 200, 250, 100)" in text


def test_a_learning_rate_grid_counts_as_its_best_point_by_median_steps():
    # Medians 3100, 1000 and >500 (seed 0 missed): the x1 point is the small-batch target.
    runs = [
        *seeds("levy", "levy", 1000, [500, 500]),
        *seeds("full", "stock", 1000, [900, 900]),
        *seeds("small_lr_x0_5", "stock", 64, [3000, 3200]),
        *seeds("small_lr_x1", "stock", 64, [900, 1100]),
        *seeds("small_lr_x2", "stock", 64, [None, 800]),
    ]
    text = verdict(runs, "eval_accuracy", 0.95)
    assert (
        "The small-batch stock arm (small_lr_x1, batch 64; the best of the learning-rate grid small_lr_x0_5, "
        "small_lr_x1, small_lr_x2 by median steps) reached eval_accuracy ≥ 0.95 on every seed, in 1000 steps"
    ) in text


def test_the_full_batch_baseline_is_the_first_listed_stock_arm_of_that_batch():
    # A competitor at the same batch (GrokAdamW, listed after the plain stock arm) is not "the stock Trainer".
    runs = [
        *seeds("full", "stock", 1000, [900]),
        *seeds("grokadamw", "stock", 1000, [None]),
        *seeds("levy", "levy", 1000, [450]),
        *seeds("small", "stock", 64, [300]),
    ]
    text = verdict(runs, "eval_accuracy", 0.95)
    assert "the stock Trainer (full) reached eval_accuracy ≥ 0.95 in 900 steps" in text
    assert "LevyTrainer needed 2.00x fewer steps than stock at the same batch size." in text
