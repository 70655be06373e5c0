"""LevyCallback: the Hessian sketch and the α-stable noise, wired into any transformers Trainer.

Where it acts in the loop (transformers 5.x ``Trainer._run_epoch``, see shared/notes/hf_internals.md):

* ``on_step_begin`` (once per optimizer step, before its first micro-batch): refresh the sketch when due.
  Products never write ``.grad`` (FSDP's are saved and restored), so DDP buckets and the
  gradient-accumulation state are untouched.
* ``on_pre_optimizer_step`` (once per optimizer step, after accumulation, the DDP all-reduce or FSDP
  reduce-scatter, fp16 unscaling and ``max_grad_norm`` clipping, right before ``optimizer.step()``):
  add ξ to ``.grad``.
* ``on_log``: merge the ``curvature/`` and ``levy/`` metrics into the training log entry.
* checkpoints: ``levy_state.safetensors`` (FSDP: one file per rank) is written into each checkpoint and
  read back on resume.

Legend: P trainable parameters (flat; this rank's padded piece under FSDP), K eigenpairs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from hf_levy import rng
from hf_levy.calibration import fit_directional_noise, injected_scale, microbatch_projections
from hf_levy.config import LevyArguments
from hf_levy.hvp import DoubleBackwardError, LossFn, make_hvp
from hf_levy.noise import isotropic_noise, step_noise
from hf_levy.noise_tally import NoiseTally
from hf_levy.params import ParameterSpace, sum_over_ranks, trainable_parameters
from hf_levy.rng import step_generator
from hf_levy.sketch import HessianSketch, SketchSettings

logger = logging.getLogger(__name__)

STATE_FILE = "levy_state.safetensors"
SHARDED_STATE_FILE = "levy_state_rank{rank}.safetensors"  # FSDP: each rank keeps its piece of the vectors
# The sketch schedule in the state file: total refresh seconds, the last refresh's seconds (NaN: none), and
# the step a sketch_max_overhead budget deferred the next refresh to (-1: none).
_SCHEDULE_KEYS = ("schedule_sketch_seconds_total", "schedule_refresh_seconds", "schedule_deferred_to")


class LevyCallback(TrainerCallback):
    """Adds Hessian-shaped α-stable noise to the gradients of a Trainer's trainable parameters.

    Use :class:`hf_levy.LevyTrainer`, or attach this to another Trainer subclass (e.g. TRL's SFTTrainer)::

        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=ds)
        LevyCallback(LevyArguments(levy_alpha=1.5, levy_scale=0.1)).attach(trainer)

    Args:
        levy_args: the levy fields (a :class:`LevyConfig` or a plain :class:`LevyArguments`).
        loss_fn: ``(model, batch) -> loss`` for the sketch; default ``model(**batch).loss``.
    """

    def __init__(self, levy_args: LevyArguments, *, loss_fn: LossFn | None = None):
        levy_args.validate_levy_arguments()
        self.levy = levy_args
        self.loss_fn = loss_fn
        self.sketch: HessianSketch | None = None
        self.space: ParameterSpace | None = None
        self.hvp_method: str | None = None if levy_args.hvp_method == "auto" else levy_args.hvp_method
        self.params: list[nn.Parameter] = []
        self.noise_draws = 0  # optimizer steps that received noise (tests count these)
        self._pending_state: dict[str, Tensor] | None = None
        self._sketch_metrics: dict[str, float] = {}
        self._noise_window = NoiseTally()  # the steps since the last log
        self._noise_run = NoiseTally()  # the steps of this run
        self._warned_capped = False  # the once-per-run warning for noise set by the cap
        self._skipped_nonfinite = 0
        self._warned_unconverged = False  # the once-per-run warning for a sketch that hit lanczos_num_iters
        # Calibration (levy_virtual_batch_size): per-direction α_K and injected scales c_inj_K, float64 CPU.
        self.calibrated_alpha_K: Tensor | None = None
        self.calibrated_scale_K: Tensor | None = None
        self._pre_clip_norm: Tensor | float | None = None  # this step's gradient norm before max_grad_norm
        # Sketch schedule and cost: wall seconds of the last refresh (+ calibration) and of all of them, the
        # training steps' wall seconds since then, and the step a sketch_max_overhead budget defers it to.
        self._refresh_seconds: float | None = None
        self._sketch_seconds_total = 0.0
        self._step_seconds: list[float] = []
        self._step_started: float | None = None
        self._deferred_to: int | None = None

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> LevyCallback:
        """Install into ``trainer``: first in the callback list (so loggers see the metrics) and around
        its checkpoint save/load. Returns self."""
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                "hf_levy does not support DeepSpeed: it runs the optimizer step inside backward, before any "
                "callback can add noise. Use DDP (`accelerate launch --multi_gpu`) or FSDP instead."
            )
        trainer.callback_handler.callbacks.insert(0, self)
        save_checkpoint, load_optimizer = trainer._save_checkpoint, trainer._load_optimizer_and_scheduler

        def _save_checkpoint(model, trial):
            name = f"checkpoint-{trainer.state.global_step}"
            self.save_state(os.path.join(trainer._get_output_dir(trial=trial), name), trainer.args)
            save_checkpoint(model, trial)

        def _load_optimizer_and_scheduler(checkpoint):
            load_optimizer(checkpoint)
            self.load_state(checkpoint)

        trainer._save_checkpoint = _save_checkpoint
        trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
        clip_grad_norm = getattr(trainer, "_clip_grad_norm", None)
        if clip_grad_norm is not None:  # transformers 5.x: returns the pre-clip norm; calibration needs it

            def _clip_grad_norm(model):
                self._pre_clip_norm = clip_grad_norm(model)
                return self._pre_clip_norm

            trainer._clip_grad_norm = _clip_grad_norm
        return self

    def save_state(self, checkpoint_dir: str, args: Any) -> None:
        """Write the sketch into ``checkpoint_dir``: by the main process (vectors identical on all ranks),
        or under FSDP by every rank, each its piece of the vectors."""
        if self.sketch is None or not self.sketch.ready or not (self.space.sharded or args.should_save):
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.sketch.state_dict().items()}
        if self.calibrated_scale_K is not None:
            state.update(calibrated_alpha=self.calibrated_alpha_K, calibrated_scale=self.calibrated_scale_K)
        state.update(
            {
                _SCHEDULE_KEYS[0]: torch.tensor(self._sketch_seconds_total, dtype=torch.float64),
                _SCHEDULE_KEYS[1]: torch.tensor(
                    math.nan if self._refresh_seconds is None else self._refresh_seconds, dtype=torch.float64
                ),
                _SCHEDULE_KEYS[2]: torch.tensor(-1 if self._deferred_to is None else self._deferred_to),
            }
        )
        path = _state_file(checkpoint_dir, self.space.sharded)
        save_file(state, path, metadata={"hvp_method": str(self.hvp_method)})

    def load_state(self, checkpoint_dir: str | None) -> None:
        """Read the sketch saved in ``checkpoint_dir``; it is installed when training begins."""
        if not checkpoint_dir:
            return
        for path in (_state_file(checkpoint_dir, sharded=True), _state_file(checkpoint_dir, sharded=False)):
            if os.path.isfile(path):
                self._pending_state = load_file(path)
                return
        logger.warning(
            "%s has no %s: the Hessian sketch is recomputed at the next step", checkpoint_dir, STATE_FILE
        )

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        # A new run (train() again, a hyperparameter trial): nothing of a previous run carries over except
        # what a checkpoint being resumed holds (_pending_state, installed below).
        self.calibrated_alpha_K = self.calibrated_scale_K = None
        self._refresh_seconds, self._sketch_seconds_total, self._deferred_to = None, 0.0, None
        self._step_seconds, self._step_started = [], None
        self._sketch_metrics, self._skipped_nonfinite = {}, 0
        self._noise_window, self._noise_run = NoiseTally(), NoiseTally()
        self._warned_unconverged = self._warned_capped = False
        self.model = model
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True): nothing to sketch or perturb"
            )
        self.space = ParameterSpace(self.params)
        if self.space.sharded:
            self._check_sharded_settings()
        self.seed = self.levy.levy_seed if self.levy.levy_seed is not None else args.seed
        self.dataset = train_dataloader.dataset
        self.collate_fn = train_dataloader.collate_fn
        if not hasattr(self.dataset, "__getitem__") or not hasattr(self.dataset, "__len__"):
            raise ValueError(
                "the sketch batch is drawn by index: LevyTrainer needs a map-style train_dataset"
            )
        if len(self.dataset) < self.levy.sketch_batch_size:
            raise ValueError(
                f"sketch_batch_size={self.levy.sketch_batch_size} exceeds the {len(self.dataset)} training "
                "examples; lower sketch_batch_size"
            )
        vector_dtype = (
            torch.float64 if self.params[0].dtype == torch.float64 else getattr(torch, self.levy.sketch_dtype)
        )
        offload = self.levy.sketch_offload
        vector_device = torch.device("cpu") if offload == "all" else self.space.device
        self.sketch = HessianSketch(
            SketchSettings(
                num_eigenpairs=min(self.levy.num_eigenpairs, self.space.dim),
                num_iters=min(self.levy.lanczos_num_iters, self.space.dim),
                tol=self.levy.lanczos_tol,
                seed=self.seed,
                vector_dtype=vector_dtype,
                vector_device=vector_device,
                basis_device=torch.device("cpu") if offload != "none" else None,
            )
        )
        per_step = _examples_per_batch(train_dataloader, args) * args.gradient_accumulation_steps
        # B: the examples in one optimizer step's gradient. A step that sees the whole training set has no
        # sampling noise of its own (None: the calibration then injects all of batch b's, c_inj = c_b).
        self.physical_batch_size = None if per_step >= len(self.dataset) else per_step
        virtual = self.levy.levy_virtual_batch_size
        if virtual is not None:
            effective = min(per_step, len(self.dataset))
            if virtual >= effective:
                raise ValueError(
                    f"levy_virtual_batch_size={virtual} must be smaller than the physical batch size "
                    f"{effective} (per-device batch x gradient_accumulation_steps x processes, at most the "
                    f"{len(self.dataset)} training examples): the noise of a smaller batch is what the "
                    "calibration imitates"
                )
            world = _rank_and_world()[1]
            if self.space.sharded and virtual < world:
                raise ValueError(
                    f"levy_virtual_batch_size={virtual} is smaller than the {world} FSDP ranks: every rank "
                    f"computes its share of each micro-batch; use levy_virtual_batch_size >= {world}"
                )
        if self._pending_state is not None:
            state_dict, self._pending_state = self._pending_state, None
            state_dict["vectors_KP"] = state_dict["vectors_KP"].to(vector_device, vector_dtype)
            self.calibrated_alpha_K = state_dict.pop("calibrated_alpha", None)
            self.calibrated_scale_K = state_dict.pop("calibrated_scale", None)
            total, refresh, deferred = (state_dict.pop(key, None) for key in _SCHEDULE_KEYS)
            if total is not None:  # checkpoints before the schedule was saved have none of the three
                self._sketch_seconds_total = float(total)
                self._refresh_seconds = None if math.isnan(float(refresh)) else float(refresh)
                self._deferred_to = None if int(deferred) < 0 else int(deferred)
            self.sketch.load_state_dict(state_dict)

    def _check_sharded_settings(self) -> None:
        if self.levy.hvp_method == "autograd":
            raise ValueError(
                "hvp_method='autograd' is not available under FSDP (sharded parameters have no double "
                "backward): set hvp_method='finite_difference' or 'auto'"
            )
        self.hvp_method = "finite_difference"
        world = _rank_and_world()[1]
        if self.levy.sketch_batch_size % world:
            logger.warning(
                "hf_levy: sketch_batch_size=%d is not a multiple of the %d ranks; FSDP averages the ranks' "
                "gradients equally, so the sketch weights their shares unevenly",
                self.levy.sketch_batch_size,
                world,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._step_started is not None and self.levy.sketch_max_overhead is not None:
            # the previous step, from after its sketch to now
            self._step_seconds.append(now - self._step_started)
        if self._sketch_due(state.global_step):
            self._sketch_step(state.global_step)
        self._step_started = time.perf_counter()

    def _sketch_due(self, step: int) -> bool:
        """Due every sketch_every_n_steps steps; with sketch_max_overhead, also not before the training steps
        since the last refresh took refresh seconds / budget (decided by rank 0, so all ranks agree)."""
        if not self.sketch.due(step, self.levy.sketch_every_n_steps):
            return False
        budget = self.levy.sketch_max_overhead
        if budget is None or self._refresh_seconds is None or not self.sketch.ready:
            return True
        if self._deferred_to is None:
            if not self._step_seconds:  # just resumed without a saved schedule: time one step first
                return False
            # The median step: evaluations and checkpoints between steps are outliers, not the step's cost.
            step_seconds = statistics.median(self._step_seconds)
            steps_needed = math.ceil(self._refresh_seconds / (budget * max(step_seconds, 1e-9)))
            deferred = torch.tensor(self.sketch.step + steps_needed, device=self.space.device)
            if _rank_and_world()[1] > 1:
                dist.broadcast(deferred, src=0)
            self._deferred_to = int(deferred)
        return step >= self._deferred_to

    def _sketch_step(self, step: int) -> None:
        start, previous = time.perf_counter(), self.sketch.step
        self._sketch_metrics = self.refresh_sketch(step)
        self._warn_if_unconverged(step)
        if _rank_and_world()[1] > 1 and self.sketch.ready and not self.space.sharded:
            # Every rank ran the same Lanczos on the same averaged products, so the vectors already agree;
            # the broadcast makes that a guarantee: replicas whose noise differed would drift apart silently.
            self.space.broadcast_(self.sketch.vectors_PK)
            self.space.broadcast_(self.sketch.values_K)
        if self._sketch_metrics and self.levy.levy_virtual_batch_size is not None:
            self._sketch_metrics.update(self.calibrate(step))
        self._refresh_seconds = time.perf_counter() - start
        self._sketch_seconds_total += self._refresh_seconds
        self._step_seconds, self._deferred_to = [], None
        if self._sketch_metrics and previous is not None:
            self._sketch_metrics["curvature/sketch_period"] = float(step - previous)

    def _warn_if_unconverged(self, step: int) -> None:
        """Once per run: a refresh that hit lanczos_num_iters before lanczos_tol (curvature/lanczos_converged = 0)."""
        metrics = self._sketch_metrics
        if self._warned_unconverged or metrics.get("curvature/lanczos_converged", 1.0) == 1.0:
            return
        self._warned_unconverged = True
        if _rank_and_world()[0] == 0:
            logger.warning(
                "hf_levy: the Hessian sketch at step %d used all lanczos_num_iters=%d products and stopped at "
                "relative residual %.2g > lanczos_tol=%g; the noise uses these approximate directions. Raise "
                "lanczos_num_iters (about 4 x num_eigenpairs + 10) or lanczos_tol for certified eigenpairs "
                "(logged as curvature/lanczos_converged; this warning is shown once)",
                step,
                self.sketch.settings.num_iters,
                metrics["curvature/lanczos_residual"],
                self.levy.lanczos_tol,
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.levy.levy_scale == 0 or not self.sketch.ready:
            return
        self.add_noise(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not ("loss" in logs or "train_runtime" in logs):  # training logs and the summary
            return
        total = (
            {"curvature/sketch_seconds_total": self._sketch_seconds_total}
            if self.sketch.step is not None
            else {}
        )
        self._warn_if_mostly_capped()
        if "loss" not in logs:  # the summary: the sketch's total cost, refreshes after the last log included
            run = {
                k: v
                for k, v in self._noise_run.metrics("levy/run_").items()
                if k.endswith(("capped_fraction", "clipped_fraction"))
            }
            logs.update({**total, **run})
            _merge_into_last_entry(state, {**total, **run})
            return
        metrics = {**self._sketch_metrics, **total, **self._noise_window.metrics()}
        if self._noise_window.steps:
            if self.calibrated_alpha_K is None:
                metrics["levy/alpha"] = float(self.levy.levy_alpha)
        if self._skipped_nonfinite:
            metrics["levy/skipped_nonfinite_steps"] = float(self._skipped_nonfinite)
        logs.update(metrics)
        _merge_into_last_entry(state, metrics)
        self._sketch_metrics, self._noise_window, self._skipped_nonfinite = {}, NoiseTally(), 0

    def _warn_if_mostly_capped(self) -> None:
        """Once per run: more than half of the noisy steps so far had their noise norm set by the cap."""
        run = self._noise_run
        if self._warned_capped or run.capped_fraction <= 0.5:
            return
        self._warned_capped = True
        if _rank_and_world()[0] == 0:
            logger.warning(
                "hf_levy: the noise norm hit the cap levy_max_noise_ratio=%g x ||g|| on %d of %d steps (%.0f%%): "
                "the noise is then a fixed-norm direction set by the cap, not by levy_alpha or levy_scale. "
                "Lower levy_scale or raise levy_max_noise_ratio (logged as levy/capped_fraction; this "
                "warning is shown once)",
                self.levy.levy_max_noise_ratio,
                run.capped_steps,
                run.steps,
                100 * run.capped_fraction,
            )

    # ------------------------------------------------------------------ stages
    def sketch_batch(self, step: int) -> dict[str, Any]:
        """This rank's share of the sketch batch of ``step``: the same global draw on every rank."""
        generator = step_generator(self.seed + rng.SKETCH_BATCH, step)
        indices = torch.randperm(len(self.dataset), generator=generator)[
            : self.levy.sketch_batch_size
        ].tolist()
        rank, world = _rank_and_world()
        return self.collate_fn([self.dataset[i] for i in indices[rank::world]])

    def refresh_sketch(self, step: int) -> dict[str, float]:
        """Recompute the eigenpairs on this step's sketch batch; returns the curvature metrics."""
        batch = self.sketch_batch(step)
        share = _count_examples(batch)
        if self.hvp_method is None:  # "auto": exact products unless the model cannot differentiate twice
            try:
                metrics = self._refresh(batch, share, "autograd", step)
                self.hvp_method = "autograd"
                logger.info("hf_levy: hvp_method='auto' chose exact double-backward products")
                return metrics
            except DoubleBackwardError as err:
                self.hvp_method = "finite_difference"
                logger.warning(
                    "hf_levy: hvp_method='auto' chose finite differences (%s)", str(err).split(". ")[0]
                )
        return self._refresh(batch, share, self.hvp_method, step)

    def _refresh(self, batch: Mapping[str, Any], share: int, method: str, step: int) -> dict[str, float]:
        matvec = self._matvec(batch, share, method)
        return self.sketch.refresh(matvec, self.space.dim, step, reduce=self.space.reduce)

    def _matvec(self, batch: Mapping[str, Any], share: int, method: str) -> Callable[[Tensor], Tensor]:
        """v ↦ H v on the sketch batch, as seen by this rank.

        Replicated parameters (DDP): each rank's product on its share is averaged across ranks, weighted
        by the example counts. FSDP: the product's piece of this rank (FSDP's own gradient reduce-scatter
        already averages the ranks), padded to the common length.
        """
        if method == "finite_difference":
            # A central difference divides rounding error by ε: with bf16 matmuls it swamps the product (measured
            # 37-59% error along the top eigenvector at every step size), so these products run in float32.
            with _full_precision_forward(self.model):
                fd = make_hvp(self.model, batch, self.params, method=method, loss_fn=self.loss_fn)

            def hvp(v_P: Tensor) -> Tensor:
                with _full_precision_forward(self.model):
                    return fd(v_P)

        else:
            hvp = make_hvp(self.model, batch, self.params, method=method, loss_fn=self.loss_fn)
        space = self.space
        if space.sharded:
            return lambda v_P: space.pad(hvp(space.unpad(v_P)))
        if _rank_and_world()[1] == 1:
            return hvp
        total = float(sum_over_ranks(torch.tensor(float(share), dtype=torch.float64, device=space.device)))
        return lambda v_P: sum_over_ranks(hvp(v_P.to(space.device)) * (share / total)).to(v_P.device)

    def calibrate(self, step: int) -> dict[str, float]:
        """Fit the noise of batch size b along the new eigenvectors; sets the injected α_K and scales c_inj_K.

        M micro-batches of b examples (indices drawn with the levy seed and ``step``) are split across the
        ranks (under FSDP each micro-batch's examples are); their gradients' projections on V are gathered,
        the SαS law per direction is fitted, and c_inj = c_b · (1 − (b/B)^(α−1))^(1/α) tops the physical
        batch's own noise up to the batch-b level.
        """
        start = time.perf_counter()
        b, m = self.levy.levy_virtual_batch_size, self.levy.calibration_num_microbatches
        generator = step_generator(self.seed + rng.CALIBRATION, step)
        indices = torch.randint(len(self.dataset), (m, b), generator=generator)
        rank, world = _rank_and_world()
        sharded = self.space.sharded
        # FSDP: all ranks run every micro-batch together, each on its share of the examples, and the K dots of
        # each projection are summed over ranks. Otherwise each rank takes whole micro-batches, gathered below.
        mine = list(range(m)) if sharded else list(range(rank, m, world))
        share = slice(rank, None, world) if sharded else slice(None)
        projections = microbatch_projections(
            self.model,
            (self.collate_fn([self.dataset[int(i)] for i in indices[row][share]]) for row in mine),
            self.params,
            self.space.unpad(self.sketch.vectors_PK),
            loss_fn=self.loss_fn,
            reduce=self.space.reduce,
        ).values_MK
        if world > 1 and not sharded:  # each rank fills its rows; the sum gathers the (M, K) table everywhere
            table = torch.zeros(m, projections.shape[1], dtype=torch.float64, device=self.space.device)
            table[mine] = projections.to(table.device)
            projections = sum_over_ranks(table).cpu()
        fixed_alpha = None if self.levy.calibration_fit_alpha else self.levy.levy_alpha
        fit = fit_directional_noise(projections, alpha=fixed_alpha)
        self.calibrated_alpha_K = fit.alpha_K
        self.calibrated_scale_K = injected_scale(fit.scale_K, fit.alpha_K, b, self.physical_batch_size)
        metrics = {f"levy/fitted_alpha_{i}": float(a) for i, a in enumerate(fit.alpha_K)}
        metrics.update(
            {f"levy/calibrated_scale_{i}": float(c) for i, c in enumerate(self.calibrated_scale_K)}
        )
        metrics["curvature/calibration_gradients"] = float(m)
        metrics["curvature/calibration_seconds"] = time.perf_counter() - start
        return metrics

    def add_noise(self, step: int) -> None:
        """g ← g + ξ with ξ = V · coef (see hf_levy.noise); skipped when the gradient is not finite."""
        if all(p.grad is None for p in self.params):
            return
        # The only host sync of the step: the noise scale and its cap are relative to ‖g‖.
        grad_norm = self.space.grad_norm()
        if not math.isfinite(grad_norm):
            self._skipped_nonfinite += 1  # fp16 overflow: the optimizer skips this step, so no noise either
            return
        levy = self.levy
        shrink = 1.0
        if self.calibrated_scale_K is not None:
            # Clipping shrank this step's gradient, and with it the physical batch's own noise, by
            # ‖g‖/‖g_raw‖; the injected noise shrinks the same way, so noise and signal keep the batch-b ratio.
            pre_clip = self._pre_clip_norm
            if pre_clip is not None and hasattr(pre_clip, "full_tensor"):  # FSDP2: a replicated DTensor
                pre_clip = pre_clip.full_tensor()
            shrink = min(1.0, grad_norm / float(pre_clip)) if pre_clip else 1.0
        draw = step_noise(
            grad_norm,
            self.sketch.values_K,
            step_generator(self.seed + rng.NOISE, step),
            levy_scale=levy.levy_scale,
            scale_mode=levy.levy_scale_mode,
            alpha=levy.levy_alpha,
            clip=levy.levy_clip,
            max_noise_ratio=levy.levy_max_noise_ratio,
            calibrated_scale_K=self.calibrated_scale_K,
            calibrated_alpha_K=self.calibrated_alpha_K,
            clip_shrink=shrink,
        )
        coef_K = draw.coef_K
        # Orthonormal columns give |ξ_j| <= ‖ξ‖ = ‖coef‖, so checking the K coefficients on the host rules
        # out an overflow anywhere in ξ. Only reachable with truncation off: such a draw is dropped.
        noise_norm = coef_K.norm().item()
        if not noise_norm < min(torch.finfo(p.dtype).max for p in self.params) / 2:
            logger.warning("hf_levy: step %d: the noise overflows the gradient dtype and is skipped", step)
            self._skipped_nonfinite += 1
            return
        if self.levy.levy_noise_basis == "hessian":
            self.space.add_combination_to_grads(self.sketch.vectors_PK, coef_K)
        else:
            self.space.add_to_grads(self._isotropic_noise(noise_norm, step))
        self._noise_window.add(draw, noise_norm, grad_norm)
        self._noise_run.add(draw, noise_norm, grad_norm)
        self.noise_draws += 1

    def _isotropic_noise(self, noise_norm: float, step: int) -> Tensor:
        """The isotropic ablation's ξ (this rank's padded piece): i.i.d. draws of norm ``noise_norm``."""
        space = self.space
        # Replicated ranks draw the same coordinates; FSDP ranks each draw their own piece.
        stream = _rank_and_world()[0] + 1 if space.sharded else 0
        generator = step_generator(self.seed + rng.ISOTROPIC + stream, step)
        xi = isotropic_noise(
            space.local_numel,
            noise_norm,
            self.levy.levy_alpha,
            generator,
            clip=self.levy.levy_clip,
            reduce=space.reduce,
        )
        return space.pad(xi.to(space.device, self.sketch.vectors_PK.dtype))


@contextlib.contextmanager
def _full_precision_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without the autocast wrapper Accelerate puts around its forward for bf16/fp16 training.

    Accelerate keeps the unwrapped forward as ``model._original_forward``; it is swapped in for the block and
    the wrapped one put back after, so training itself keeps its mixed precision.
    """
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _merge_into_last_entry(state: Any, metrics: dict[str, float]) -> None:
    """The Trainer appends a log entry before calling on_log: copy the metrics into it (saved logs see them)."""
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def _state_file(checkpoint_dir: str, sharded: bool) -> str:
    name = SHARDED_STATE_FILE.format(rank=_rank_and_world()[0]) if sharded else STATE_FILE
    return os.path.join(checkpoint_dir, name)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _examples_per_batch(train_dataloader: Any, args: Any) -> int:
    """Examples in one micro-batch over all processes: Accelerate's ``total_batch_size`` (it follows
    ``auto_find_batch_size``, which shrinks the batch without changing the arguments), else the arguments'."""
    try:
        total = train_dataloader.total_batch_size
    except (AttributeError, TypeError):
        total = None
    if isinstance(total, int) and total > 0:
        return total
    return args.per_device_train_batch_size * args.world_size


def _count_examples(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the collated sketch batch holds no tensor with a batch dimension")
