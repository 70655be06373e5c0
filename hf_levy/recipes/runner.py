"""Run a recipe's arms: one arm (``hf-levy train``) or all of them, resumably (``hf-levy compare``).

Each arm and seed writes into ``RUN_DIR/<arm>/seed<k>/``: ``config.json`` (the resolved config, written
before training starts), ``log_history.json`` (the Trainer's logs), ``timeline.json`` (training seconds at
each log) and ``summary.json`` (the numbers the report compares, written last). Whether an arm is kept,
resumed from its last checkpoint or trained again is :func:`hf_levy.recipes.arm_files.arm_state`'s answer.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_levy.recipes import tasks
from hf_levy.recipes.arm_files import (
    CONFIG,
    SUMMARY,
    TRACKER,
    arm_record,
    arm_state,
    last_checkpoint,
    read_json,
    write_json,
    write_text,
)
from hf_levy.recipes.recipe import Recipe, RecipeError, Target, arm_config, code_keys
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


class TargetTracker(TrainerCallback):
    """Records training seconds at every log and the first step whose eval metric reaches the target.

    Training seconds are wall-clock since training began minus the evaluations' own runtime (``eval_runtime``),
    so arms that evaluate at different intervals compare by what their training cost. Its state goes into
    every checkpoint (``target_tracker.json``), so that a resumed arm counts on from there.
    """

    def __init__(self, target: Target):
        self.target = target
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.seconds_before = 0.0  # training and wall-clock seconds of the sessions before a resume
        self.wall_before = 0.0
        self.timeline: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def training_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start - self.eval_seconds

    def state_dict(self) -> dict[str, Any]:
        return {
            "training_seconds": self.training_seconds(),
            "wall_seconds": self.wall_before + time.perf_counter() - self.start,
            "timeline": self.timeline,
            "reached": self.reached,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds_before, self.wall_before = state["training_seconds"], state["wall_seconds"]
        self.timeline, self.reached = state["timeline"], state["reached"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.timeline.append({"step": state.global_step, "seconds": self.training_seconds()})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = pathlib.Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_json(folder / TRACKER, self.state_dict())

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


def build_recipe_model(
    recipe: Recipe,
    task: tasks.Task,
    seed: int,
    checkpoint: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> Any:
    """The recipe's model: built from its config (seeded), or ``pretrained`` (a hub id, a folder, or
    ``package:NAME``) loaded with the remaining keys, optionally wrapped with LoRA adapters (``lora``).

    Raises:
        RecipeError: the ``model`` keys would run code (:func:`recipe.code_keys`) and ``trust_remote_code``
            is False; nothing has been loaded then.
    """
    import transformers

    risky = code_keys(recipe.model)
    if risky and not trust_remote_code:
        raise RecipeError(
            f"{recipe.path}: model {'; '.join(risky)}. Recipes are data, so this runs only when the command "
            "line opts in: add --trust_remote_code (after reading the code it will run)"
        )
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
    recipe: Recipe,
    arm: str,
    run_dir: str | pathlib.Path,
    seed: int,
    overrides: dict[str, str] | None = None,
    *,
    task: tasks.Task | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Train one arm with one seed and write its files; returns the summary.

    An arm left unfinished with the same resolved config resumes from its last complete checkpoint; files of
    another config (or of a finished run: ``hf-levy train`` trains again) are removed first (see
    :func:`arm_state`). ``task`` is the recipe's task when the caller already built it.
    """
    keep_recipe(recipe, run_dir)
    out = arm_dir(run_dir, arm, seed)
    task = task or build_task(recipe)
    config = arm_config(
        recipe, arm, output_dir=str(out), seed=seed, train_size=len(task.train_dataset), overrides=overrides
    )
    record = arm_record(recipe, arm, config)
    model = build_recipe_model(recipe, task, seed, trust_remote_code=trust_remote_code)
    state, _ = arm_state(out, record)
    checkpoint = last_checkpoint(out) if state == "interrupted" else None
    if state in ("stale", "finished"):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG, record)
    tracker = TargetTracker(recipe.target)
    if checkpoint is not None:
        tracker.load_state_dict(read_json(checkpoint / TRACKER))
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
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    history = trainer.state.log_history
    summary = summarize(recipe, arm, seed, config, history, tracker, result.metrics)
    summary["resumed_from_step"] = int(checkpoint.name.rpartition("-")[2]) if checkpoint else None
    summary["overrides"] = dict(overrides or {})
    write_json(out / "log_history.json", history)
    write_json(out / "timeline.json", tracker.timeline)
    write_json(out / SUMMARY, summary)
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
    # this session's runtime plus, for a resumed arm, the sessions before it
    runtime = train_metrics.get("train_runtime", float("nan")) + tracker.wall_before
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
    trust_remote_code: bool = False,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every (arm, seed) of ``run_dir`` not finished with its resolved config now; returns all summaries.

    Each arm's state (:func:`arm_state`) is printed: kept, resumed from a checkpoint, or trained again and why.
    """
    seeds = seeds if seeds is not None else recipe.seeds
    arms = arms or list(recipe.arms)
    for name in arms:
        if name not in recipe.arms:
            raise RecipeError(f"{recipe.path}: no arm {name!r}; arms: {sorted(recipe.arms)}")
    keep_recipe(recipe, run_dir)
    task = build_task(recipe)
    summaries = []
    jobs = [(arm, seed) for seed in seeds for arm in arms]
    for i, (arm, seed) in enumerate(jobs, 1):
        folder = arm_dir(run_dir, arm, seed)
        config = arm_config(
            recipe,
            arm,
            output_dir=str(folder),
            seed=seed,
            train_size=len(task.train_dataset),
            overrides=overrides,
        )
        state, why = arm_state(folder, arm_record(recipe, arm, config))
        progress(f"[{i}/{len(jobs)}] {arm} seed {seed}: {why}")
        if state == "finished":
            summaries.append(read_json(folder / SUMMARY))
            continue
        start = time.perf_counter()
        summaries.append(
            train_arm(recipe, arm, run_dir, seed, overrides, task=task, trust_remote_code=trust_remote_code)
        )
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
    trust_remote_code: bool = False,
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


def keep_recipe(recipe: Recipe, run_dir: str | pathlib.Path) -> None:
    """Copy the recipe into ``run_dir`` so that ``hf-levy report RUN_DIR`` needs nothing else.

    The copy follows the recipe: after an edit, each arm's recorded config decides what trains again.
    """
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "recipe.yaml", recipe.path.read_text())
    write_json(run_dir / "run.json", {"recipe": recipe.name, "source": str(recipe.path)})
