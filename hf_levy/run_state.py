"""The state of one training run of LevyCallback, built and checked once when training begins.

A new ``train()`` call (or a hyperparameter trial) starts from a fresh :class:`LevyRun`: nothing of a
previous run carries over except what a resumed checkpoint holds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy import rng
from hf_levy.calibration import DirectionalNoise, calibrate_to_virtual_batch
from hf_levy.config import LevyArguments
from hf_levy.hvp import LossFn
from hf_levy.levy_state import FIX
from hf_levy.minibatch import minibatch_kappa
from hf_levy.noise import isotropic_noise
from hf_levy.noise_scale import NoiseScaleSmoother
from hf_levy.noise_tally import NoiseTally
from hf_levy.params import ParameterSpace, rank_and_world, trainable_parameters
from hf_levy.rng import step_generator
from hf_levy.schedule import STATE_KEYS as SCHEDULE_KEYS
from hf_levy.schedule import RefreshSchedule
from hf_levy.sketch import HessianSketch, SketchSettings
from hf_levy.zero_space import ZeroSpace, uses_deepspeed, zero_optimizer_of

logger = logging.getLogger(__name__)

NOISE_TOTAL = "noise_total"  # the checkpoint entry of the whole run's NoiseTally
NOISE_SCALE = "noise_scale"  # and of the gradient noise scale's moving averages, in SMOOTHER_KEYS order
SMOOTHER_KEYS = ("beta", "steps", "square_norm_ema", "trace_ema")

# The noise bases that inject the real noise of a sub-batch of the step's batch (hf_levy.minibatch).
MINIBATCH_BASES = ("minibatch", "minibatch_topk")


@dataclass
class LevyRun:
    """What one run holds: the model's parameter space, the sketch and its schedule, the data the sketch
    and the calibration draw from, and what is logged."""

    model: nn.Module
    space: ParameterSpace
    sketch: HessianSketch
    schedule: RefreshSchedule
    seed: int
    dataset: Any
    collate_fn: Any
    physical_batch_size: int | None  # B, examples per optimizer step; None: the whole training set
    step_examples: int = 0  # B as a count: examples per optimizer step, at most the training set
    step_batches: list[Any] = field(default_factory=list)  # this step's micro-batches ('minibatch' bases)
    calibration: DirectionalNoise | None = None  # the injected α_K and c_inj_K (levy_virtual_batch_size)
    sketch_metrics: dict[str, float] = field(default_factory=dict)  # of the last refresh, until logged
    noise_window: NoiseTally = field(default_factory=NoiseTally)  # the steps since the last log
    noise_total: NoiseTally = field(default_factory=NoiseTally)  # every step of the run
    noise_scale: NoiseScaleSmoother = field(default_factory=NoiseScaleSmoother)  # levy/gradient_noise_scale
    skipped_nonfinite: int = 0  # steps since the last log whose gradient or noise was not finite
    failed_refreshes: int = 0  # refreshes of this run whose sketch was discarded
    warned_unconverged: bool = False
    warned_capped: bool = False
    warned_failed: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        return self.space.params

    def log_metrics(self, *, summary: bool, alpha: float | None) -> dict[str, float]:
        """The ``curvature/`` and ``levy/`` entries of a training log (then the window starts afresh), or
        of the end-of-training summary: the whole run's sketch seconds and truncation shares, and the metrics
        of a refresh that no training log has shown yet (their ``curvature/sketch_step`` says when)."""
        total = {}
        if self.schedule.refresh_seconds is not None:  # a refresh ran (or a resumed checkpoint's did)
            total["curvature/sketch_seconds_total"] = self.schedule.total_seconds
        if self.failed_refreshes:
            total["curvature/failed_refreshes"] = float(self.failed_refreshes)
        if summary:  # with the last refresh's metrics when no training log came after it
            shares = self.noise_total.metrics("levy/run_")
            last_sketch, self.sketch_metrics = self.sketch_metrics, {}
            return {**last_sketch, **total, **{k: v for k, v in shares.items() if k.endswith("_fraction")}}
        metrics = {**self.sketch_metrics, **total, **self.noise_window.metrics()}
        b_simple = self.noise_scale.value  # None while the averaged ‖G‖² is not positive: nothing logged
        if b_simple is not None:
            metrics["levy/gradient_noise_scale"] = b_simple
        if self.noise_window.steps and self.calibration is None and alpha is not None:
            metrics["levy/alpha"] = float(alpha)
        if self.skipped_nonfinite:
            metrics["levy/skipped_nonfinite_steps"] = float(self.skipped_nonfinite)
        self.sketch_metrics, self.noise_window, self.skipped_nonfinite = {}, NoiseTally(), 0
        return metrics

    def calibrate(self, levy: LevyArguments, step: int, loss_fn: LossFn | None = None) -> dict[str, float]:
        """Fit the noise of batch size b along the current eigenvectors (:func:`calibrate_to_virtual_batch`),
        keep the injected α_K and scales c_inj_K, and return their metrics."""
        start = time.perf_counter()
        self.calibration, variance_share = calibrate_to_virtual_batch(
            self.model,
            self.dataset,
            self.collate_fn,
            self.space,
            self.sketch.vectors_PK,
            virtual_batch_size=levy.levy_virtual_batch_size,
            num_microbatches=levy.calibration_num_microbatches,
            physical_batch_size=self.physical_batch_size,
            seed=self.seed,
            step=step,
            alpha=None if levy.calibration_fit_alpha else levy.levy_alpha,
            loss_fn=loss_fn,
        )
        metrics = {f"levy/fitted_alpha_{i}": float(a) for i, a in enumerate(self.calibration.alpha_K)}
        metrics.update(
            {f"levy/calibrated_scale_{i}": float(c) for i, c in enumerate(self.calibration.scale_K)}
        )
        metrics["levy/noise_variance_share"] = variance_share  # of the batch-b noise, in the top-K span
        metrics["curvature/calibration_gradients"] = float(levy.calibration_num_microbatches)
        metrics["curvature/calibration_seconds"] = time.perf_counter() - start
        return metrics

    def isotropic_noise(self, norm: float, alpha: float, clip: float | None, step: int) -> Tensor:
        """The isotropic ablation's ξ (this rank's padded piece): i.i.d. SαS draws rescaled to ``norm``."""
        space = self.space
        # Replicated ranks draw the same coordinates; FSDP ranks each draw their own piece.
        stream = rank_and_world()[0] + 1 if space.sharded else 0
        generator = step_generator(self.seed + rng.ISOTROPIC + stream, step)
        xi = isotropic_noise(space.local_numel, norm, alpha, generator, clip=clip, reduce=space.reduce)
        return space.pad(xi.to(space.device, self.sketch.vectors_PK.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps: the sketch (once there is one), its schedule, the calibration and the
        whole run's noise tally (the summary's run fractions then cover the steps before a resume too)."""
        state = {
            **self.sketch.state_dict(),
            **self.schedule.state_dict(),
            NOISE_TOTAL: self.noise_total.state_tensor(),
            NOISE_SCALE: torch.tensor(
                [float(self.noise_scale.state_dict()[k]) for k in SMOOTHER_KEYS], dtype=torch.float64
            ),
        }
        if self.calibration is not None:
            state.update(calibrated_alpha=self.calibration.alpha_K, calibrated_scale=self.calibration.scale_K)
        return state

    def load_state_dict(self, saved: dict[str, Tensor], *, source: str = "the saved sketch state") -> None:
        """Install a checkpoint's state after checking that it fits this run.

        Raises:
            ValueError: naming ``source`` (the file) and the fix, when a key is missing, a shape does not
                match this run's parameters or ``num_eigenpairs``, or a value is not finite.
        """
        problem = saved_state_problem(saved, self.space.dim, self.sketch.settings.num_eigenpairs)
        if problem is not None:
            raise ValueError(f"{source} {problem}; {FIX}")
        saved = dict(saved)
        if NOISE_TOTAL in saved:  # files written before it was kept lack it: the run's tally starts afresh
            self.noise_total = NoiseTally.from_state_tensor(saved.pop(NOISE_TOTAL))
        if NOISE_SCALE in saved:  # likewise: the noise scale's averages start afresh without it
            values = saved.pop(NOISE_SCALE).tolist()
            self.noise_scale = NoiseScaleSmoother(values[0])
            self.noise_scale.load_state_dict(dict(zip(SMOOTHER_KEYS, values, strict=True)))
        if "calibrated_scale" in saved:
            self.calibration = DirectionalNoise(saved.pop("calibrated_alpha"), saved.pop("calibrated_scale"))
        self.schedule.load_state_dict({key: saved.pop(key) for key in SCHEDULE_KEYS})
        if "vectors_KP" not in saved:  # saved before any sketch (the 'minibatch' basis needs none)
            return
        settings = self.sketch.settings
        saved["vectors_KP"] = saved["vectors_KP"].to(settings.vector_device, settings.vector_dtype)
        self.sketch.load_state_dict(saved)


