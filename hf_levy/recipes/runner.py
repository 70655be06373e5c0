"""Run a recipe's arms: one arm (``hf-levy train``) or all of them, resumably (``hf-levy compare``).

Each arm and seed writes into ``RUN_DIR/<arm>/seed<k>/``: ``config.json`` (the resolved config),
``log_history.json`` (the Trainer's logs), ``timeline.json`` (wall-clock seconds at each log) and
``summary.json`` (the numbers the report compares). An arm whose ``summary.json`` exists is not rerun.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from hf_levy.recipes import tasks
from hf_levy.recipes.recipe import Recipe, RecipeError, Target, arm_config
from hf_levy.trainer import LevyTrainer

# Task builders a recipe can name (recipes are data, so the name must map to code somewhere).
TASKS: dict[str, Callable[..., tasks.Task]] = {
    "modular_addition": tasks.modular_addition,
    "modular_arithmetic": tasks.modular_arithmetic,
    "digits": tasks.digits,
    "python_source_bytes": tasks.python_source_bytes,
    "sentiment_templates": tasks.sentiment_templates,
    "hub_causal_lm": tasks.hub_causal_lm,
}
SUMMARY = "summary.json"


class TargetTracker(TrainerCallback):
    """Records training seconds at every log and the first step whose eval metric reaches the target.

    Training seconds are wall-clock since training began minus the evaluations' own runtime (``eval_runtime``),
    so arms that evaluate at different intervals compare by what their training cost.
    """

    def __init__(self, target: Target):
        self.target = target
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.timeline: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.timeline.append({"step": state.global_step, "seconds": self.training_seconds()})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        runtimes = [v for k, v in (metrics or {}).items() if k.endswith("_runtime") and isinstance(v, float)]
        self.eval_seconds += sum(runtimes)
        value = (metrics or {}).get(self.target.metric)
        if value is None or self.reached is not None:
            return
        better = value >= self.target.value if self.target.greater_is_better else value <= self.target.value
        if better:
            self.reached = {
                "step": state.global_step,
                "epoch": state.epoch,
                "seconds": self.training_seconds(),
                "value": value,
            }
            if self.target.stop:
                control.should_training_stop = True


def arm_dir(run_dir: str | pathlib.Path, arm: str, seed: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / arm / f"seed{seed}"


def build_task(recipe: Recipe) -> tasks.Task:
    spec = dict(recipe.task)
    name = spec.pop("name")
    if name not in TASKS:
        raise RecipeError(f"{recipe.path}: unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](**spec)


def build_recipe_model(recipe: Recipe, task: tasks.Task, seed: int, checkpoint: str | None = None) -> Any:
    """The recipe's model: built from its config (seeded), or ``pretrained`` (a hub id, a folder, or
    ``package:NAME``) loaded with the remaining keys, optionally wrapped with LoRA adapters (``lora``)."""
    import transformers

    spec = dict(recipe.model)
    architecture = spec.pop("architecture", "LlamaForCausalLM")
    pretrained, lora = spec.pop("pretrained", None), spec.pop("lora", None)
    if checkpoint is not None or pretrained is not None:
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise RecipeError(
                f"{recipe.path}: model architecture {architecture!r} is not a transformers class"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # new heads (e.g. a classifier) are initialized from the seed
            model = model_class.from_pretrained(checkpoint or tasks.resolve_pretrained(pretrained), **spec)
    else:
        model = tasks.build_model(architecture, seed=seed, vocab_size=task.vocab_size, **spec)
    if lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    return model


def train_arm(
    recipe: Recipe, arm: str, run_dir: str | pathlib.Path, seed: int, overrides: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train one arm with one seed and write its files; returns the summary."""
    keep_recipe(recipe, run_dir)
    out = arm_dir(run_dir, arm, seed)
    task = build_task(recipe)
    config = arm_config(
        recipe, arm, output_dir=str(out), seed=seed, train_size=len(task.train_dataset), overrides=overrides
    )
    model = build_recipe_model(recipe, task, seed)
    tracker = TargetTracker(recipe.target)
    trainer_class = LevyTrainer if recipe.arms[arm].trainer == "levy" else Trainer
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        data_collator=task.data_collator,
        compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        callbacks=[tracker],
    )
    result = trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    history = trainer.state.log_history
    summary = summarize(recipe, arm, seed, config, history, tracker, result.metrics)
    _write(
        out / "config.json",
        {**config.to_dict(), "trainer": recipe.arms[arm].trainer, "task": recipe.task, "model": recipe.model},
    )
    _write(out / "log_history.json", history)
    _write(out / "timeline.json", tracker.timeline)
    _write(out / SUMMARY, summary)
    return summary


