"""``hf-levy tail-index``: the tail index of a recipe's gradient noise against batch size."""

from __future__ import annotations

import pathlib

import torch

from hf_levy.recipes.recipe import Recipe, RecipeError
from hf_levy.recipes.runner import build_recipe_model, build_task


def tail_index_report(
    recipe: Recipe,
    batch_sizes: list[int],
    output_dir: str | pathlib.Path,
    *,
    checkpoint: str | None = None,
    num_batches: int = 256,
    num_eigenpairs: int = 4,
    sketch_batch_size: int = 256,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """``hf-levy tail-index``: α̂ of the gradient noise against batch size, pooled and per eigen-direction.

    The model is the recipe's at initialization, or loaded from ``checkpoint`` (a directory written by
    ``save_pretrained``/a Trainer checkpoint). The directions are its top ``num_eigenpairs`` Hessian
    eigenvectors on a seeded sketch batch of the train set. Writes ``tail_index.md`` and
    ``tail_index.png`` into ``output_dir``; returns their paths.
    """
    from hf_levy._rng import step_generator
    from hf_levy.diagnostics import format_table, tail_index_profile
    from hf_levy.hvp import make_hvp
    from hf_levy.lanczos import lanczos
    from hf_levy.params import num_elements, trainable_parameters
    from hf_levy.recipes.plots import plot_tail_index

    task = build_task(recipe)
    if checkpoint is not None and not pathlib.Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} is not a directory (a checkpoint-N folder of a run)"
        )
    model = build_recipe_model(recipe, task, seed, checkpoint=checkpoint, trust_remote_code=trust_remote_code)
    params = trainable_parameters(model)
    dataset, collate = task.train_dataset, task.data_collator
    if max(batch_sizes) > len(dataset):
        raise RecipeError(f"batch size {max(batch_sizes)} exceeds the {len(dataset)} training examples")
    picks = torch.randperm(len(dataset), generator=step_generator(seed, 0))[
        : min(sketch_batch_size, len(dataset))
    ]
    sketch_batch = collate([dataset[int(i)] for i in picks])
    pairs = lanczos(
        make_hvp(model, sketch_batch, params),
        num_elements(params),
        num_eigenpairs,
        generator=step_generator(seed, 1),
    )
    rows = tail_index_profile(
        model,
        dataset,
        collate,
        params,
        batch_sizes,
        num_batches=num_batches,
        vectors_PK=pairs.vectors,
        seed=seed,
    )
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = ", ".join(f"{v:.4g}" for v in pairs.values.tolist())
    table = out / "tail_index.md"
    table.write_text(
        f"# Tail index of the gradient noise: {recipe.name}\n\n"
        f"Model: {'checkpoint ' + checkpoint if checkpoint else 'at initialization (seed ' + str(seed) + ')'}; "
        f"{num_batches} mini-batch gradients per batch size; directions v_i: top-{num_eigenpairs} Hessian "
        f"eigenvectors (eigenvalues {values}) on {len(picks)} training examples.\n\n{format_table(rows)}\n"
    )
    plot = out / "tail_index.png"
    plot_tail_index(rows, plot)
    return table, plot
