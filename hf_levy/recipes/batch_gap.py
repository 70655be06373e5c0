"""The report's batch-gap table: how much of the full-batch-to-small-batch gap each arm closes.

The gap is the one between the stock full batch and the best small batch, given per seed and as the median
over seeds (the noise-sources study reads it).

Per arm and seed: steps to target; the fraction of the batch gap closed, (S_full − S_arm) / (S_full − S_b),
with S_full the ``stock_full_batch`` arm and S_b the best point of the small-batch learning-rate grid (lowest
median steps to target), both of the same seed; the median ‖ξ‖/‖g‖ over training
(``levy/noise_to_grad_ratio`` in the log history); training seconds per step relative to the stock full batch
(from ``timeline.json``: evaluations excluded); and a verdict against the full batch by the every-seed rule.
A seed that missed the target counts as not reached: ``>N`` steps (N the steps it ran), and the gap it closed
is at most (S_full − N) / (S_full − S_b), shown as ``<x``; where the full batch missed, the gap is at least
what its steps run give, shown as ``>x``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from hf_levy.recipes.seed_rule import (
    by_arm,
    grid_best,
    lr_grids,
    median_steps,
    median_steps_text,
    relation,
    steps_text,
    steps_to_target,
)

FULL_BATCH = "stock_full_batch"
RATIO = "levy/noise_to_grad_ratio"


def seconds_per_step(run: dict[str, Any]) -> float | None:
    """Training seconds per optimizer step: the last timeline mark (the end of training), else the summary."""
    marks = [t for t in run["timeline"] if t.get("step")]
    if marks:
        return marks[-1]["seconds"] / marks[-1]["step"]
    s = run["summary"]
    runtime = s.get("train_runtime")
    return runtime / s["steps"] if runtime is not None and s.get("steps") else None


def median_ratio(run: dict[str, Any]) -> float | None:
    """The median ‖ξ‖/‖g‖ over a run's logs (``levy/noise_to_grad_ratio``); None when no log has it."""
    values = [h[RATIO] for h in run["history"] if RATIO in h]
    return statistics.median(values) if values else None


def gap_closed(arm: dict[str, Any], full: dict[str, Any], small: dict[str, Any]) -> tuple[float, str] | None:
    """(value, text) of the gap this seed closed: (S_full − S_arm) / (S_full − S_b), steps to target.

    A run that missed the target stands in with the steps it ran, which makes the value a bound: an upper
    bound (text ``<x``) when the arm missed, a lower bound (``>x``) when the full batch missed (the value
    grows with S_full for an arm slower than the small batch; for a faster one it exceeds 1 whatever S_full
    is, so ``>1.00``). None when the gap is not defined: the small batch missed, both the arm and the full
    batch missed, or no gap on this seed (S_full ≤ S_b).
    """
    s_full, s_small = steps_to_target(full), steps_to_target(small)
    s_arm = arm.get("steps_to_target")
    if math.isinf(s_small):
        return None
    if math.isinf(s_full):
        if s_arm is None or full["steps"] <= s_small:
            return None
        if s_arm <= s_small:
            return 1.0, "1.00" if s_arm == s_small else ">1.00"
        bound = (full["steps"] - s_arm) / (full["steps"] - s_small)
        return bound, f">{bound:.2f}"
    if s_full <= s_small:
        return None
    if s_arm is None:
        bound = (s_full - arm["steps"]) / (s_full - s_small)
        return bound, f"<{bound:.2f}"
    value = (s_full - s_arm) / (s_full - s_small)
    return value, f"{value:.2f}"


def median_gap_text(cells: list[tuple[float, str]]) -> str:
    """The median of the per-seed gaps ``cells`` (as :func:`gap_closed` gives them), as text; "—" for none.

    Where some cells are bounds of one kind, the median of the numbers is a bound of that kind on the
    median (the order statistics of the true values lie on the same side of theirs); upper and lower
    bounds together bound nothing ("—").
    """
    kinds = {text[0] for _, text in cells if text[0] in "<>"}
    if not cells or len(kinds) > 1:
        return "—"
    values = sorted(value for value, _ in cells)
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return f"{kinds.pop() if kinds else ''}{median:.2f}"


