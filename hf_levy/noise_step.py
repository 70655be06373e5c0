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
from hf_levy.noise import step_noise
from hf_levy.rng import step_generator
from hf_levy.run_state import LevyRun

logger = logging.getLogger("hf_levy.callback")  # the logger users already filter on


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
    if pre_clip_norm is not None and hasattr(pre_clip_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        pre_clip_norm = pre_clip_norm.full_tensor()
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
        pre_clip_norm=float(pre_clip_norm) if pre_clip_norm is not None else None,
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