def saved_state_problem(saved: dict[str, Tensor], dim: int, num_eigenpairs: int) -> str | None:
    """What makes a checkpoint's state unusable for a run over ``dim`` parameters with ``num_eigenpairs``
    eigenpairs (a phrase to follow the file's name), or None when it fits."""
    sketch_keys = {"values", "vectors_KP", "step"}
    required = set(SCHEDULE_KEYS) | (
        sketch_keys if sketch_keys & saved.keys() or "attempted" in saved else set()
    )
    missing = sorted(required - saved.keys())
    if missing or ("calibrated_alpha" in saved) != ("calibrated_scale" in saved):
        absent = missing or [k for k in ("calibrated_alpha", "calibrated_scale") if k not in saved]
        return f"lacks the entries {absent}"
    tally = saved.get(NOISE_TOTAL)
    if tally is not None and not (
        tally.shape == NoiseTally().state_tensor().shape
        and torch.isfinite(tally).all()
        and (tally >= 0).all()
    ):
        return f"holds a '{NOISE_TOTAL}' entry that is not {NoiseTally().state_tensor().numel()} finite counts >= 0"
    smoother = saved.get(NOISE_SCALE)
    if smoother is not None and not (
        smoother.shape == (len(SMOOTHER_KEYS),)
        and torch.isfinite(smoother).all()
        and 0 <= float(smoother[0]) < 1
        and float(smoother[1]) >= 0
    ):
        return (
            f"holds a '{NOISE_SCALE}' entry that is not {SMOOTHER_KEYS} (finite, 0 <= beta < 1, steps >= 0)"
        )
    if "vectors_KP" not in saved:
        return _schedule_problem(saved, ("calibrated_alpha" in saved))
    vectors, values = saved["vectors_KP"], saved["values"]
    if vectors.shape != (num_eigenpairs, dim) or values.shape != (num_eigenpairs,):
        return (
            f"holds eigenvectors of shape {tuple(vectors.shape)} and eigenvalues of shape "
            f"{tuple(values.shape)}, but this run sketches num_eigenpairs={num_eigenpairs} directions over "
            f"{dim} trainable parameters (expected ({num_eigenpairs}, {dim}) and ({num_eigenpairs},): another "
            "model, adapter or num_eigenpairs)"
        )
    calibrated = [saved[k] for k in ("calibrated_alpha", "calibrated_scale") if k in saved]
    for name in ("values", "vectors_KP", "calibrated_alpha", "calibrated_scale"):
        tensor = saved.get(name)
        if tensor is not None and not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            return f"has non-finite or non-float entries in '{name}'"
    if calibrated and any(t.shape != (num_eigenpairs,) for t in calibrated):
        return f"holds calibration entries whose shape is not ({num_eigenpairs},)"
    if calibrated and not (((calibrated[0] > 0) & (calibrated[0] <= 2)).all() and (calibrated[1] >= 0).all()):
        return "holds a calibrated alpha outside (0, 2] or a negative calibrated scale"
    if saved["step"].numel() != 1 or int(saved["step"]) < 0:
        return "holds no valid sketch step or schedule"
    return _schedule_problem(saved, False)