def summarize(
    recipe: Recipe,
    arm: str,
    seed: int,
    config: Any,
    history: list[dict[str, Any]],
    tracker: TargetTracker,
    train_metrics: dict[str, float],
) -> dict[str, Any]:
    """The per-arm numbers of the report (see docs/recipes.md for their definitions)."""
    metric = recipe.target.metric
    evals = [h[metric] for h in history if metric in h]
    batch = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * max(1, config.world_size)
    )
    runtime = train_metrics.get("train_runtime", float("nan"))
    # LevyCallback's running total: every refresh and calibration, also those between two logs.
    sketch_seconds = max((h.get("curvature/sketch_seconds_total", 0.0) for h in history), default=0.0)
    reached = tracker.reached
    losses = [h["loss"] for h in history if "loss" in h]
    run_end = history[-1] if history else {}
    return {
        "arm": arm,
        "seed": seed,
        "trainer": recipe.arms[arm].trainer,
        "levy_alpha": config.levy_alpha if recipe.arms[arm].trainer == "levy" else None,
        "levy_noise_basis": config.levy_noise_basis if recipe.arms[arm].trainer == "levy" else None,
        "levy_scale": config.levy_scale if recipe.arms[arm].trainer == "levy" else None,
        "global_batch_size": batch,
        "steps": history[-1].get("step", 0) if history else 0,
        "final_metric": evals[-1] if evals else None,
        "best_metric": (max(evals) if recipe.target.greater_is_better else min(evals)) if evals else None,
        "final_train_loss": losses[-1] if losses else None,
        "steps_to_target": reached["step"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,  # the Trainer's count (last batch kept)
        "seconds_to_target": reached["seconds"] if reached else None,
        "train_runtime": runtime,
        "samples_per_second": train_metrics.get("train_samples_per_second"),
        "sketch_seconds": sketch_seconds,
        "sketch_share": sketch_seconds / runtime if runtime and math.isfinite(runtime) else None,
        # LevyCallback's whole-run shares: steps whose noise norm the cap set, α-stable draws the clip cut
        "num_eigenpairs": config.num_eigenpairs if recipe.arms[arm].trainer == "levy" else None,
        "levy_virtual_batch_size": config.levy_virtual_batch_size
        if recipe.arms[arm].trainer == "levy"
        else None,
        # medians over the logging windows and calibrations of the run (None without noise or calibration)
        "noise_to_grad_ratio": _median(history, "levy/noise_to_grad_ratio"),
        "noise_variance_share": _median(history, "levy/noise_variance_share"),
        "capped_fraction": run_end.get("levy/run_capped_fraction"),
        "clipped_fraction": run_end.get("levy/run_clipped_fraction"),
        "target": {"metric": metric, "value": recipe.target.value},
    }


def _median(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return statistics.median(values) if values else None


def compare(
    recipe: Recipe,
    run_dir: str | pathlib.Path,
    *,
    seeds: list[int] | None = None,
    arms: list[str] | None = None,
    overrides: dict[str, str] | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every (arm, seed) not yet finished in ``run_dir``; returns all summaries."""
    seeds = seeds if seeds is not None else recipe.seeds
    arms = arms or list(recipe.arms)
    for name in arms:
        if name not in recipe.arms:
            raise RecipeError(f"{recipe.path}: no arm {name!r}; arms: {sorted(recipe.arms)}")
    keep_recipe(recipe, run_dir)
    summaries = []
    jobs = [(arm, seed) for seed in seeds for arm in arms]
    for i, (arm, seed) in enumerate(jobs, 1):
        path = arm_dir(run_dir, arm, seed) / SUMMARY
        if path.is_file():
            progress(f"[{i}/{len(jobs)}] {arm} seed {seed}: already done, kept")
            summaries.append(json.loads(path.read_text()))
            continue
        progress(f"[{i}/{len(jobs)}] {arm} seed {seed}: training")
        start = time.perf_counter()
        summaries.append(train_arm(recipe, arm, run_dir, seed, overrides))
        progress(f"[{i}/{len(jobs)}] {arm} seed {seed}: done in {time.perf_counter() - start:.0f} s")
    return summaries


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
) -> tuple[pathlib.Path, pathlib.Path]:
    """``hf-levy tail-index``: α̂ of the gradient noise against batch size, pooled and per eigen-direction.

    The model is the recipe's at initialization, or loaded from ``checkpoint`` (a directory written by
    ``save_pretrained``/a Trainer checkpoint). The directions are its top ``num_eigenpairs`` Hessian
    eigenvectors on a seeded sketch batch of the train set. Writes ``tail_index.md`` and
    ``tail_index.png`` into ``output_dir``; returns their paths.
    """

    from hf_levy.diagnostics import format_table, tail_index_profile
    from hf_levy.hvp import make_hvp
    from hf_levy.lanczos import lanczos
    from hf_levy.params import num_elements, trainable_parameters
    from hf_levy.recipes.plots import plot_tail_index
    from hf_levy.rng import step_generator

    task = build_task(recipe)
    if checkpoint is not None and not pathlib.Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} is not a directory (a checkpoint-N folder of a run)"
        )
    model = build_recipe_model(recipe, task, seed, checkpoint=checkpoint)
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


def keep_recipe(recipe: Recipe, run_dir: str | pathlib.Path) -> None:
    """Copy the recipe into ``run_dir`` so that ``hf-levy report RUN_DIR`` needs nothing else."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    copy = run_dir / "recipe.yaml"
    if not copy.is_file() or copy.read_text() != recipe.path.read_text():
        if copy.is_file() and any(run_dir.glob("*/seed*/summary.json")):
            raise RecipeError(
                f"{run_dir} holds finished arms of a different recipe.yaml; use another --output_dir or delete it"
            )
        shutil.copyfile(recipe.path, copy)
    (run_dir / "run.json").write_text(json.dumps({"recipe": recipe.name, "source": str(recipe.path)}))


def _write(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
