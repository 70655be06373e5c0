"""The start of a training run of LevyCallback: its setup checked against the levy fields, its state built.

Every check runs here, once, before any expensive work, and fails with a ValueError that names the setting
and the fix. A new ``train()`` call (or a hyperparameter trial) starts from a fresh :class:`LevyRun`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_levy._run import MINIBATCH_BASES, LevyRun
from hf_levy._schedule import RefreshSchedule
from hf_levy._zero_space import ZeroSpace, uses_deepspeed, zero_optimizer_of
from hf_levy.config import LevyArguments
from hf_levy.minibatch import minibatch_kappa
from hf_levy.params import ParameterSpace, rank_and_world, trainable_parameters
from hf_levy.sketch import HessianSketch, SketchSettings

logger = logging.getLogger(__name__)


def start_run(
    levy: LevyArguments, args: Any, model: nn.Module, train_dataloader: Any, optimizer: Any = None
) -> LevyRun:
    """Check the run's setup against the levy fields and build its state.

    The state is over DeepSpeed's ZeRO partition when ``optimizer`` is DeepSpeed's.

    Raises:
        ValueError: naming the setting and the fix.
    """
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
    if from_subbatch and space.steps_inside_backward:
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
        levy=levy,
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
    """Sizes, precision and placement of the sketch.

    Float64 vectors for a float64 model, else ``sketch_dtype``; ``sketch_offload`` moves the Lanczos basis
    ('basis') or everything ('all') to the host.
    """
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
    """Examples in one micro-batch over all processes.

    Accelerate's ``total_batch_size`` (it follows ``auto_find_batch_size``, which shrinks the batch without
    changing the arguments), else the arguments'.
    """
    try:
        total = train_dataloader.total_batch_size
    except (AttributeError, TypeError):
        total = None
    if isinstance(total, int) and total > 0:
        return total
    return args.per_device_train_batch_size * args.world_size


def _check_sharded(levy: LevyArguments, world: int, space: ParameterSpace) -> None:
    if levy.hvp_method == "autograd" and not space.exact_products:
        raise ValueError(
            f"hvp_method='autograd' is not available under {space.engine} (sharded parameters have no double "
            "backward): set hvp_method='finite_difference' or 'auto'"
        )
    if space.steps_inside_backward and levy.levy_virtual_batch_size is not None:
        raise ValueError(
            f"levy_virtual_batch_size={levy.levy_virtual_batch_size} (calibration) is not available under "
            "DeepSpeed: unset it and set levy_scale, or train with DDP or FSDP to calibrate"
        )
    if levy.sketch_batch_size % world and not space.weighs_rank_shares:
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