def _schedule_problem(saved: dict[str, Tensor], calibrated_without_sketch: bool) -> str | None:
    if calibrated_without_sketch:
        return "holds a calibration without the sketch it was fitted on"
    if any(saved[k].numel() != 1 for k in SCHEDULE_KEYS):
        return "holds no valid sketch step or schedule"
    total, refresh = (float(saved[k]) for k in SCHEDULE_KEYS[:2])  # refresh is NaN before a first refresh
    if not (math.isfinite(total) and total >= 0 and not math.isinf(refresh)):
        return "holds non-finite sketch seconds"
    return None


def start_run(
    levy: LevyArguments, args: Any, model: nn.Module, train_dataloader: Any, optimizer: Any = None
) -> LevyRun:
    """Check the run's setup against the levy fields and build its state (over DeepSpeed's ZeRO partition
    when ``optimizer`` is DeepSpeed's). Raises ValueError naming the setting and the fix."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True): nothing to sketch or perturb"
        )
    if levy.gradient_noise_scale_every_n_steps and uses_deepspeed(optimizer):
        raise ValueError(
            f"gradient_noise_scale_every_n_steps={levy.gradient_noise_scale_every_n_steps} needs a second "
            "backward on a sub-batch, which DeepSpeed's engine does not allow: set it to 0 or None under "
            "DeepSpeed (hf_levy.gradient_noise_scale measures a checkpoint on one process, DDP or FSDP)"
        )
    space = (
        ZeroSpace(params, zero_optimizer_of(optimizer))
        if uses_deepspeed(optimizer)
        else ParameterSpace(params)
    )
    world = rank_and_world()[1]
    from_subbatch = levy.levy_noise_basis in MINIBATCH_BASES
    if from_subbatch and isinstance(space, ZeroSpace):
        raise ValueError(
            f"levy_noise_basis={levy.levy_noise_basis!r} needs a second backward on a sub-batch each step, "
            "which DeepSpeed's engine does not allow: use levy_noise_basis='hessian' under DeepSpeed, or "
            "train with DDP or FSDP"
        )
    if space.sharded:
        _check_sharded(levy, world, space)
    dataset = train_dataloader.dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError("the sketch batch is drawn by index: LevyTrainer needs a map-style train_dataset")
    if levy.levy_noise_basis != "minibatch" and len(dataset) < levy.sketch_batch_size:
        raise ValueError(
            f"sketch_batch_size={levy.sketch_batch_size} exceeds the {len(dataset)} training "
            "examples; lower sketch_batch_size"
        )
    per_step = examples_per_batch(train_dataloader, args) * args.gradient_accumulation_steps
    if from_subbatch:
        _check_noise_batch(levy, min(per_step, len(dataset)), world)
    elif levy.gradient_noise_scale_every_n_steps:
        _check_noise_scale_batch(levy, min(per_step, len(dataset)), world)
    if not from_subbatch:
        _check_virtual_batch(levy, min(per_step, len(dataset)), len(dataset), world, space.sharded)
    seed = levy.levy_seed if levy.levy_seed is not None else args.seed
    return LevyRun(
        model=model,
        space=space,
        sketch=HessianSketch(sketch_settings(levy, space, seed)),
        schedule=RefreshSchedule(
            levy.sketch_every_n_steps, levy.sketch_max_overhead, agree=lambda step: _from_rank0(step, space)
        ),
        seed=seed,
        dataset=dataset,
        collate_fn=train_dataloader.collate_fn,
        # A step that sees the whole training set has no sampling noise of its own (None: the calibration
        # then injects all of batch b's, c_inj = c_b).
        physical_batch_size=None if per_step >= len(dataset) else per_step,
        step_examples=min(per_step, len(dataset)),
    )


def sketch_settings(levy: LevyArguments, space: ParameterSpace, seed: int) -> SketchSettings:
    """Sizes, precision and placement of the sketch: float64 vectors for a float64 model, else
    ``sketch_dtype``; ``sketch_offload`` moves the Lanczos basis ('basis') or everything ('all') to the host."""
    float64 = space.params[0].dtype == torch.float64
    offload = levy.sketch_offload
    if levy.num_eigenpairs > space.dim and rank_and_world()[0] == 0:
        logger.warning(
            "hf_levy: num_eigenpairs=%d exceeds the %d trainable parameters; the sketch uses %d eigenpairs "
            "(set num_eigenpairs <= %d to silence this)",
            levy.num_eigenpairs,
            space.dim,
            space.dim,
            space.dim,
        )
    return SketchSettings(
        num_eigenpairs=min(levy.num_eigenpairs, space.dim),
        num_iters=min(levy.lanczos_num_iters, space.dim),
        tol=levy.lanczos_tol,
        seed=seed,
        vector_dtype=torch.float64 if float64 else getattr(torch, levy.sketch_dtype),
        vector_device=torch.device("cpu") if offload == "all" else space.device,
        basis_device=torch.device("cpu") if offload != "none" else None,
    )


def examples_per_batch(train_dataloader: Any, args: Any) -> int:
    """Examples in one micro-batch over all processes: Accelerate's ``total_batch_size`` (it follows
    ``auto_find_batch_size``, which shrinks the batch without changing the arguments), else the arguments'."""
    try:
        total = train_dataloader.total_batch_size
    except (AttributeError, TypeError):
        total = None
    if isinstance(total, int) and total > 0:
        return total
    return args.per_device_train_batch_size * args.world_size


