"""Run a recipe's arms: one arm (``hf-levy train``) or all of them, resumably (``hf-levy compare``).

Each arm and seed writes into ``RUN_DIR/<arm>/seed<k>/``: ``config.json`` (the resolved config, written
before training starts), ``log_history.json`` (the Trainer's logs), ``timeline.json`` (training seconds at
each log) and ``summary.json`` (the numbers the report compares, written last). Whether an arm is kept,
resumed from its last checkpoint or trained again is :func:`hf_levy.recipes.arm_files.arm_state`'s answer.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from hf_levy._compat import reset_accelerator_state
from hf_levy.recipes import models, small_data_tasks, tasks
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
from hf_levy.recipes.recipe import Recipe, RecipeError, arm_config, refuse_code
from hf_levy.recipes.run_folder import Ranks, own_run_folder
from hf_levy.recipes.tracker import TargetTracker, summarize
from hf_levy.trainer import LevyTrainer

# Task builders a recipe can name (recipes are data, so the name must map to code somewhere).
TASKS: dict[str, Callable[..., tasks.Task]] = {
    "modular_addition": tasks.modular_addition,
    "modular_arithmetic": tasks.modular_arithmetic,
    "digits": tasks.digits,
    "python_source_bytes": tasks.python_source_bytes,
    "sentiment_templates": tasks.sentiment_templates,
    "hub_causal_lm": tasks.hub_causal_lm,
    "sparse_parity": small_data_tasks.sparse_parity,
    "sparse_regression": small_data_tasks.sparse_regression,
    "noisy_digits": small_data_tasks.noisy_digits,
}


def arm_dir(run_dir: str | pathlib.Path, arm: str, seed: int) -> pathlib.Path:
    """The folder of one arm and seed inside a run folder."""
    return pathlib.Path(run_dir) / arm / f"seed{seed}"


def build_task(recipe: Recipe) -> tasks.Task:
    """The recipe's task, built by the builder its ``task.name`` names with the other ``task`` keys."""
    spec = dict(recipe.task)
    name = spec.pop("name")
    if name not in TASKS:
        raise RecipeError(f"{recipe.path}: unknown task {name!r}; available: {sorted(TASKS)}")
    try:
        return TASKS[name](**spec)
    except (ValueError, TypeError) as err:  # the builder's own checks of its values
        raise RecipeError(f"{recipe.path}: task: {err}") from err


