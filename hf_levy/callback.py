"""LevyCallback: the Hessian sketch and the α-stable noise, sequenced on a transformers Trainer's events.

Where it acts in the loop (transformers 5.x ``Trainer._run_epoch``):

* ``on_step_begin`` (once per optimizer step, before its first micro-batch): refresh the sketch when the
  :class:`~hf_levy._schedule.RefreshSchedule` says so. Products never write ``.grad`` (FSDP's are saved and
  restored), so DDP buckets and the gradient-accumulation state are untouched.
* ``on_pre_optimizer_step`` (once per optimizer step, after accumulation, the DDP all-reduce or FSDP
  reduce-scatter, fp16 unscaling and ``max_grad_norm`` clipping, right before ``optimizer.step()``, and
  never on a step the loop skips): add ξ to ``.grad``. Under DeepSpeed the step has already run by then:
  ξ enters through :func:`hf_levy._zero_space.install_before_step` instead.
* ``on_log``: merge the ``levy/`` metrics into the training log entry (in a :class:`hf_levy.LevyTrainer`,
  or a trainer it was attached to, the trainer's ``log`` does it first, and each refresh's ``curvature/``
  metrics are logged at ``on_step_begin`` as an entry of their own; without a trainer they join the next
  training log).
  A callback passed in ``callbacks=[...]`` moves itself to the head of the callback list (at
  ``on_init_end`` and ``on_train_begin``), so the reporting callbacks of ``report_to``, which come before a
  user's, see them.
* ``on_save``: write the :mod:`hf_levy._checkpoint` file into the checkpoint; on resume it is read back
  (see :mod:`hf_levy._callback_wiring` for how a callback finds the checkpoint).

:class:`hf_levy.LevyTrainer` (or :meth:`LevyCallback.attach`, which gives another Trainer class its
overrides) is needed only for what no event carries: the gradient norm before ``max_grad_norm`` clipping
(calibration), each optimizer step's micro-batches (the 'minibatch' bases, the noise scale), and the exact
folder of a resumed checkpoint when it is neither ``output_dir/checkpoint-<step>`` nor the arguments'
``resume_from_checkpoint``.

Legend: P trainable parameters (flat; this rank's padded piece under FSDP), K eigenpairs.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from hf_levy._callback_wiring import checkpoint_folder, move_to_front, resumed_checkpoint
from hf_levy._checkpoint import load_levy_state, save_levy_state
from hf_levy._progress import counted, sketch_progress
from hf_levy._run import MINIBATCH_BASES, LevyRun, OnceWarnings
from hf_levy._run_hvp import sketch_batch, sketch_matvec
from hf_levy._run_setup import start_run
from hf_levy._zero_space import clip_zero_grads, install_before_step
from hf_levy.config import LevyArguments
from hf_levy.hvp import DoubleBackwardError, LossFn
from hf_levy.params import rank_and_world
from hf_levy.sketch import SketchDiscardedWarning

logger = logging.getLogger(__name__)


class LevyCallback(TrainerCallback):
    """Adds Hessian-shaped α-stable noise to the gradients of a Trainer's trainable parameters.

    Use :class:`hf_levy.LevyTrainer`, or attach this to another Trainer subclass (e.g. TRL's SFTTrainer)::

        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=ds)
        LevyCallback(LevyArguments(levy_alpha=1.5, levy_scale=0.3)).attach(trainer)

    ``callbacks=[LevyCallback(...)]`` and ``trainer.add_callback(LevyCallback(...))`` work too, except for
    calibration under gradient clipping (refused with an error) and a resume from a folder the callback
    cannot see (a warning; the sketch is then recomputed): both need ``attach``.

    Args:
        levy_args: the levy fields (a :class:`LevyConfig` or a plain :class:`LevyArguments`).
        loss_fn: ``(model, batch) -> loss`` for the sketch; default ``model(**batch).loss``.
    """

    def __init__(self, levy_args: LevyArguments, *, loss_fn: LossFn | None = None):
        levy_args.validate_levy_arguments()
        self.levy = levy_args
        self.loss_fn = loss_fn
        # 'auto' is decided at the first refresh and kept for later runs of this callback.
        self.hvp_method: str | None = None if levy_args.hvp_method == "auto" else levy_args.hvp_method
        self.run: LevyRun | None = None  # this training run's state, fresh at every on_train_begin
        self.noise_draws = 0  # optimizer steps that received noise, over all runs
        self._attached = False
        self._log_sketch: Callable[[dict[str, float]], None] | None = None  # an attached trainer's entry
        self._resumed_from: str | None = None  # the checkpoint attach saw the Trainer resume from
        self._pending_state: tuple[str, dict[str, Tensor]] | None = None  # its file and state, until begin
        self._saved_step: int | None = None  # the step whose checkpoint attach already wrote the file into
        self._show_progress = False  # the sketch's progress bar: main process, unless disable_tqdm
        self._pre_clip_norm: Any = None  # this step's gradient norm before max_grad_norm clipping
        self._warnings = OnceWarnings(logger)  # the callback's own, once per callback (a run's: once per run)
        self._state: Any = None  # the TrainerState, for the DeepSpeed seam

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> LevyCallback:
        """Install into ``trainer`` (any ``transformers.Trainer``); returns self.

        The callback goes first in its callback list, and the trainer gets the overrides of
        :class:`hf_levy.LevyTrainer` (:func:`hf_levy.trainer.attach`): the checkpoint save (the file is then
        in the folder before a Hub push of it starts) and load, the gradient clipping (the pre-clip norm),
        the step's micro-batches and ``log``.

        Raises:
            ValueError: when ``trainer`` already has another LevyCallback.
        """
        from hf_levy.trainer import attach  # the trainer module imports this one

        attach(self, trainer)
        return self

    def _saving(self, checkpoint_dir: str, args: Any, step: int) -> None:
        """Before the trainer writes checkpoint ``step`` (its override): the sketch goes in first."""
        self.save_state(checkpoint_dir, args)
        self._saved_step = step

    def _step_batches(self, batches: list[Any]) -> None:
        """When the trainer has drawn an optimizer step's micro-batches (its override).

        The 'minibatch' bases and the noise scale's extra gradient draw their sub-batch from them.
        """
        subbatch = (
            self.levy.levy_noise_basis in MINIBATCH_BASES or self.levy.gradient_noise_scale_every_n_steps
        )
        if self.run is not None and subbatch:
            self.run.step_batches = list(batches)

    def _clipped(self, pre_clip_norm: Any) -> None:
        """After max_grad_norm clipping (the trainer's override): the norm before it (calibration needs it)."""
        self._pre_clip_norm = pre_clip_norm

    def save_state(self, checkpoint_dir: str, args: Any) -> None:
        """Write the sketch, the calibration, the schedule and the run's noise tally into ``checkpoint_dir``.

        Written by the main process (vectors identical on all ranks), or under FSDP by every rank, each its
        piece.
        """
        run = self.run
        if run is None or not (run.space.sharded or args.should_save):
            return
        save_levy_state(
            checkpoint_dir,
            run.state_dict(),
            {"hvp_method": str(self.hvp_method)},
            sharded=run.space.sharded,
            rank=rank_and_world()[0],
        )

    def load_state(self, checkpoint_dir: str | None) -> None:
        """Read the sketch saved in ``checkpoint_dir``; it is checked and installed when training begins.

        Raises:
            ValueError: naming the file, when it cannot be read.
        """
        if not checkpoint_dir:
            return
        self._resumed_from = checkpoint_dir
        self._pending_state = load_levy_state(checkpoint_dir, rank=rank_and_world()[0])
        if self._pending_state is None and self.levy.levy_noise_basis != "minibatch":
            logger.warning(
                "%s has no hf_levy state: the Hessian sketch is recomputed at the next step", checkpoint_dir
            )

    def _warn_once(self, key: str, message: str) -> None:
        self._warnings.warn(
            key, "hf_levy: %s. Use hf_levy.LevyTrainer or LevyCallback(...).attach(trainer)", message
        )

    def _to_front(self) -> None:
        # attach placed it first already; a callback a user puts before it afterwards stays there.
        if not self._attached and not move_to_front(self):
            self._warn_once(
                "order",
                "LevyCallback could not move ahead of the report_to loggers: they may miss its metrics",
            )

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        """Move to the head of the callback list (see :meth:`on_log`)."""
        self._to_front()

    def on_train_begin(
        self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs
    ):
        """Check the setup and start this run's state (with a resumed checkpoint's sketch).

        Raises:
            ValueError: naming the setting and the fix, for a setup the levy fields cannot run on.
        """
        self._to_front()  # again: add_callback appends after the Trainer's construction
        subbatch = self.levy.levy_noise_basis in MINIBATCH_BASES
        if subbatch and not self._attached:
            raise ValueError(
                f"levy_noise_basis={self.levy.levy_noise_basis!r} draws its sub-batch from each optimizer "
                "step's batch, which the Trainer hands to no callback: use hf_levy.LevyTrainer or "
                "LevyCallback(...).attach(trainer) instead of callbacks=[...] or add_callback"
            )
        if self.levy.gradient_noise_scale_every_n_steps and not self._attached:
            raise ValueError(
                f"gradient_noise_scale_every_n_steps={self.levy.gradient_noise_scale_every_n_steps} draws its "
                "sub-batch from each optimizer step's batch, which the Trainer hands to no callback: use "
                "hf_levy.LevyTrainer or LevyCallback(...).attach(trainer), or set it to 0"
            )
        if self.levy.levy_virtual_batch_size is not None and not self._attached and args.max_grad_norm:
            raise ValueError(
                "levy_virtual_batch_size (calibration) needs the gradient norm before max_grad_norm "
                "clipping, which the Trainer hands to no callback: use hf_levy.LevyTrainer or "
                "LevyCallback(...).attach(trainer) instead of callbacks=[...] or add_callback, or set "
                "max_grad_norm=0"
            )
        self.run = run = start_run(self.levy, args, model, train_dataloader, optimizer)
        if not run.space.exact_products:
            self.hvp_method = "finite_difference"
        if run.space.steps_inside_backward and self.levy.levy_scale != 0:
            self._state = state  # the seam runs inside backward, where no event hands over the step
            install_before_step(run.space.optimizer, self._before_zero_step)
        if state.global_step > 0 and self._resumed_from is None:  # resumed; attach did not see from where
            self._load_resumed_state(args, state)
        if self._pending_state is not None:
            path, saved = self._pending_state
            run.load_state_dict(saved, source=path)
        self._pending_state = self._resumed_from = None
        self._show_progress = state.is_world_process_zero and not args.disable_tqdm

    def _load_resumed_state(self, args, state) -> None:
        checkpoint = resumed_checkpoint(args, state)
        if checkpoint is not None:
            self.load_state(checkpoint)
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self._warn_once(
            "resume",
            f"training resumed at step {state.global_step}, but LevyCallback cannot see the checkpoint (not "
            f"{folder} nor args.resume_from_checkpoint): the Hessian sketch is recomputed at this step and "
            "the run differs from an uninterrupted one",
        )

    def on_save(self, args, state, control, **kwargs):
        """Write the sketch into the checkpoint just saved (unless the trainer's override wrote it before)."""
        if self._saved_step == state.global_step:  # attach wrote it before the Trainer's own files
            return
        folder = checkpoint_folder(args, state)
        if folder is not None:
            self.save_state(folder, args)
        elif self.run is not None and self.run.sketch.ready:
            self._warn_once(
                "save",
                f"the checkpoint of step {state.global_step} is not in {args.output_dir} (a hyperparameter-"
                "search trial?): LevyCallback cannot save the sketch with it",
            )

    def on_step_begin(self, args, state, control, **kwargs):
        """Refresh the sketch when its schedule says so (then calibrate, when asked to)."""
        run = self.run
        step = state.global_step
        if self.levy.levy_noise_basis == "minibatch":  # nothing reads the eigenvectors
            return
        if not run.schedule.due(step, run.sketch.attempted):  # a discarded refresh waits a period too
            return
        previous = run.sketch.step
        with run.schedule.refreshing():
            with warnings.catch_warnings():  # a discarded sketch is warned about once per run, below
                warnings.simplefilter("ignore", SketchDiscardedWarning)
                run.sketch_metrics = self.refresh_sketch(step)
            failed = run.sketch.failure is not None
            if not failed:
                run.warn_if_unconverged(step)
            if not failed:
                run.space.orient_(run.sketch.vectors_PK)
            if rank_and_world()[1] > 1 and not failed and not run.space.sharded:
                # Every rank ran the same Lanczos on the same averaged products, so the vectors already agree;
                # the broadcast makes that a guarantee: replicas whose noise differed would drift apart.
                run.space.broadcast_(run.sketch.vectors_PK)
                run.space.broadcast_(run.sketch.values_K)
            calibrated = self.levy.levy_noise_basis not in MINIBATCH_BASES  # those read b' in κ instead
            if not failed and calibrated and self.levy.levy_virtual_batch_size is not None:
                run.sketch_metrics.update(self.calibrate(step))
        if failed:
            run.failed_refreshes += 1
            run.warn_sketch_failed(step)
        elif previous is not None:
            run.sketch_metrics["curvature/sketch_period"] = float(step - previous)
        # The whole refresh (batch, products, Lanczos, broadcast, calibration): the terms of the total.
        run.sketch_metrics["curvature/sketch_seconds"] = run.schedule.refresh_seconds
        if self._log_sketch is not None and args.logging_strategy != "no":
            # An entry of its own at this step, so report_to loggers plot the sketch where it was computed
            # (the callbacks=[...] form has no trainer to log through: the next training log carries it).
            metrics, run.sketch_metrics = run.sketch_metrics, {}
            self._log_sketch(metrics)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Add this step's noise to the gradient (and measure the gradient noise scale when due)."""
        run, levy, step = self.run, self.levy, state.global_step
        if run.space.steps_inside_backward:  # the noise went in before the engine's step
            run.step_batches = []
            return
        every = levy.gradient_noise_scale_every_n_steps
        free = levy.levy_scale != 0 and levy.levy_noise_basis in MINIBATCH_BASES  # g_b is computed anyway
        if every and not free and step % every == 0:  # before ξ: ‖g‖ is the step's own gradient's
            run.measure_noise_scale(step, self._pre_clip_norm, self.loss_fn)
        basis = levy.levy_noise_basis
        if levy.levy_scale != 0 and (
            basis == "minibatch" or (basis == "minibatch_topk" and run.sketch.ready)
        ):
            if run.add_minibatch_noise(step, self._pre_clip_norm, self.loss_fn):
                self.noise_draws += 1
        elif levy.levy_scale != 0 and run.sketch.ready and basis not in MINIBATCH_BASES:
            self.add_noise(step)
        run.step_batches = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the metrics to a training log and the summary, when no trainer override did it before."""
        if self._attached or logs is None:  # the trainer's log() merged them before any callback ran
            return
        metrics = self._log_metrics(logs)
        logs.update(metrics)
        # The Trainer appended this entry before calling on_log: copy the metrics into it (saved logs see them).
        if metrics and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _log_metrics(self, logs: dict[str, Any]) -> dict[str, float]:
        """The metrics to add to ``logs``: for a training log and the end-of-training summary, else none."""
        if self.run is None or not ("loss" in logs or "train_runtime" in logs):
            return {}
        self.run.warn_if_mostly_capped()
        alpha = None if self.levy.levy_noise_basis in MINIBATCH_BASES else self.levy.levy_alpha
        return self.run.log_metrics(summary="loss" not in logs, alpha=alpha)

    # ------------------------------------------------------------------ stages
    def refresh_sketch(self, step: int) -> dict[str, float]:
        """Recompute the eigenpairs on this step's sketch batch; returns the curvature metrics."""
        run = self.run
        batch = sketch_batch(run.dataset, run.collate_fn, self.levy.sketch_batch_size, run.seed, step)
        total = run.sketch.settings.num_iters or run.space.dim
        with sketch_progress(self._show_progress, total, step) as bar:
            if self.hvp_method is None:  # "auto": exact products unless the model cannot differentiate twice
                try:
                    metrics = run.sketch.refresh(
                        self._matvec(batch, "autograd", bar), run.space.dim, step, reduce=run.space.reduce
                    )
                    self.hvp_method = "autograd"
                    logger.info("hf_levy: hvp_method='auto' chose exact double-backward products")
                    return metrics
                except DoubleBackwardError as err:
                    self.hvp_method = "finite_difference"
                    logger.warning(
                        "hf_levy: hvp_method='auto' chose finite differences (%s)", str(err).split(". ")[0]
                    )
                    if bar is not None:
                        bar.reset()
            return run.sketch.refresh(
                self._matvec(batch, self.hvp_method, bar), run.space.dim, step, reduce=run.space.reduce
            )

    def _matvec(self, batch: dict[str, Any], method: str, bar: Any = None):
        run = self.run
        return counted(sketch_matvec(run.model, batch, run.params, run.space, method, self.loss_fn), bar)

    def calibrate(self, step: int) -> dict[str, float]:
        """Fit the noise of batch size b along the new eigenvectors (:meth:`LevyRun.calibrate`)."""
        return self.run.calibrate(step, self.loss_fn)

    def _before_zero_step(self, max_norm: float) -> float:
        """DeepSpeed (:func:`hf_levy._zero_space.install_before_step`): clip, add ξ; returns ‖g‖ before clipping."""
        self._pre_clip_norm = norm = clip_zero_grads(self.run.space, max_norm)
        if self.run.sketch.ready and math.isfinite(norm):
            self.add_noise(self._state.global_step)
        return norm

    def add_noise(self, step: int) -> None:
        """g ← g + ξ on this step (see :meth:`hf_levy._run.LevyRun.add_noise`)."""
        pre_clip = self._pre_clip_norm if self.run.calibration is not None else None  # read only where used
        if self.run.add_noise(step, pre_clip):
            self.noise_draws += 1