def _check_sharded(levy: LevyArguments, world: int, space: ParameterSpace) -> None:
    engine = "DeepSpeed ZeRO-3" if isinstance(space, ZeroSpace) else "FSDP"
    if levy.hvp_method == "autograd" and not space.exact_products:
        raise ValueError(
            f"hvp_method='autograd' is not available under {engine} (sharded parameters have no double "
            "backward): set hvp_method='finite_difference' or 'auto'"
        )
    if isinstance(space, ZeroSpace) and levy.levy_virtual_batch_size is not None:
        raise ValueError(
            f"levy_virtual_batch_size={levy.levy_virtual_batch_size} (calibration) is not available under "
            "DeepSpeed: unset it and set levy_scale, or train with DDP or FSDP to calibrate"
        )
    if levy.sketch_batch_size % world and not isinstance(space, ZeroSpace):  # ZeRO products weigh the shares
        logger.warning(
            "hf_levy: sketch_batch_size=%d is not a multiple of the %d ranks; FSDP averages the ranks' "
            "gradients equally, so the sketch weights their shares unevenly",
            levy.sketch_batch_size,
            world,
        )


def _check_virtual_batch(
    levy: LevyArguments, effective: int, train_size: int, world: int, sharded: bool
) -> None:
    virtual = levy.levy_virtual_batch_size
    if virtual is None:
        return
    if virtual >= effective:
        raise ValueError(
            f"levy_virtual_batch_size={virtual} must be smaller than the physical batch size "
            f"{effective} (per-device batch x gradient_accumulation_steps x processes, at most the "
            f"{train_size} training examples): the noise of a smaller batch is what the "
            "calibration imitates"
        )
    if sharded and virtual < world:
        raise ValueError(
            f"levy_virtual_batch_size={virtual} is smaller than the {world} FSDP ranks: every rank "
            f"computes its share of each micro-batch; use levy_virtual_batch_size >= {world}"
        )


