"""The report's plots (hf_levy.recipes.plots)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def test_a_series_of_one_point_is_drawn_with_a_marker(tmp_path, monkeypatch):
    # An arm with one sketch has one eigenvalue entry: drawn as a line alone it leaves the plot empty.
    import matplotlib.axes

    from hf_levy.recipes.plots import make_plots

    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        lines = real_plot(self, *args, **kwargs)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    history[0]["curvature/eigenvalue_0"] = 5.0
    run = {
        "history": history,
        "timeline": [{"step": s, "seconds": float(s)} for s in (1, 2, 3)],
        "summary": {
            "arm": "levy",
            "seed": 0,
            "trainer": "levy",
            "levy_noise_basis": "hessian",
            "steps_to_target": None,
            "levy_alpha": 1.5,
        },
    }
    paths = make_plots([run], "eval_accuracy", tmp_path)
    assert tmp_path / "top_eigenvalue.png" in paths
    single = [line for line in drawn if len(line.get_xdata()) == 1]
    assert single and all(line.get_marker() not in (None, "None", "") for line in single)
    several = [line for line in drawn if len(line.get_xdata()) > 1]
    assert several and all(line.get_marker() in (None, "None", "") for line in several)
