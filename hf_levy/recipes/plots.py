"""The figures of the recipe tooling: a compare run's report plots and the tail-index plot.

Kept apart from the report and the runner so that matplotlib, a dependency of the ``recipes`` extra
only, is imported in one place.
"""

from __future__ import annotations

import os
import pathlib
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_levy.diagnostics import Row

PLOT_ALPHA_MAX = 3.0
# The optimizer step a refresh (and its calibration) was computed at, logged with its metrics.
SKETCH_STEP = "curvature/sketch_step"


def make_plots(runs: list[dict[str, Any]], metric: str, folder: pathlib.Path) -> list[pathlib.Path]:
    """PNG plots: metric and loss against steps and wall-clock, eigenvalues, noise ratio, α sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    def series(run: dict[str, Any], key: str, at_sketch: bool) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` over a run's log history.

        With ``at_sketch`` a refresh's metric is placed at the step it was computed at
        (``curvature/sketch_step``), not at the log that showed it (the next one, or the run's summary).
        """
        points = [
            (h.get(SKETCH_STEP, h["step"]) if at_sketch else h["step"], h[key])
            for h in run["history"]
            if key in h and "step" in h
        ]
        return [p[0] for p in points], [p[1] for p in points]

    def seconds_at(run: dict[str, Any], steps: list[float]) -> list[float]:
        marks = {t["step"]: t["seconds"] for t in run["timeline"]}
        return [marks.get(s, float("nan")) for s in steps]

    def figure(name: str, title: str, xlabel: str, ylabel: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if draw(ax):
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(folder / f"{name}.png")
            fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def lines(key: str, use_seconds: bool = False, at_sketch: bool = False):
        def draw(ax) -> bool:
            drawn = False
            for run in runs:
                x, y = series(run, key, at_sketch)
                if not x:
                    continue
                x = seconds_at(run, x) if use_seconds else x
                s = run["summary"]
                # a lone point (an arm with one sketch) is invisible as a line
                marker = "o" if len(x) == 1 else None
                ax.plot(x, y, label=f"{s['arm']} (seed {s['seed']})", lw=1.2, marker=marker)
                drawn = True
            return drawn

        return draw

    figure("metric_vs_step", f"{metric} against optimizer steps", "optimizer step", metric, lines(metric))
    figure(
        "metric_vs_seconds",
        f"{metric} against training wall-clock (evaluations excluded)",
        "seconds",
        metric,
        lines(metric, use_seconds=True),
    )
    figure("loss_vs_step", "training loss", "optimizer step", "loss", lines("loss"))
    figure(
        "loss_vs_seconds",
        "training loss against training wall-clock (evaluations excluded)",
        "seconds",
        "loss",
        lines("loss", use_seconds=True),
    )
    figure(
        "top_eigenvalue",
        "top Hessian eigenvalue of the sketch",
        "optimizer step",
        "λ_1",
        lines("curvature/eigenvalue_0", at_sketch=True),
    )
    figure(
        "gradient_noise_scale",
        "gradient noise scale B_simple = tr(Σ)/‖G‖²",
        "optimizer step",
        "examples",
        lines("levy/gradient_noise_scale"),
    )
    figure("noise_to_grad_ratio", "‖ξ‖ / ‖g‖", "optimizer step", "ratio", lines("levy/noise_to_grad_ratio"))
    figure(
        "fitted_alpha",
        "calibration: fitted α along the top eigenvector",
        "optimizer step",
        "α̂",
        lines("levy/fitted_alpha_0", at_sketch=True),
    )

    sweep = defaultdict(list)
    for run in runs:
        s = run["summary"]
        if s["trainer"] == "levy" and s["levy_noise_basis"] == "hessian" and s["steps_to_target"] is not None:
            sweep[s["levy_alpha"]].append(s["steps_to_target"])
    if len(sweep) >= 2:

        def draw_sweep(ax) -> bool:
            alphas = sorted(sweep)
            ax.plot(
                alphas, [statistics.mean(sweep[a]) for a in alphas], "o-", label="LevyTrainer (Hessian noise)"
            )
            return True

        figure("alpha_sweep", "steps to target against the tail index α", "α", "steps to target", draw_sweep)
    return paths


def plot_tail_index(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    """Write a PNG of α̂ against batch size (log x), one line per direction, 95 % bands shaded.

    Estimates above ``PLOT_ALPHA_MAX`` (light tails, or the pooled estimator on dependent
    coordinates) are drawn at that edge. Uses matplotlib's object API (no pyplot), so no global
    backend or figure state is touched.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    sizes = sorted({r["batch_size"] for r in rows})
    for name in dict.fromkeys(r["direction"] for r in rows):
        own = sorted((r for r in rows if r["direction"] == name), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in own]
        y, lo, hi = (
            np.clip(np.array([r[k] for r in own], dtype=float), 0.0, PLOT_ALPHA_MAX)
            for k in ("alpha", "alpha_low", "alpha_high")
        )
        style = {"color": "black", "linewidth": 2} if name == "pooled" else {}
        (line,) = ax.plot(x, y, marker="o", label=name, **style)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(2.0, color="gray", linestyle=":", label="Gaussian (α = 2)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_ylim(0.0, PLOT_ALPHA_MAX + 0.05)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"tail index α̂ (values above {PLOT_ALPHA_MAX:g} drawn at {PLOT_ALPHA_MAX:g})")
    ax.set_title("Gradient-noise tail index (95% bootstrap intervals)")
    ax.legend(fontsize="small", loc="lower left")
    fig.savefig(path, dpi=120)