def _check_noise_batch(levy: LevyArguments, step_examples: int, world: int) -> None:
    """The sub-batch of the 'minibatch' bases: set, smaller than a step's batch, split evenly over ranks."""
    b = levy.levy_noise_batch_size
    if b is None:
        raise ValueError(
            f"levy_noise_basis={levy.levy_noise_basis!r} needs levy_noise_batch_size, the examples of the "
            "sub-batch whose noise is injected (e.g. the small batch size whose generalization you want)"
        )
    if b % world:
        raise ValueError(
            f"levy_noise_batch_size={b} is not a multiple of the {world} processes: each draws an equal share "
            f"of the sub-batch from its own batch; use a multiple of {world}"
        )
    minibatch_kappa(levy.levy_scale, b, levy.levy_virtual_batch_size, step_examples)  # raises on bad sizes


def _check_noise_scale_batch(levy: LevyArguments, step_examples: int, world: int) -> None:
    """The small batch of the noise scale's extra gradient: smaller than a step's batch, split evenly."""
    b, every = levy.levy_noise_batch_size, levy.gradient_noise_scale_every_n_steps
    if not 1 <= b < step_examples or b % world:
        raise ValueError(
            f"levy_noise_batch_size={b} (the small batch of gradient_noise_scale_every_n_steps={every}) must be "
            f"smaller than the {step_examples} examples of an optimizer step and a multiple of the {world} "
            "processes: each draws an equal share of it from its own batch"
        )


def _from_rank0(step: int, space: ParameterSpace) -> int:
    """Rank 0's value of ``step`` on every rank (the clocks that chose it differ between ranks)."""
    if rank_and_world()[1] == 1:
        return step
    value = torch.tensor(step, device=space.device)
    space.broadcast_(value)
    return int(value)