def _cell(per_seed: list[str], median: str) -> str:
    return f"{', '.join(per_seed)} ({median})"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def batch_gap_section(runs: list[dict[str, Any]]) -> list[str]:
    """The report's batch-gap section as markdown lines; empty without a ``stock_full_batch`` arm.

    ``runs`` are the report's runs (``summary``, ``history``, ``timeline`` per arm and seed). The gap column
    needs a learning-rate grid of stock arms (``<prefix>_lr_x<factor>``) and is left out without one.
    """
    groups = by_arm([r["summary"] for r in runs])
    if FULL_BATCH not in groups:
        return []
    run_of = {(r["summary"]["arm"], r["summary"]["seed"]): r for r in runs}
    full = {s["seed"]: s for s in groups[FULL_BATCH]}
    stock = [arm for arm, group in groups.items() if group[0]["trainer"] == "stock"]
    bests = [grid_best(groups, members) for members in lr_grids(stock).values()]
    target = min(bests, key=lambda arm: median_steps(groups[arm])) if bests else None
    small = {s["seed"]: s for s in groups[target]} if target else {}
    columns = ["arm", "steps to target", *(["gap closed"] if target else [])]
    columns += ["‖ξ‖/‖g‖", "seconds per step vs full batch", "vs stock_full_batch (every seed)"]
    lines = [
        "## Batch gap (per seed, median in parentheses)",
        "",
        f"S_full: {FULL_BATCH}; "
        + (
            f"S_b: {target}, the small-batch grid point with the lowest median steps to target; gap closed = "
            "(S_full − S_arm) / (S_full − S_b) on the same seed, `<x` where the arm missed the target (an upper "
            "bound), `>x` where the full batch missed it (a lower bound), — where the gap is not defined on that "
            "seed; a median over bounds is a bound. "
            if target
            else "no learning-rate grid of stock arms (`<prefix>_lr_x<factor>`), so no gap column. "
        )
        + "Steps `>N`: not reached in the N steps run. ‖ξ‖/‖g‖: median over the logging windows. Seconds per "
        "step: training seconds (evaluations excluded) over the same seed's stock_full_batch.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 2) + "---|",
    ]
    for arm, group in groups.items():
        cells = [
            arm + (" (S_b)" if arm == target else ""),
            _cell([steps_text(s) for s in group], median_steps_text(group)),
        ]
        if target:
            gaps = [
                gap_closed(s, full[s["seed"]], small[s["seed"]])
                if s["seed"] in full and s["seed"] in small
                else None
                for s in group
            ]
            cells.append(
                _cell(["—" if g is None else g[1] for g in gaps], median_gap_text([g for g in gaps if g]))
            )
        ratios = [median_ratio(run_of[arm, s["seed"]]) for s in group]
        known = [r for r in ratios if r is not None]
        cells.append(
            _cell([_number(r) for r in ratios], _number(statistics.median(known) if known else None))
        )
        relative = []
        for s in group:
            own, base = seconds_per_step(run_of[arm, s["seed"]]), None
            if s["seed"] in full:
                base = seconds_per_step(run_of[FULL_BATCH, s["seed"]])
            relative.append(own / base if own is not None and base else None)
        known = [r for r in relative if r is not None]
        cells.append(
            _cell([_number(r) for r in relative], _number(statistics.median(known) if known else None))
        )
        cells.append(_arm_verdict(arm, group, groups[FULL_BATCH]))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _arm_verdict(arm: str, group: list[dict[str, Any]], full: list[dict[str, Any]]) -> str:
    if arm == FULL_BATCH:
        return "reference"
    reached = f"reached {sum(s['steps_to_target'] is not None for s in group)}/{len(group)}"
    kind = relation(group, full).kind
    if kind == "split":
        return f"{reached}; no every-seed difference"
    return f"{reached}; {kind} steps on every seed"
