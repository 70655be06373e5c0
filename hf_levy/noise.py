"""Anisotropic α-stable gradient noise in a low-rank Hessian eigenbasis.

    ξ_P = vectors_PK · coef_K,   coef_i = c_i · clip(z_i, ±clip),   z_i ~ SαS(α_i, 1) i.i.d.

With orthonormal columns ‖ξ‖ = ‖coef‖, so the norm cap ‖ξ‖ ≤ max_norm is applied to the K
coefficients alone (no pass over the P entries, no communication under sharding).

The draws come from a generator seeded by (seed, optimizer step), see :mod:`hf_levy._rng`.

Legend: P parameters (flat length, or the local shard length under FSDP), K eigenpairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_levy.stable import sample_symmetric_stable


def curvature_weights(values_K: Tensor) -> Tensor:
    """Unit-norm direction weights that follow the curvature: w_i = √λ_i⁺ / ‖√λ⁺‖ (float64, shape (K,)).

    SGD's noise covariance near a minimum is about H/B (Zhu et al. 2019; Xie et al. 2021), so its
    standard deviation along eigenvector i grows as √λ_i. Non-positive eigenvalues get no noise; when
    no eigenvalue is positive the weights are uniform, 1/√K.
    """
    root = values_K.double().clamp(min=0.0).sqrt()
    total = root.norm()
    if total > 0:
        return root / total
    return torch.full_like(root, values_K.numel() ** -0.5)


@dataclass(frozen=True)
class NoiseDraw:
    """One optimizer step's noise coefficients and what the truncation did to them."""

    coef_K: Tensor  # float64 (K,): ξ = vectors_PK · coef_K
    num_clipped: int  # draws z_i with |z_i| > clip, cut to ±clip
    capped: bool  # ‖coef‖ exceeded max_norm and was rescaled to it

    @property
    def num_draws(self) -> int:
        """The α-stable draws behind the coefficients, one per direction: K."""
        return self.coef_K.numel()


def noise_coefficients(
    scales_K: Tensor,
    alpha: float | Tensor,
    generator: torch.Generator,
    *,
    clip: float | None,
    max_norm: float | None,
) -> NoiseDraw:
    """coef_K = scales_K · clip(z_K), rescaled so that ‖coef‖ ≤ max_norm (float64, shape (K,)).

    ``scales_K`` are the SαS scales c_i (gradient units); ``alpha`` a float or a (K,) tensor; ``clip``
    bounds |z_i| (None: no per-draw clip); ``max_norm`` bounds ‖coef‖ (None: no cap).
    """
    z = sample_symmetric_stable(scales_K.shape, alpha, generator=generator, dtype=torch.float64)
    num_clipped = 0
    if clip is not None:
        num_clipped = int((z.abs() > clip).sum())
        z = z.clamp(-clip, clip)
    coef = scales_K.double().cpu() * z
    capped = False
    if max_norm is not None:
        norm = coef.norm()
        if norm > max_norm:
            coef = coef * (max_norm / norm)
            capped = True
    return NoiseDraw(coef, num_clipped, capped)


def step_noise(
    grad_norm: float,
    values_K: Tensor,
    generator: torch.Generator,
    *,
    levy_scale: float,
    scale_mode: str,
    alpha: float,
    clip: float | None,
    max_noise_ratio: float | None,
    calibrated_scale_K: Tensor | None = None,
    calibrated_alpha_K: Tensor | None = None,
    pre_clip_norm: float | None = None,
) -> NoiseDraw:
    """The noise law of one optimizer step: its coefficients from the gradient norm and the sketch.

    Uncalibrated: c = levy_scale · u · w(λ), with u = ‖g‖ ('relative') or 1 ('absolute') and w the
    :func:`curvature_weights`, at one ``alpha`` for every direction. Calibrated: c = levy_scale · r ·
    calibrated_scale_K at the fitted ``calibrated_alpha_K``, r = min(1, ‖g‖ / ``pre_clip_norm``): clipping
    shrank the gradient, and with it the physical batch's own noise, by r, so the injected noise shrinks the
    same way and noise and signal keep the batch-b ratio. The cap is ‖coef‖ ≤ max_noise_ratio · ‖g‖.
    """
    if calibrated_scale_K is not None:
        shrink = min(1.0, grad_norm / pre_clip_norm) if pre_clip_norm else 1.0
        scales_K, alpha = levy_scale * shrink * calibrated_scale_K, calibrated_alpha_K
    else:
        unit = grad_norm if scale_mode == "relative" else 1.0
        scales_K = levy_scale * unit * curvature_weights(values_K)
    max_norm = max_noise_ratio * grad_norm if max_noise_ratio is not None else None
    return noise_coefficients(scales_K, alpha, generator, clip=clip, max_norm=max_norm)


def isotropic_noise(
    numel: int,
    norm: float,
    alpha: float,
    generator: torch.Generator,
    *,
    clip: float | None,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> Tensor:
    """The isotropic ablation: i.i.d. SαS(α) coordinates (clipped), rescaled to ‖ξ‖ = ``norm`` (float32, CPU).

    ``numel`` is this rank's count of coordinates; ``reduce`` sums the squared norm over ranks when they
    are sharded (then each rank must pass its own generator stream).
    """
    z = sample_symmetric_stable((numel,), alpha, generator=generator, dtype=torch.float32)
    if clip is not None:
        z = z.clamp(-clip, clip)
    total = float(reduce(z.double().pow(2).sum())) ** 0.5
    return z * (norm / total) if total > 0 else z
