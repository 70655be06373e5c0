"""What one arm's training measures: the target tracker (a Trainer callback) and the summary the report reads.

:class:`TargetTracker` records training seconds at every log and the first evaluation that reaches the
recipe's target; :func:`summarize` turns the log history and the tracker into ``summary.json``.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_levy.recipes.arm_files import TRACKER, write_json
from hf_levy.recipes.recipe import Recipe, Target


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
        """Start this session's clock (a resumed arm adds the seconds of the sessions before it)."""
        self.start = time.perf_counter()

    def training_seconds(self) -> float:
        """Training seconds so far: the earlier sessions' plus this one's wall-clock, less its evaluations."""
        return self.seconds_before + time.perf_counter() - self.start - self.eval_seconds

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: training and wall-clock seconds so far, the timeline, the target hit."""
        return {
            "training_seconds": self.training_seconds(),
            "wall_seconds": self.wall_before + time.perf_counter() - self.start,
            "timeline": self.timeline,
            "reached": self.reached,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint's :meth:`state_dict`: its seconds become the earlier sessions'."""
        self.seconds_before, self.wall_before = state["training_seconds"], state["wall_seconds"]
        self.timeline, self.reached = state["timeline"], state["reached"]

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append (step, training seconds) to the timeline."""
        self.timeline.append({"step": state.global_step, "seconds": self.training_seconds()})

    def on_save(self, args, state, control, **kwargs):
        """Write :meth:`state_dict` into the checkpoint the Trainer just saved (main process only)."""
        if state.is_world_process_zero:
            folder = pathlib.Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_json(folder / TRACKER, self.state_dict())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Take the evaluation's runtime out of training; record the first evaluation reaching the target.

        Reaching it stops training when the target says ``stop``.
        """
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


def summarize(
    recipe: Recipe,
    arm: str,
    seed: int,
    config: Any,
    history: list[dict[str, Any]],
    tracker: TargetTracker,
    train_metrics: dict[str, float],
    train_size: int,
) -> dict[str, Any]:
    """The per-arm numbers of the report (see docs/recipes.md for their definitions).

    ``global_batch_size`` is the examples one optimizer step consumes: per device × micro-batches × ranks,
    and at most the ``train_size`` examples of the train set (the ranks split a full batch between them).
    """
    metric = recipe.target.metric
    evals = [h[metric] for h in history if metric in h]
    nominal = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * max(1, config.world_size)
    )
    batch = min(nominal, train_size)
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
