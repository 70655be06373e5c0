"""Symmetric alpha-stable (SαS) sampling and tail-index / scale estimation.

One parametrization throughout: X is SαS with scale sigma when E[exp(itX)] = exp(-|sigma·t|^alpha),
0 < alpha <= 2. This is scipy's ``levy_stable(alpha, 0, scale=sigma)`` in its default S1
parametrization; alpha = 2 is N(0, 2·sigma²) and alpha = 1 is Cauchy(sigma).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

EULER_GAMMA = 0.5772156649015329
# Log-moment α̂ of samples whose log|X| spreads no more than a Gaussian's (no finite α fits them).
MAX_LOG_MOMENT_ALPHA = 1e6
# Below this the block-sum estimator has ~10 blocks of ~10 samples: too noisy to mean anything.
MIN_ESTIMATOR_SAMPLES = 100

Number = float | int


def _check(
    name: str, value: Number | torch.Tensor, ok: Callable[[torch.Tensor], torch.Tensor], allowed: str
) -> None:
    t = (
        value.detach().double()
        if isinstance(value, torch.Tensor)
        else torch.tensor(float(value), dtype=torch.float64)
    )
    bad = ~ok(t)  # ok() is False for nan, so nan is always rejected
    if bad.any():
        where = " (an element of the tensor)" if t.ndim else ""
        raise ValueError(f"{name} must be {allowed}, got {t[bad].flatten()[0].item()!r}{where}")


def _alpha_ok(t: torch.Tensor) -> torch.Tensor:
    return (t > 0) & (t <= 2)


def _scale_ok(t: torch.Tensor) -> torch.Tensor:
    return (t >= 0) & torch.isfinite(t)


def _cms(v: torch.Tensor, w: torch.Tensor, alpha: Number | torch.Tensor, max_abs: float) -> torch.Tensor:
    """Chambers–Mallows–Stuck at unit scale, in place (v and w are overwritten); never nan, may be ±inf."""
    cos_v = torch.cos(v)
    # With p = (1−α)/α, 1/α = 1 + p turns the textbook form into a single power (one log fewer per
    # sample): X = sin(αV)/cos V · [cos((1−α)V) / (W·cos V)]^p. The base is finite and > 0.
    base = torch.mul(v, 1 - alpha).cos_().div_(w.mul_(cos_v).clamp_min_(torch.finfo(v.dtype).tiny))
    # Overflow (W -> 0 or V -> ±π/2 when α < 1) is capped in the exponent so exp stays finite; the
    # product with the finite sin(αV)/cos V may still reach ±inf (never nan), which callers clamp.
    power = base.log_().mul_((1 - alpha) / alpha).clamp_max_(math.log(max_abs) - 0.01).exp_()
    return v.mul_(alpha).sin_().div_(cos_v).mul_(power)


def sample_symmetric_stable(
    shape: int | Sequence[int],
    alpha: float | torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw i.i.d. symmetric alpha-stable samples with E[exp(itX)] = exp(-|scale·t|^alpha).

    Chambers, Mallows & Stuck (1976, JASA 71(354)): with V ~ U(-π/2, π/2) and W ~ Exp(1) independent,
    X = sin(αV) / cos(V)^{1/α} · [cos((1−α)V) / W]^{(1−α)/α}. alpha = 1 uses tan(V) (Cauchy) and
    alpha = 2 uses 2·sin(V)·√W (Box–Muller, √2·N(0, 1)) from the same V, W, so every element consumes
    the same two uniforms whatever its alpha: per-element alpha and scale stay exactly coupled.

    Args:
        shape: output shape.
        alpha: stability index in (0, 2]; a float or a tensor broadcastable to ``shape``.
        scale: scale >= 0 (0 gives zeros); a float or a tensor broadcastable to ``shape``.
        generator: the only source of randomness; None uses torch's default generator.
        dtype: any floating dtype (default ``torch.get_default_dtype()``). Computed in float64 when
            it is float64, else in float32, then cast.
        device: default: the generator's device, else CPU.

    Returns:
        Tensor of shape ``shape`` and dtype ``dtype``, always finite: heavy-tailed draws beyond the
        dtype's range (common for alpha < 1 in float16/bfloat16/float32) are clamped to its max.

    Raises:
        ValueError: alpha outside (0, 2] or not finite; scale negative or not finite; a non-floating
            dtype; alpha/scale not broadcastable to ``shape``; device not the generator's.
    """
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (e.g. torch.float32), got {dtype}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"device {device} differs from the generator's device {generator.device}; pass a matching one"
        )
    _check("alpha", alpha, _alpha_ok, "in (0, 2]")
    _check("scale", scale, _scale_ok, "finite and >= 0")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    finfo = torch.finfo(compute)

    def as_param(name: str, value: float | torch.Tensor) -> Number | torch.Tensor:
        if not isinstance(value, torch.Tensor):
            return float(value)
        try:
            broadcasts = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to shape {tuple(shape)}"
            )
        return value.to(device=device, dtype=compute)

    alpha, scale = as_param("alpha", alpha), as_param("scale", scale)

    u = torch.rand((2, *shape), generator=generator, dtype=compute, device=device)
    # float32(π/2) rounds above π/2, where cos < 0: keep V a few ulps inside the open interval.
    bound = math.pi / 2 * (1 - 4 * finfo.eps)
    v = u[0].sub_(0.5).mul_(math.pi).clamp_(-bound, bound)
    w = u[1].neg_().log1p_().neg_()  # Exp(1); u = 0 gives W = 0, which _cms floors at tiny

    if isinstance(alpha, torch.Tensor):
        # The exact special cases first: _cms overwrites v and w.
        tan_v, gauss = torch.tan(v), 2 * torch.sin(v) * w.sqrt()
        x = torch.where(alpha == 1, tan_v, torch.where(alpha == 2, gauss, _cms(v, w, alpha, finfo.max)))
    elif alpha == 1:
        x = torch.tan(v)
    elif alpha == 2:
        x = 2 * torch.sin(v) * w.sqrt()
    else:
        x = _cms(v, w, alpha, finfo.max)
    if not (isinstance(scale, float) and scale == 1.0):
        x = x.clamp_(-finfo.max, finfo.max) * scale  # clamp first: inf * 0 would be nan
    max_out = torch.finfo(dtype).max
    return x.clamp_(-max_out, max_out).to(dtype)


