"""The comparison report of a recipe run: markdown tables, PNG plots and a verdict computed from the numbers.

``build_report(run_dir)`` reads what :mod:`hf_levy.recipes.runner` wrote (``recipe.yaml`` and, per arm and
seed, ``summary.json``, ``log_history.json``, ``timeline.json``) and writes ``report.md`` and
``plots/*.png`` into ``run_dir``. It trains nothing, so ``hf-levy report`` can rebuild it at any time.
"""

from __future__ import annotations

import pathlib
import shlex
import statistics
import warnings
from collections import defaultdict
from typing import Any

from hf_levy.recipes.arm_files import read_json, write_text
from hf_levy.recipes.batch_gap import batch_gap_section
from hf_levy.recipes.noise_scale_report import noise_scale_section, noise_scale_verdict
from hf_levy.recipes.plots import make_plots
from hf_levy.recipes.recipe import load_recipe
from hf_levy.recipes.seed_rule import (
    by_arm,
    lr_grids,
    median_steps_text,
    relation,
    relation_sentence,
    steps_text,
    without_grid_losers,
)

REPORT = "report.md"
RUN_FILES = {"summary": "summary", "history": "log_history", "timeline": "timeline"}


def load_runs(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Every finished (arm, seed) with its summary, log history and timeline, in directory order.

    An arm whose files are missing or not valid JSON (a write cut short) is not finished: it is left out
    with a warning naming the file, and ``hf-levy compare`` trains it again.
    """
    runs = []
    for summary_path in sorted(run_dir.glob("*/seed*/summary.json")):
        folder = summary_path.parent
        files = {key: folder / f"{name}.json" for key, name in RUN_FILES.items()}
        run = {key: read_json(path) for key, path in files.items()}
        unreadable = [str(path) for key, path in files.items() if run[key] is None]
        if unreadable:
            warnings.warn(
                f"left out of the report, unfinished: {', '.join(unreadable)} missing or not valid JSON "
                "(`hf-levy compare` trains that arm again)",
                stacklevel=2,
            )
            continue
        runs.append(run)
    return runs


def build_report(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Write ``report.md`` and ``plots/`` for ``run_dir``; returns the report's path."""
    run_dir = pathlib.Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no recipe.yaml: is it a directory written by `hf-levy compare`?"
        )
    recipe = load_recipe(recipe_path, trust_remote_code=True)  # the report loads no model: nothing runs
    run_info = read_json(run_dir / "run.json")
    name = run_info["recipe"] if isinstance(run_info, dict) else recipe.name
    runs = load_runs(run_dir)
    if not runs:
        raise FileNotFoundError(
            f"{run_dir} holds no finished arm (no */seed*/summary.json): run `hf-levy compare` first"
        )
    order = {name: i for i, name in enumerate(recipe.arms)}
    runs.sort(key=lambda r: (order.get(r["summary"]["arm"], len(order)), r["summary"]["seed"]))
    plots = make_plots(runs, recipe.target.metric, run_dir / "plots")
    summaries = [r["summary"] for r in runs]
    lines = [
        f"# {name}: stock Trainer vs LevyTrainer",
        "",
        "```",
        recipe.header,
        "```",
        "",
        "## Verdict",
        "",
        " ".join(
            part
            for part in (
                verdict(
                    summaries, recipe.target.metric, recipe.target.value, recipe.target.greater_is_better
                ),
                noise_scale_verdict(runs),
            )
            if part
        ),
        "",
        "## Per arm (mean ± standard deviation over seeds)",
        "",
        *arm_table(summaries),
        "",
        "capped: share of the noisy steps whose noise norm the cap `levy_max_noise_ratio`·‖g‖ set; clipped: share "
        "of the α-stable draws that `levy_clip` cut.",
        "",
        *capped_warning(summaries),
        *batch_gap_section(runs),
        *noise_scale_section(runs),
        *alpha_study(summaries),
        *calibrated_arms(summaries),
        *overrides_section(summaries),
        "## Per arm and seed",
        "",
        *seed_table(summaries),
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots],
        "",
    ]
    path = run_dir / REPORT
    write_text(path, "\n".join(lines))
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def _values(group: list[dict[str, Any]], key: str) -> list[Any]:
    """The non-missing values of ``key`` over a group of summaries."""
    return [s[key] for s in group if s.get(key) is not None]


