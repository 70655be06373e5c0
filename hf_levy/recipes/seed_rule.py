"""The every-seed rule of the report: an arm needed fewer steps than a baseline only if it did on every seed.

Each seed's arm is compared with the same seed's baseline (the seed fixes the data order and the initial
weights, so a pair differs only in what the arms compare). A seed that never reached the target counts as
not reached: slower than any seed that did, its steps shown as ``>N`` (N the steps it ran). Arms named
``<prefix>_lr_x<factor>`` form a learning-rate grid whose best point (lowest median steps to target) stands for
the grid, as the fair small-batch target.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

Summary = dict[str, Any]
LR_GRID = re.compile(r"(?P<prefix>.+)_lr_x[0-9][0-9_.]*")


def by_arm(summaries: list[Summary]) -> dict[str, list[Summary]]:
    """The summaries grouped by arm, arms in the order they first appear."""
    groups: dict[str, list[Summary]] = defaultdict(list)
    for s in summaries:
        groups[s["arm"]].append(s)
    return groups


def steps_to_target(s: Summary) -> float:
    """Steps to target, ``inf`` for a seed that did not reach it."""
    return math.inf if s.get("steps_to_target") is None else float(s["steps_to_target"])


def steps_text(s: Summary) -> str:
    """Steps to target, or ``>N`` (the steps it ran) for a seed that did not reach it."""
    return f">{s['steps']}" if s.get("steps_to_target") is None else f"{s['steps_to_target']}"


def median_steps(group: list[Summary]) -> float:
    """The median over seeds of the steps to target, unreached seeds as ``inf``."""
    return statistics.median(steps_to_target(s) for s in group)


def median_steps_text(group: list[Summary]) -> str:
    """:func:`median_steps` as text; ``>N`` when the median falls on unreached seeds (N the most steps run)."""
    median = median_steps(group)
    return f">{max(s['steps'] for s in group)}" if math.isinf(median) else f"{median:g}"


def lr_grids(arms: list[str]) -> dict[str, list[str]]:
    """Learning-rate grids among ``arms``: prefix -> its arms (``stock_small_batch_lr_x0_5``, ``..._lr_x2``)."""
    grids: dict[str, list[str]] = defaultdict(list)
    for arm in arms:
        if match := LR_GRID.fullmatch(arm):
            grids[match["prefix"]].append(arm)
    return {prefix: members for prefix, members in grids.items() if len(members) >= 2}


def grid_best(groups: dict[str, list[Summary]], members: list[str]) -> str:
    """The grid point with the lowest median steps to target (the first listed on a tie)."""
    return min(members, key=lambda arm: median_steps(groups[arm]))


def without_grid_losers(groups: dict[str, list[Summary]], arms: list[str]) -> list[str]:
    """``arms`` with each learning-rate grid among them reduced to its best point."""
    losers = {
        arm for members in lr_grids(arms).values() for arm in members if arm != grid_best(groups, members)
    }
    return [arm for arm in arms if arm not in losers]


@dataclass
class Relation:
    """How an arm's steps to target compare with a baseline's, seed by seed.

    ``kind``: ``"fewer"`` (the arm reached the target on every paired seed, each in fewer steps than the same
    seed's baseline, which may have missed it), ``"more"`` (the mirror image), ``"split"`` (the seeds disagree,
    tie, or neither arm reached the target on some seed). ``ratios``: per seed, baseline steps / arm steps as
    text (``>r``/``<r`` where one side missed the target, ``—`` where both did). ``factor``: the median ratio
    when every seed has one (both reached), else None.
    """

    kind: str
    ratios: list[str]
    factor: float | None
    seeds: list[int]


def relation(arm: list[Summary], baseline: list[Summary]) -> Relation:
    """Compare ``arm`` with ``baseline`` on the seeds both ran (see :class:`Relation`)."""
    base = {s["seed"]: s for s in baseline}
    pairs = [(s, base[s["seed"]]) for s in arm if s["seed"] in base]
    ratios, exact, kinds = [], [], set()
    for a, b in pairs:
        sa, sb = steps_to_target(a), steps_to_target(b)
        if math.isinf(sa) and math.isinf(sb):
            ratios.append("—")
            kinds.add("split")
            continue
        if math.isinf(sb):  # the baseline missed: it would have needed more than the steps it ran
            ratios.append(f">{b['steps'] / sa:.2f}x")
        elif math.isinf(sa):
            ratios.append(f"<{sb / a['steps']:.2f}x")
        else:
            exact.append(sb / sa)
            ratios.append(f"{sb / sa:.2f}x")
        kinds.add("fewer" if sa < sb else "more" if sa > sb else "split")
    kind = kinds.pop() if len(kinds) == 1 else "split"
    factor = statistics.median(exact) if pairs and len(exact) == len(pairs) else None
    return Relation(kind if pairs else "split", ratios, factor, [a["seed"] for a, _ in pairs])


def relation_sentence(who: str, baseline: str, rel: Relation) -> str:
    """One sentence for :func:`relation`: "needed X× fewer steps" only when every seed agrees.

    The per-seed ratios (steps of the baseline over steps of the arm) are given whenever there are several
    seeds.
    """
    per_seed = ", ".join(f"{r} (seed {seed})" for r, seed in zip(rel.ratios, rel.seeds, strict=True))
    ratios = f"{baseline}'s steps over {who}'s, per seed: {per_seed}"
    if rel.kind in ("fewer", "more"):
        if rel.factor is None:
            return f"{who} needed {rel.kind} steps than {baseline} on every seed ({ratios})."
        size = max(rel.factor, 1 / rel.factor)
        if len(rel.seeds) == 1:
            return f"{who} needed {size:.2f}x {rel.kind} steps than {baseline}."
        return f"{who} needed {size:.2f}x {rel.kind} steps than {baseline} (median; {rel.kind} on every seed; {ratios})."
    return f"No every-seed difference in steps between {who} and {baseline} ({ratios})."