def _flat_float64(samples: torch.Tensor | np.ndarray | Sequence[float], caller: str) -> torch.Tensor:
    x = torch.as_tensor(samples).detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n < MIN_ESTIMATOR_SAMPLES:
        raise ValueError(
            f"{caller} needs at least {MIN_ESTIMATOR_SAMPLES} samples, got n={n}; collect more samples"
            " (e.g. more micro-batch gradients) before estimating"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{caller}: samples contain {bad} non-finite values (nan/inf) out of n={n}; drop them first"
        )
    return x


def _log_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.abs().clamp_min(torch.finfo(torch.float64).tiny))  # exact zeros would give -inf


def alpha_from_log_moments(var_log_abs: torch.Tensor) -> torch.Tensor:
    """α from the variance of log|X| for X SαS(α, sigma), elementwise: α = (6·Var/π² − 1/2)^{-1/2}.

    Ma & Nikias (1995, IEEE TSP 43(12)); Kuruoglu (2001, IEEE TSP 49(10)): Var(log|X|) =
    (π²/6)·(1/α² + 1/2) whatever sigma. Where the bracket is <= 0 (log|X| spreads no more than a
    Gaussian's) the result is ``inf``; nothing is clipped.

    Args:
        var_log_abs: Var(log|X|), a float64 tensor of any shape (e.g. (K,), one per direction).

    Returns:
        α̂, float64, of the same shape.
    """
    bracket = 6 * var_log_abs / math.pi**2 - 0.5
    return torch.where(bracket > 0, bracket.clamp_min(1e-300).rsqrt(), math.inf)


