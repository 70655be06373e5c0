"""The report's gradient-noise-scale section: B_simple over training and each arm's batch relative to it.

B_simple = tr(Σ)/‖G‖² (examples) is logged as ``levy/gradient_noise_scale`` by the arms that measure it (the
``minibatch`` bases, or ``gradient_noise_scale_every_n_steps``). Per arm and seed the section shows the median
of the logged values and the last one; the recipe's B_simple is the median over every run that logged it,
and each arm's batch (examples per optimizer step) is set beside it: a batch well above B_simple is past the
critical batch size, where more examples per step buy few fewer steps (McCandlish et al. 2018).
"""

from __future__ import annotations

import statistics
from typing import Any

NOISE_SCALE = "levy/gradient_noise_scale"
# A median B_simple <= 0 means the averaged tr(Σ) estimate was <= 0: the noise was below what the two batch
# sizes resolve, and no batch can be set against it.
NOT_RESOLVED = (
    "The gradient noise scale B_simple measured over training is {:,.0f} examples (median): the gradient noise "
    "was not resolved at the batch sizes measured, so no batch is set against it."
)


def logged_noise_scale(run: dict[str, Any]) -> list[float]:
    """The run's logged B_simple values in step order."""
    return [h[NOISE_SCALE] for h in run["history"] if NOISE_SCALE in h]


def run_noise_scales(runs: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, float]]:
    """(arm, seed) -> (median, last) of the B_simple each run logged, for the runs that logged it."""
    return {
        (r["summary"]["arm"], r["summary"]["seed"]): (statistics.median(v), v[-1])
        for r in runs
        if (v := logged_noise_scale(r))
    }


def recipe_noise_scale(scales: dict[tuple[str, int], tuple[float, float]]) -> float | None:
    """The recipe's B_simple: the median of the runs' medians (``scales`` from :func:`run_noise_scales`)."""
    return statistics.median(median for median, _ in scales.values()) if scales else None


def noise_scale_verdict(runs: list[dict[str, Any]]) -> str:
    """The verdict's sentence on the batches against B_simple; empty when no run logged it."""
    reference = recipe_noise_scale(run_noise_scales(runs))
    if reference is None:
        return ""
    if reference <= 0:
        return NOT_RESOLVED.format(reference)
    batches = sorted({s["global_batch_size"] for r in runs if (s := r["summary"]).get("global_batch_size")})
    ratios = ", ".join(f"batch {b:,}: {b / reference:.2g}x" for b in reversed(batches))
    return (
        f"The gradient noise scale B_simple measured over training is {reference:,.0f} examples (median); "
        f"each batch against it: {ratios}."
    )


def noise_scale_section(runs: list[dict[str, Any]]) -> list[str]:
    """The markdown section; empty when no run logged ``levy/gradient_noise_scale``."""
    medians = run_noise_scales(runs)
    reference = recipe_noise_scale(medians)
    if reference is None:
        return []
    if reference <= 0:
        return ["## Gradient noise scale", "", NOT_RESOLVED.format(reference), ""]
    lines = [
        "## Gradient noise scale",
        "",
        f"B_simple = tr(Σ)/‖G‖² (`{NOISE_SCALE}`, examples), median over training and last value, per seed, "
        f"for the arms that measured it. The recipe's B_simple: {reference:,.0f} (median over those runs). "
        "A batch well above it is past the critical batch size: more examples per step buy few fewer steps.",
        "",
        "| arm | batch (examples per step) | batch / B_simple | B_simple per seed: median (last) |",
        "|---|---:|---:|---|",
    ]
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["summary"]["arm"], []).append(r["summary"])
    for arm, group in arms.items():
        batches = sorted({s["global_batch_size"] for s in group if s.get("global_batch_size")})
        batch = "—" if not batches else ", ".join(f"{b:,}" for b in batches)
        ratio = "—" if not batches else ", ".join(f"{b / reference:.2f}" for b in batches)
        measured = [
            f"seed {s['seed']}: {medians[arm, s['seed']][0]:,.0f} ({medians[arm, s['seed']][1]:,.0f})"
            for s in group
            if (arm, s["seed"]) in medians
        ]
        lines.append(f"| {arm} | {batch} | {ratio} | {'; '.join(measured) or '—'} |")
    return [*lines, ""]
