"""One optimizer step's noise on a LevyRun: g ← g + ξ, right before ``optimizer.step()``.

ξ = V · coef with the K coefficients of :func:`hf_levy.noise.step_noise` (or, for the isotropic
ablation, i.i.d. α-stable coordinates of the same norm), drawn from a generator seeded by the step, so
every rank adds the same ξ and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from hf_levy import rng
from hf_levy.config import LevyArguments
from hf_levy.hvp import LossFn
from hf_levy.minibatch import batch_length, minibatch_kappa, minibatch_noise, subbatch_gradient, subbatch_rows
from hf_levy.noise import NoiseDraw, step_noise
from hf_levy.params import rank_and_world, sum_over_ranks
from hf_levy.rng import step_generator
from hf_levy.run_state import LevyRun

logger = logging.getLogger("hf_levy.callback")  # the logger users already filter on


def add_minibatch_noise(
    run: LevyRun, levy: LevyArguments, step: int, pre_clip_norm: Any = None, loss_fn: LossFn | None = None
) -> bool:
    """Add this step's real sub-batch noise ξ = κ·(r·g_b − g) (or its top-K projection) to ``.grad``.

    g_b is the gradient of ``levy_noise_batch_size`` examples drawn from the step's own micro-batches
    (``run.step_batches``) by the step's generator, each rank its equal share, averaged over the ranks; g the
    clipped gradient in ``.grad`` and r = ‖g‖/``pre_clip_norm`` the clipping factor (1 without clipping), so
    that at κ = 1 the optimizer sees the batch-b gradient clipped by the full batch's factor. The α-stable
    truncations (``levy_clip``, ``levy_max_noise_ratio``) do not apply: this noise has no heavy tail to cut,
    and near a minimum, where ‖g‖ → 0 while the sampling noise stays, a cap relative to ‖g‖ would replace it
    on most steps. Skipped like :func:`add_step_noise` when ‖g‖ or ξ is not finite; returns whether noise was
    added. Unless ``gradient_noise_scale_every_n_steps`` is 0, the same g_b and ‖g‖ before clipping also feed
    ``run.noise_scale`` (free: no other gradient is taken).
    """
    batches, run.step_batches = run.step_batches, []
    if not batches or not run.space.has_grads():
        return False
    grad_norm = run.space.grad_norm()
    if not math.isfinite(grad_norm):
        run.skipped_nonfinite += 1
        return False
    space = run.space
    sub_P = _subbatch_gradient(run, levy, batches, step, loss_fn)
    pre_clip = _host_float(pre_clip_norm)
    shrink = min(1.0, grad_norm / pre_clip) if pre_clip else 1.0
    if levy.gradient_noise_scale_every_n_steps != 0:  # free: g_b and ‖g‖ are at hand
        _update_noise_scale(run, levy, sub_P, pre_clip if pre_clip is not None else grad_norm, batches)
    topk = levy.levy_noise_basis == "minibatch_topk"
    kappa = minibatch_kappa(
        levy.levy_scale, levy.levy_noise_batch_size, levy.levy_virtual_batch_size, run.step_examples
    )
    noise = minibatch_noise(
        space.flat_grads(),
        sub_P,
        kappa,
        shrink=shrink,
        vectors_PK=space.unpad(run.sketch.vectors_PK) if topk else None,
        reduce=space.reduce,
    )
    if not math.isfinite(noise.norm):
        logger.warning("hf_levy: step %d: the sub-batch noise is not finite and is skipped", step)
        run.skipped_nonfinite += 1
        return False
    space.add_to_grads(space.pad(noise.xi_P))
    record = NoiseDraw(noise.xi_P.new_zeros(0, dtype=torch.float64), num_clipped=0, capped=False)
    for tally in (run.noise_window, run.noise_total):
        tally.add(record, noise.norm, grad_norm)
        if noise.topk_share is not None:
            tally.add_topk_share(noise.topk_share)
    return True


def measure_noise_scale(
    run: LevyRun, levy: LevyArguments, step: int, pre_clip_norm: Any = None, loss_fn: LossFn | None = None
) -> bool:
    """Fold this step's pair of batches into ``run.noise_scale``, at the cost of one sub-batch gradient.

    For the bases that compute no g_b (and levy_scale 0): the gradient of the ``levy_noise_batch_size``
    examples the 'minibatch' noise would draw at this step, and ‖g‖ before clipping (``pre_clip_norm``, else
    of ``.grad``). Call it before ξ is added; ``.grad`` and ``run.step_batches`` are left as they are.

    Returns:
        Whether the smoother took the pair (not when the step has no batches or gradients, nor a non-finite
        norm).
    """
    batches = run.step_batches
    if not batches or not run.space.has_grads():
        return False
    pre_clip = _host_float(pre_clip_norm)
    full_norm = pre_clip if pre_clip is not None else run.space.grad_norm()
    sub_P = _subbatch_gradient(run, levy, batches, step, loss_fn)
    return _update_noise_scale(run, levy, sub_P, full_norm, batches)


def _subbatch_gradient(
    run: LevyRun, levy: LevyArguments, batches: list[Any], step: int, loss_fn: LossFn | None
) -> torch.Tensor:
    """g_b, this rank's flat piece, of the step's sub-batch.

    ``levy_noise_batch_size`` examples of the step's micro-batches drawn by the step's generator
    (rng.MINIBATCH), each rank its equal share, averaged over the ranks.
    """
    world = rank_and_world()[1]
    rows = subbatch_rows(
        [batch_length(b) for b in batches],
        levy.levy_noise_batch_size // world,
        step_generator(run.seed + rng.MINIBATCH, step),
    )
    sub_P, _ = subbatch_gradient(run.model, batches, rows, run.params, loss_fn=loss_fn)
    if world > 1 and not run.space.sharded:  # FSDP's backward already averaged the ranks' equal shares
        sub_P = sum_over_ranks(sub_P).div_(world)
    return sub_P


def _update_noise_scale(
    run: LevyRun, levy: LevyArguments, sub_P: torch.Tensor, full_norm: float, batches: list[Any]
) -> bool:
    """Fold ‖g_b‖² (b = levy_noise_batch_size) and ‖g_B‖² = ``full_norm``² into ``run.noise_scale``.

    B counts the step's examples, this rank's micro-batches times the ranks (an epoch's short last step
    included), at most the N training examples. Both batches are drawn without replacement from those N, so
    the estimates carry the finite-population correction (at full batch the step's gradient has no noise).
    """
    small = float(run.space.reduce(sub_P.double().square().sum()))
    b, population = levy.levy_noise_batch_size, len(run.dataset)
    big = min(sum(batch_length(batch) for batch in batches) * rank_and_world()[1], population)
    if big <= b:  # a short last step: no larger batch to pair with
        return False
    return run.noise_scale.update(small, b, full_norm**2, big, population=population)


def _host_float(norm: Any) -> float | None:
    """A norm handed over by the Trainer's clipping as a float (FSDP2 gives a replicated DTensor)."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def add_step_noise(run: LevyRun, levy: LevyArguments, step: int, pre_clip_norm: Any = None) -> bool:
    """Add this step's ξ to the ``.grad`` of ``run``'s parameters; returns whether noise was added.

    Skipped (and counted in ``run.skipped_nonfinite``) when ‖g‖ is not finite (an fp16 overflow: the
    optimizer skips the step too) or the draw would overflow the gradient dtype. ``pre_clip_norm``, the
    gradient norm before ``max_grad_norm`` clipping, scales the calibrated noise with the clipping.
    """
    if not run.space.has_grads():
        return False
    # The only host sync of the step: the noise scale and its cap are relative to ‖g‖.
    grad_norm = run.space.grad_norm()
    if not math.isfinite(grad_norm):
        run.skipped_nonfinite += 1
        return False
    calibration = run.calibration
    draw = step_noise(
        grad_norm,
        run.sketch.values_K,
        step_generator(run.seed + rng.NOISE, step),
        levy_scale=levy.levy_scale,
        scale_mode=levy.levy_scale_mode,
        alpha=levy.levy_alpha,
        clip=levy.levy_clip,
        max_noise_ratio=levy.levy_max_noise_ratio,
        calibrated_scale_K=calibration.scale_K if calibration is not None else None,
        calibrated_alpha_K=calibration.alpha_K if calibration is not None else None,
        pre_clip_norm=_host_float(pre_clip_norm),
    )
    # Orthonormal columns give |ξ_j| <= ‖ξ‖ = ‖coef‖, so checking the K coefficients on the host rules
    # out an overflow anywhere in ξ. Only reachable with truncation off: such a draw is dropped.
    noise_norm = draw.coef_K.norm().item()
    if not noise_norm < min(torch.finfo(p.dtype).max for p in run.params) / 2:
        logger.warning("hf_levy: step %d: the noise overflows the gradient dtype and is skipped", step)
        run.skipped_nonfinite += 1
        return False
    if levy.levy_noise_basis == "hessian":
        run.space.add_combination_to_grads(run.sketch.vectors_PK, draw.coef_K)
    else:
        run.space.add_to_grads(run.isotropic_noise(noise_norm, levy.levy_alpha, levy.levy_clip, step))
    run.noise_window.add(draw, noise_norm, grad_norm)
    run.noise_total.add(draw, noise_norm, grad_norm)
    return True