def build_recipe_model(
    recipe: Recipe,
    task: tasks.Task,
    seed: int,
    checkpoint: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> Any:
    """The recipe's model: built from its config (seeded), or ``pretrained`` loaded with the remaining keys.

    ``pretrained`` is a hub id, a folder, or ``package:NAME``; ``lora`` wraps the model with LoRA adapters.

    Raises:
        RecipeError: the ``model`` keys would run code (:func:`recipe.code_keys`) and ``trust_remote_code``
            is False; nothing has been loaded then.
    """
    import transformers

    refuse_code(recipe.path, recipe.model, trust_remote_code)
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
            model = model_class.from_pretrained(checkpoint or models.resolve_pretrained(pretrained), **spec)
    else:
        model = models.build_model(architecture, seed=seed, vocab_size=task.vocab_size, **spec)
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
    :func:`arm_state`). ``task`` is the recipe's task when the caller already built it. Under a multi-process
    launch only the main process writes (:mod:`hf_levy.recipes.run_folder`).

    Raises:
        RunFolderBusy: another run holds ``run_dir``.
    """
    task = task or build_task(recipe)
    config = _config(recipe, arm, run_dir, seed, task, overrides)
    ranks = Ranks(config)
    with own_run_folder(run_dir, ranks):
        if ranks.is_main:
            keep_recipe(recipe, run_dir)
        return _train(recipe, arm, run_dir, seed, overrides, task, config, ranks, trust_remote_code)


def _config(recipe: Recipe, arm: str, run_dir, seed: int, task: tasks.Task, overrides) -> Any:
    return arm_config(
        recipe,
        arm,
        output_dir=str(arm_dir(run_dir, arm, seed)),
        seed=seed,
        train_size=len(task.train_dataset),
        overrides=overrides,
    )


def _train(
    recipe: Recipe,
    arm: str,
    run_dir: str | pathlib.Path,
    seed: int,
    overrides: dict[str, str] | None,
    task: tasks.Task,
    config: Any,
    ranks: Ranks,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """:func:`train_arm` once the run folder is held.

    The main process empties or resumes the arm's folder, every rank trains, the main process writes the results.
    """
    out = arm_dir(run_dir, arm, seed)
    checkpoint = None
    if ranks.is_main:
        record = arm_record(recipe, arm, config)
        state, _ = arm_state(out, record)
        checkpoint = last_checkpoint(out) if state == "interrupted" else None
        if state in ("stale", "finished"):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, record)
    checkpoint = ranks.share(checkpoint)  # and no rank trains before the folder is ready
    model = build_recipe_model(recipe, task, seed, trust_remote_code=trust_remote_code)
    tracker = TargetTracker(recipe.target)
    if checkpoint is not None:
        tracker.load_state_dict(read_json(checkpoint / TRACKER))
    trainer_class = LevyTrainer if recipe.arms[arm].trainer == "levy" else Trainer
    if config.deepspeed:  # each arm's Trainer brings its own DeepSpeed plugin
        reset_accelerator_state()
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
    summary = summarize(recipe, arm, seed, config, history, tracker, result.metrics, len(task.train_dataset))
    summary["resumed_from_step"] = int(checkpoint.name.rpartition("-")[2]) if checkpoint else None
    summary["overrides"] = dict(overrides or {})
    if ranks.is_main:
        write_json(out / "log_history.json", history)
        write_json(out / "timeline.json", tracker.timeline)
        write_json(out / SUMMARY, summary)
    ranks.barrier()
    return summary


def compare(
    recipe: Recipe,
    run_dir: str | pathlib.Path,
    *,
    seeds: list[int] | None = None,
    arms: list[str] | None = None,
    overrides: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] = print,
    report: bool = False,
) -> list[dict[str, Any]]:
    """Train every (arm, seed) of ``run_dir`` not finished with its resolved config now; returns all summaries.

    Each arm's state (:func:`arm_state`) is printed: kept, resumed from a checkpoint, or trained again and why;
    with ``report``, the report is built at the end and its path printed. Under a multi-process launch the main
    process alone decides, writes and prints; the others train with it.

    Raises:
        RunFolderBusy: another run holds ``run_dir``.
    """
    seeds = seeds if seeds is not None else recipe.seeds
    arms = arms or list(recipe.arms)
    for name in arms:
        if name not in recipe.arms:
            raise RecipeError(f"{recipe.path}: no arm {name!r}; arms: {sorted(recipe.arms)}")
    task = build_task(recipe)
    # Every config resolved before anything runs: a bad value stops the run before its first arm trains.
    jobs = [
        (arm, seed, _config(recipe, arm, run_dir, seed, task, overrides)) for seed in seeds for arm in arms
    ]
    ranks = Ranks(jobs[0][2])
    say = progress if ranks.is_main else lambda text: None
    summaries = []
    with own_run_folder(run_dir, ranks):
        if ranks.is_main:
            keep_recipe(recipe, run_dir)
        for i, (arm, seed, config) in enumerate(jobs, 1):
            folder = arm_dir(run_dir, arm, seed)
            decision = arm_state(folder, arm_record(recipe, arm, config)) if ranks.is_main else None
            state, why = ranks.share(decision)
            say(f"[{i}/{len(jobs)}] {arm} seed {seed}: {why}")
            if state == "finished":
                summaries.append(read_json(folder / SUMMARY))
                continue
            start = time.perf_counter()
            summaries.append(
                _train(recipe, arm, run_dir, seed, overrides, task, config, ranks, trust_remote_code)
            )
            say(f"[{i}/{len(jobs)}] {arm} seed {seed}: done in {time.perf_counter() - start:.0f} s")
        if report and ranks.is_main:
            from hf_levy.recipes.report import build_report

            say(f"report: {build_report(run_dir)}")
    return summaries


def keep_recipe(recipe: Recipe, run_dir: str | pathlib.Path) -> None:
    """Copy the recipe into ``run_dir`` so that ``hf-levy report RUN_DIR`` needs nothing else.

    The copy follows the recipe: after an edit, each arm's recorded config decides what trains again.
    """
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "recipe.yaml", recipe.path.read_text())
    write_json(run_dir / "run.json", {"recipe": recipe.name, "source": str(recipe.path)})