def scale_from_log_moments(mean_log_abs: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """sigma from the mean of log|X| for X SαS(α, sigma), elementwise: exp(E[log|X|] − γ·(1/α − 1)).

    Ma & Nikias (1995); Kuruoglu (2001): E[log|X|] = γ·(1/α − 1) + log sigma, γ Euler's constant.

    Args:
        mean_log_abs: E[log|X|], a float64 tensor of any shape.
        alpha: α in (0, 2], a float or a tensor broadcastable with ``mean_log_abs``.

    Returns:
        sigmâ, float64, of the broadcast shape.
    """
    return torch.exp(mean_log_abs - EULER_GAMMA * (1 / alpha - 1))


def estimate_tail_index(samples: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Estimate alpha from i.i.d. centred symmetric samples by the block-sum estimator.

    Mohammadi, Mohammadpour & Ogata (2015, Metrika 78), as used by Şimşekli et al. (ICML 2019): with
    K1 = floor(√n), K2 = n // K1 (the remaining n − K1·K2 samples are dropped) and Y_j the sums of K1
    consecutive samples, 1/α̂ = (mean_j log|Y_j| − mean_i log|X_i|) / log K1. It rests on
    sum of K1 SαS = K1^{1/α}·SαS in law. Computed in float64.

    Args:
        samples: any tensor or array-like of n >= MIN_ESTIMATOR_SAMPLES (100) values, flattened.

    Returns:
        The raw α̂ as a float, not clipped: values a little above 2 mean Gaussian-like tails and
        ``inf`` means block sums that do not grow at all. Callers that need a valid alpha clip it
        into (0, 2].

    Raises:
        ValueError: n < 100, non-finite samples, or all samples zero.
    """
    x = _flat_float64(samples, "estimate_tail_index")
    k1 = math.isqrt(x.numel())
    k2 = x.numel() // k1
    x = x[: k1 * k2]
    if not x.any():
        raise ValueError("estimate_tail_index: all samples are zero; there is no tail to measure")
    diff = (_log_abs(x.view(k2, k1).sum(dim=1)).mean() - _log_abs(x).mean()).item() / math.log(k1)
    return 1.0 / diff if diff > 0 else math.inf


def estimate_tail_index_log_moments(samples: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Estimate alpha from the variance of log|X| (Ma & Nikias 1995; Kuruoglu 2001).

    α̂ = :func:`alpha_from_log_moments` of the sample variance of log|X|, capped at
    ``MAX_LOG_MOMENT_ALPHA`` (1e6): samples whose log|X| spreads no more than a Gaussian's get the cap.
    Independent of ``estimate_tail_index``: it uses the spread, not the growth of block sums.

    Args:
        samples: any tensor or array-like of n >= 100 values, flattened.

    Returns:
        The raw α̂ as a float.

    Raises:
        ValueError: n < 100 or non-finite samples.
    """
    var = _log_abs(_flat_float64(samples, "estimate_tail_index_log_moments")).var()
    return min(alpha_from_log_moments(var).item(), MAX_LOG_MOMENT_ALPHA)


def estimate_stable_scale(
    samples: torch.Tensor | np.ndarray | Sequence[float], alpha: float | None = None
) -> float:
    """Estimate the SαS scale sigma (E[exp(itX)] = exp(-|sigma·t|^alpha)) by log moments.

    sigmâ = :func:`scale_from_log_moments` of the sample mean of log|X|.

    Args:
        samples: any tensor or array-like of n >= 100 i.i.d. centred symmetric values, flattened.
        alpha: the known stability index in (0, 2]; None estimates it with ``estimate_tail_index``
            clipped into [0.1, 2].

    Returns:
        sigmâ as a float.

    Raises:
        ValueError: n < 100, non-finite samples, alpha outside (0, 2].
    """
    x = _flat_float64(samples, "estimate_stable_scale")
    if alpha is None:
        alpha = min(max(estimate_tail_index(x), 0.1), 2.0)
    _check("alpha", alpha, _alpha_ok, "in (0, 2]")
    return scale_from_log_moments(_log_abs(x).mean(), alpha).item()
