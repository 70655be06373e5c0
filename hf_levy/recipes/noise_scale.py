"""``hf-levy noise-scale``: the gradient noise scale B_simple of a recipe's model, with a bootstrap interval."""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from hf_levy.recipes.recipe import Recipe, RecipeError, arm_config
from hf_levy.recipes.runner import build_recipe_model, build_task

DEFAULT_DRAWS = 100  # pairs of batches: the interval covers at about 93% of its nominal 95% there


@contextlib.contextmanager
def launched_process_group() -> Iterator[int]:
    """Under a launcher (``WORLD_SIZE`` > 1, e.g. torchrun) a gloo process group for the measurement; yields the rank.

    :func:`hf_levy.gradient_noise_scale` then splits every batch across the ranks and all of them return the
    same estimate. A group already started is used as it is; one started here is ended on exit.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_rank()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        try:
            yield dist.get_rank()
        finally:
            dist.destroy_process_group()
    else:
        yield 0


def default_arm(recipe: Recipe) -> str:
    """The arm ``hf-levy train`` picks without ``--arm``: the first LevyTrainer arm, else the first arm."""
    return next((a for a, spec in recipe.arms.items() if spec.trainer == "levy"), next(iter(recipe.arms)))


def noise_scale_report(
    recipe: Recipe,
    arm: str | None = None,
    *,
    checkpoint: str | None = None,
    small_batch_size: int | None = None,
    big_batch_size: int | None = None,
    num_draws: int = DEFAULT_DRAWS,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[str, Any]:
    """B_simple of the recipe's model over its training set, as ``hf-levy noise-scale`` prints it.

    The model is built as ``hf-levy compare`` builds the arm's (the recipe's model with the seed), or loaded
    from ``checkpoint``. The batch sizes default to the arm's: B the examples of one optimizer step
    (per-device batch × gradient accumulation, at most the training set), b its ``levy_noise_batch_size``,
    else B/8. Each draw takes both batches with replacement (:func:`hf_levy.gradient_noise_scale`).

    Args:
        recipe: the loaded recipe.
        arm: the arm whose batch sizes are the defaults (default: :func:`default_arm`).
        checkpoint: a checkpoint folder to measure instead of the model at initialization.
        small_batch_size: b, the small batch of each pair (1 <= b < B).
        big_batch_size: B, the big batch of each pair.
        num_draws: pairs of batches averaged.
        seed: the model's initialization and the draws (default: the recipe's first seed).
        trust_remote_code: as for ``hf-levy compare``.

    Returns:
        The printed text and the :class:`hf_levy.NoiseScaleEstimate`.

    Raises:
        RecipeError: an unknown arm, or batch sizes that are not 1 <= b < B.
        FileNotFoundError: ``checkpoint`` is not a folder.
    """
    from hf_levy.noise_scale import gradient_noise_scale

    arm = arm or default_arm(recipe)
    seed = recipe.seeds[0] if seed is None else seed
    task = build_task(recipe)
    train_size = len(task.train_dataset)
    config = arm_config(recipe, arm, output_dir="unused", seed=seed, train_size=train_size)
    step_examples = min(config.per_device_train_batch_size * config.gradient_accumulation_steps, train_size)
    big = big_batch_size or step_examples
    small = small_batch_size or config.levy_noise_batch_size or max(1, big // 8)
    if not 1 <= small < big:
        raise RecipeError(
            f"the small batch must be smaller than the big one, got --small_batch_size {small} and "
            f"--big_batch_size {big}: lower the first or raise the second"
        )
    if checkpoint is not None and not pathlib.Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} is not a directory (a checkpoint-N folder of a run)"
        )
    model = build_recipe_model(recipe, task, seed, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    estimate = gradient_noise_scale(
        model,
        task.train_dataset,
        collate_fn=task.data_collator,
        small_batch_size=small,
        big_batch_size=big,
        num_draws=num_draws,
        seed=seed,
    )
    source = f"checkpoint {checkpoint}" if checkpoint else f"model at initialization (seed {seed})"
    lines = [
        f"{recipe.name}, arm {arm}: {source}",
        f"B_simple = {estimate.b_simple:.4g} examples, {estimate.level:.0%} bootstrap interval "
        f"[{estimate.low:.4g}, {estimate.high:.4g}]",
        f"from {num_draws} draws of a small batch b = {small} and a big batch B = {big} (with replacement "
        f"from the {train_size} training examples); |G|^2 = {estimate.gradient_square_norm:.4g}, "
        f"tr(Sigma) = {estimate.trace:.4g}",
    ]
    if math.isfinite(estimate.b_simple) and estimate.b_simple > 0:
        lines.append(
            f"the arm's batch per optimizer step, {step_examples} examples, is "
            f"{step_examples / estimate.b_simple:.3g} x B_simple"
        )
    else:
        lines.append("|G|^2 is not resolved from the noise at these batch sizes: raise --num_draws or B")
    return "\n".join(lines), estimate