def arm_table(summaries: list[dict[str, Any]]) -> list[str]:
    """The per-arm table as markdown lines, mean ± std over seeds ("to target": the seeds that reached it)."""
    rows = [
        "| arm | trainer | batch | α | noise | reached target | steps to target | epochs to target | seconds to target | best metric | final metric | sketch share | capped | clipped |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, group in by_arm(summaries).items():
        first = group[0]
        reached = [s for s in group if s["steps_to_target"] is not None]
        rows.append(
            f"| {arm} | {first['trainer']} | {first['global_batch_size']} | {_fmt(first['levy_alpha'])} "
            f"| {_fmt(first['levy_noise_basis'])} | {len(reached)}/{len(group)} "
            f"| {_mean_std(_values(reached, 'steps_to_target'))} | {_mean_std(_values(reached, 'epochs_to_target'))} "
            f"| {_mean_std(_values(reached, 'seconds_to_target'))} | {_mean_std(_values(group, 'best_metric'))} "
            f"| {_mean_std(_values(group, 'final_metric'))} | {_mean_std(_values(group, 'sketch_share'))} "
            f"| {_mean_std(_values(group, 'capped_fraction'))} | {_mean_std(_values(group, 'clipped_fraction'))} |"
        )
    return rows


def capped_warning(summaries: list[dict[str, Any]]) -> list[str]:
    """A paragraph naming the arms whose noise norm the cap set on more than half of the steps."""
    mostly = {
        arm: statistics.mean(s["capped_fraction"] for s in group)
        for arm, group in by_arm(summaries).items()
        if all(s.get("capped_fraction") is not None for s in group)
    }
    mostly = {arm: share for arm, share in mostly.items() if share > 0.5}
    if not mostly:
        return []
    listed = ", ".join(f"{arm} ({share:.0%} of steps)" for arm, share in mostly.items())
    return [
        f"**Noise mostly capped** in {listed}: there the noise norm was levy_max_noise_ratio·‖g‖, set by the "
        "cap, not by α or levy_scale; differences in α between these arms measure the cap.",
        "",
    ]


def alpha_study(summaries: list[dict[str, Any]], max_truncated: float = 0.05) -> list[str]:
    """The α comparison at equal scale, as markdown lines: each α's steps to target per levy_scale.

    Every seed is shown, and whether an α < 2 beats α = 2 beyond the seed spread (every seed of one arm
    faster than every seed of the other; a seed that missed the target counts as slower than any that
    reached it).
    """
    levels: dict[float, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        if (
            s["trainer"] == "levy"
            and s.get("levy_noise_basis") == "hessian"
            and s.get("levy_scale") is not None
        ):
            levels[s["levy_scale"]][s["levy_alpha"]].append(s)
    levels = {scale: arms for scale, arms in levels.items() if len(arms) >= 2 and 2.0 in arms}
    if not levels:
        return []
    lines = [
        "## α study (same scale parameter c at every α)",
        "",
        "Within a noise level every arm has the same scale parameter c of the SαS law, whose characteristic "
        "function is exp(−|ct|^α): c sets the width of the body of the law, so at equal c the arms draw the "
        "same typical step and differ in their rare long jumps, the property under test. Matching the mean "
        "noise norm instead would shrink the body of the heavy-tailed arms to pay for their tails (and for "
        "α ≤ 1 there is no mean to match, only one the clip makes up). At equal c the heavier tails do give "
        "a larger typical norm: the ‖ξ‖/‖g‖ column (median over the logging windows) shows by how much.",
        "",
        "| levy_scale | α | reached target | steps to target (per seed) | mean ± sd | ‖ξ‖/‖g‖ | capped | clipped | vs α = 2 |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    wins, confounded = [], []

    def ranks(group: list[dict[str, Any]]) -> list[float]:
        return [s["steps_to_target"] if s["steps_to_target"] is not None else float("inf") for s in group]

    for scale, arms in sorted(levels.items()):
        gaussian = ranks(arms[2.0])
        for alpha, group in sorted(arms.items()):
            steps = ranks(group)
            if alpha == 2.0:
                relation = "reference"
            elif max(steps) < min(gaussian):
                relation = "faster beyond the seed spread"
                wins.append((scale, alpha))
            elif min(steps) > max(gaussian):
                relation = "slower beyond the seed spread"
            else:
                relation = "within the seed spread"
            reached = [x for x in steps if x != float("inf")]
            shares = [s.get(k) for s in group for k in ("capped_fraction", "clipped_fraction")]
            if any(v is not None and v > max_truncated for v in shares):
                confounded.append((scale, alpha))
            per_seed = ", ".join("—" if x == float("inf") else f"{x:.0f}" for x in steps)
            lines.append(
                f"| {scale:g} | {alpha:g} | {len(reached)}/{len(group)} | {per_seed} | {_mean_std(reached)} "
                f"| {_mean_std(_values(group, 'noise_to_grad_ratio'))} "
                f"| {_mean_std(_values(group, 'capped_fraction'))} | {_mean_std(_values(group, 'clipped_fraction'))} "
                f"| {relation} |"
            )
    lines.append("")
    if wins:
        listed = ", ".join(f"α = {a:g} at levy_scale {s:g}" for s, a in wins)
        answer = f"Yes: {listed} reached the target in fewer steps than α = 2 on every seed."
    else:
        answer = "No: at every noise level, every α < 2 is within the seed spread of α = 2 or slower than it."
    lines.append(f"**Does any α < 2 beat α = 2 beyond the seed spread?** {answer}")
    if confounded:
        listed = ", ".join(f"α = {a:g} at levy_scale {s:g}" for s, a in confounded)
        lines.append(
            f"Confounded: the cap or the clip acted on more than {max_truncated:.0%} of the steps or draws in "
            f"{listed}; raise levy_max_noise_ratio and levy_clip so that the tail, not the truncation, is measured."
        )
    return [*lines, ""]


def calibrated_arms(summaries: list[dict[str, Any]]) -> list[str]:
    """Calibrated arms (levy_virtual_batch_size) next to the stock arms, as markdown lines.

    Per arm: steps to target per seed, the injected noise relative to the gradient, and the share of the
    batch-b noise variance in the K directions.
    """
    groups = by_arm(summaries)
    calibrated = [a for a, g in groups.items() if g[0].get("levy_virtual_batch_size") is not None]
    if not calibrated:
        return []
    stock = [a for a, g in groups.items() if g[0]["trainer"] == "stock"]
    lines = [
        "## Calibrated arms (noise of a virtual batch b in the top-K directions)",
        "",
        "| arm | batch | b | K | reached target | steps to target (per seed) | ‖ξ‖/‖g‖ (median) | variance share in top-K |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for arm in stock + calibrated:
        group = groups[arm]
        first = group[0]
        steps = [s["steps_to_target"] for s in group]
        per_seed = ", ".join("—" if x is None else f"{x:.0f}" for x in steps)
        lines.append(
            f"| {arm} | {first['global_batch_size']} | {_fmt(first.get('levy_virtual_batch_size'))} "
            f"| {_fmt(first.get('num_eigenpairs'))} | {sum(x is not None for x in steps)}/{len(group)} | {per_seed} "
            f"| {_mean_std(_values(group, 'noise_to_grad_ratio'))} | {_mean_std(_values(group, 'noise_variance_share'))} |"
        )
    return [*lines, ""]


def overrides_section(summaries: list[dict[str, Any]]) -> list[str]:
    """The command-line flags that overrode the recipe, in full: one line when every run had the same."""
    flags = {
        (s["arm"], s["seed"]): (
            "not recorded (run before the flags were kept)"
            if "overrides" not in s
            else " ".join(f"--{key} {shlex.quote(str(value))}" for key, value in s["overrides"].items())
            or "none"
        )
        for s in summaries
    }
    lines = ["## Command-line overrides", ""]
    if len(set(flags.values())) == 1:
        lines.append(f"Every arm and seed: {_code(next(iter(flags.values())))}.")
    else:
        lines += ["| arm | seed | flags |", "|---|---:|---|"]
        lines += [f"| {arm} | {seed} | {_code(text)} |" for (arm, seed), text in flags.items()]
    return [*lines, ""]


def _code(flags: str) -> str:
    return f"`{flags}`" if flags.startswith("--") else flags


def seed_table(summaries: list[dict[str, Any]]) -> list[str]:
    """One markdown row per arm and seed with that run's summary numbers ("—" where one is missing)."""
    keys = [
        "arm", "seed", "steps", "final_metric", "best_metric", "final_train_loss", "steps_to_target",
        "epochs_to_target", "seconds_to_target", "train_runtime", "samples_per_second", "sketch_share",
        "capped_fraction", "clipped_fraction", "resumed_from_step",
    ]  # fmt: skip
    rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    rows += ["| " + " | ".join(_fmt(s.get(k)) for k in keys) + " |" for s in summaries]
    return rows


def verdict(
    summaries: list[dict[str, Any]], metric: str, target: float, greater_is_better: bool = True
) -> str:
    """One paragraph comparing the main LevyTrainer arm with the stock arms, computed from the summaries.

    Step counts compare seed by seed (:mod:`hf_levy.recipes.seed_rule`): "X× fewer steps" only when every
    seed agrees, the per-seed ratios otherwise. A learning-rate grid of stock arms counts as its best point.
    """
    groups = by_arm(summaries)
    stock = sorted(
        without_grid_losers(groups, [a for a, g in groups.items() if g[0]["trainer"] == "stock"]),
        key=lambda a: groups[a][0]["global_batch_size"],
    )
    levy = [
        a for a, g in groups.items() if g[0]["trainer"] == "levy" and g[0]["levy_noise_basis"] == "hessian"
    ]
    if not stock or not levy:
        return (
            "Not enough arms for a verdict (it needs a stock arm and a LevyTrainer arm with Hessian noise)."
        )
    # On a tie the first listed: a recipe lists its plain stock arm before variants (e.g. optim: grokadamw).
    large = next(
        a for a in stock if groups[a][0]["global_batch_size"] == groups[stock[-1]][0]["global_batch_size"]
    )
    small, main = stock[0], levy[0]
    reach = f"{metric} {'≥' if greater_is_better else '≤'} {target}"

    def steps(arm: str) -> str:
        group = groups[arm]
        missed = sum(s["steps_to_target"] is None for s in group)
        if missed:
            most = max(s["steps"] for s in group)
            return f"did not reach {reach} in {missed} of {len(group)} seeds (up to {most} steps)"
        if len(group) == 1:
            return f"reached {reach} in {group[0]['steps_to_target']} steps"
        seeds = ", ".join(steps_text(s) for s in group)
        return f"reached {reach} on every seed, in {median_steps_text(group)} steps (median; seeds: {seeds})"

    def cost(arm: str, key: str) -> float | None:
        values = [s[key] for s in groups[arm] if s[key] is not None]
        return statistics.mean(values) if len(values) == len(groups[arm]) else None

    def reached_all(arm: str) -> bool | None:
        hits = [s["steps_to_target"] is not None for s in groups[arm]]
        return True if all(hits) else False if not any(hits) else None

    sentences = [
        f"At batch {groups[main][0]['global_batch_size']}, LevyTrainer ({main}) {steps(main)}; the stock "
        f"Trainer ({large}) {steps(large)}."
    ]
    if reached_all(main) is True and reached_all(large) is False:
        sentences.append("LevyTrainer reached the target and stock did not.")
    elif reached_all(main) is False and reached_all(large) is True:
        sentences.append("Stock reached the target and LevyTrainer did not.")
    else:
        rel = relation(groups[main], groups[large])
        sentences.append(relation_sentence("LevyTrainer", "stock at the same batch size", rel))
    if small != large:
        grid = next((m for m in lr_grids(list(groups)).values() if small in m), None)
        picked = f"; the best of the learning-rate grid {', '.join(grid)} by median steps" if grid else ""
        sentences.append(
            f"The small-batch stock arm ({small}, batch {groups[small][0]['global_batch_size']}{picked}) "
            f"{steps(small)}."
        )
        for key, unit in (("epochs_to_target", "epochs"), ("seconds_to_target", "s")):
            a, b = cost(small, key), cost(main, key)
            if a is not None and b is not None:
                sentences.append(f"To the target: {b:.3g} {unit} for {main} vs {a:.3g} {unit} for {small}.")
    finals = {arm: cost(arm, "final_metric") for arm in dict.fromkeys([main, large, small])}
    if all(v is not None for v in finals.values()):
        listed = ", ".join(f"{v:.4g} ({arm})" for arm, v in finals.items())
        sentences.append(f"Final {metric}: {listed}.")
    return " ".join(sentences)
