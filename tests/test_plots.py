"""The report's plots (hf_levy.recipes.plots)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def drawn_lines(monkeypatch) -> list:
    """Every Line2D that the plots draw from here on (recorded as Axes.plot returns them)."""
    import matplotlib.axes

    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        lines = real_plot(self, *args, **kwargs)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    return drawn


def levy_run(history: list[dict]) -> dict:
    steps = sorted({h["step"] for h in history})
    return {
        "history": history,
        "timeline": [{"step": s, "seconds": float(s)} for s in steps],
        "summary": {
            "arm": "levy",
            "seed": 0,
            "trainer": "levy",
            "levy_noise_basis": "hessian",
            "steps_to_target": None,
            "levy_alpha": 1.5,
        },
    }


def test_a_series_of_one_point_is_drawn_with_a_marker(tmp_path, monkeypatch):
    # An arm with one sketch has one eigenvalue entry: drawn as a line alone it leaves the plot empty.
    from hf_levy.recipes.plots import make_plots

    drawn = drawn_lines(monkeypatch)
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    history[0]["curvature/eigenvalue_0"] = 5.0
    paths = make_plots([levy_run(history)], "eval_accuracy", tmp_path)
    assert tmp_path / "top_eigenvalue.png" in paths
    single = [line for line in drawn if len(line.get_xdata()) == 1]
    assert single and all(line.get_marker() not in (None, "None", "") for line in single)
    several = [line for line in drawn if len(line.get_xdata()) > 1]
    assert several and all(line.get_marker() in (None, "None", "") for line in several)


def test_each_sketch_is_drawn_at_the_step_it_was_computed_at_and_the_last_one_from_the_summary(
    tmp_path, monkeypatch
):
    # Refreshes at steps 0, 3 and 9, logged at steps 2 and 4 and (the last, after the last training log) in the
    # end-of-training summary at step 10; the calibrated α of each refresh with it. The noise ratio is a logging
    # window's and stays at the logging step.
    from hf_levy.recipes.plots import make_plots

    drawn = drawn_lines(monkeypatch)
    history = [
        {"step": 2, "loss": 1.0, "curvature/eigenvalue_0": 5.0, "curvature/sketch_step": 0.0,
         "levy/fitted_alpha_0": 1.9, "levy/noise_to_grad_ratio": 0.5},
        {"step": 4, "loss": 0.5, "curvature/eigenvalue_0": 7.0, "curvature/sketch_step": 3.0,
         "levy/fitted_alpha_0": 1.8, "levy/noise_to_grad_ratio": 0.4},
        {"step": 10, "train_runtime": 1.0, "curvature/eigenvalue_0": 11.0, "curvature/sketch_step": 9.0,
         "levy/fitted_alpha_0": 1.7},
    ]  # fmt: skip
    make_plots([levy_run(history)], "eval_accuracy", tmp_path)
    by_values = {tuple(line.get_ydata()): list(line.get_xdata()) for line in drawn}
    assert by_values[(5.0, 7.0, 11.0)] == [0.0, 3.0, 9.0]  # top_eigenvalue.png
    assert by_values[(1.9, 1.8, 1.7)] == [0.0, 3.0, 9.0]  # fitted_alpha.png
    assert by_values[(0.5, 0.4)] == [2, 4]  # noise_to_grad_ratio.png
