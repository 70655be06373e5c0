"""The report's gradient-noise-scale section and plot on run folders written by hand, against values computed
by hand (medians, last values, the recipe's B_simple and each batch over it)."""

from __future__ import annotations

import json
import pathlib

from hf_levy.recipes.noise_scale_report import noise_scale_section, noise_scale_verdict
from hf_levy.recipes.plots import make_plots
from hf_levy.recipes.report import load_runs


def write_run(run_dir: pathlib.Path, arm: str, seed: int, batch: int, noise_scales: list[float]) -> None:
    folder = run_dir / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {
        "arm": arm,
        "seed": seed,
        "trainer": "levy",
        "global_batch_size": batch,
        "steps": 40,
        "steps_to_target": None,
        "levy_noise_basis": "minibatch",
    }
    history = [
        {"step": 10 * (i + 1), "loss": 1.0, "levy/gradient_noise_scale": v}
        for i, v in enumerate(noise_scales)
    ]
    history.append({"step": 40, "train_runtime": 1.0})
    for name, data in (
        ("summary", summary),
        ("log_history", history),
        ("timeline", [{"step": 40, "seconds": 1}]),
    ):
        (folder / f"{name}.json").write_text(json.dumps(data))


def rows(lines: list[str]) -> dict[str, list[str]]:
    table = [line.strip("|").split(" | ") for line in lines if line.startswith("| ")][1:]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in table}


def test_medians_last_values_and_batch_over_the_recipes_b_simple(tmp_path):
    write_run(tmp_path, "full", 0, 1000, [100.0, 300.0, 200.0, 250.0])  # median 225, last 250
    write_run(tmp_path, "full", 1, 1000, [400.0, 500.0, 600.0])  # median 500, last 600
    write_run(tmp_path, "full", 2, 1000, [1000.0])  # median and last 1000
    write_run(tmp_path, "small", 0, 128, [])  # logged nothing: its batch is still set beside B_simple
    lines = noise_scale_section(load_runs(tmp_path))
    assert "The recipe's B_simple: 500 " in lines[2]  # median of 225, 500, 1000 (their mean is 575)
    table = rows(lines)
    assert table["full"] == ["1,000", "2.00", "seed 0: 225 (250); seed 1: 500 (600); seed 2: 1,000 (1,000)"]
    assert table["small"] == ["128", "0.26", "—"]
    assert noise_scale_verdict(load_runs(tmp_path)) == (
        "The gradient noise scale B_simple measured over training is 500 examples (median); each batch against "
        "it: batch 1,000: 2x, batch 128: 0.26x."
    )


def test_no_section_and_no_plot_without_a_logged_noise_scale(tmp_path):
    write_run(tmp_path, "full", 0, 1000, [])
    runs = load_runs(tmp_path)
    assert noise_scale_section(runs) == []
    assert noise_scale_verdict(runs) == ""
    names = [p.name for p in make_plots(runs, "eval_accuracy", tmp_path / "plots")]
    assert "gradient_noise_scale.png" not in names


def test_the_plot_is_drawn_when_a_run_logged_it(tmp_path):
    write_run(tmp_path, "full", 0, 1000, [100.0, 300.0])
    names = [p.name for p in make_plots(load_runs(tmp_path), "eval_accuracy", tmp_path / "plots")]
    assert "gradient_noise_scale.png" in names


def test_a_noise_scale_not_resolved_sets_no_batch_against_it(tmp_path):
    write_run(tmp_path, "full", 0, 1000, [-5.0, 0.0, -1.0])  # median -1: tr(Σ) averaged below zero
    runs = load_runs(tmp_path)
    assert "not resolved" in noise_scale_verdict(runs) and "batch 1,000" not in noise_scale_verdict(runs)
    assert any("not resolved" in line for line in noise_scale_section(runs))
    write_run(tmp_path / "zero", "full", 0, 1000, [0.0])
    assert "not resolved" in noise_scale_verdict(load_runs(tmp_path / "zero"))  # no division by zero
