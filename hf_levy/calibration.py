"""Virtual-batch calibration: the noise a batch of size b really shows along the top-K eigenvectors.

With micro-batches of b examples, g_m the gradient of micro-batch m and v_i the eigenvectors,
the projections g_m·v_i (m = 1..M) are i.i.d. draws of (true gradient + batch-b noise)·v_i. Along
each direction the noise is modelled as SαS(α_i, c_{b,i}) in the convention of ``hf_levy.stable``,
E[exp(itX)] = exp(−|c·t|^α). Independent SαS parts compose as c^α = c_1^α + c_2^α, so a mean of
n draws has scale c·n^{1/α−1}: the batch-B gradient carries c_b·(b/B)^{1−1/α} and the noise to inject
on top of it is c_inj = c_b·(1 − (b/B)^{α−1})^{1/α} (:func:`injected_scale`).

Estimator (:func:`fit_directional_noise`): log moments (Ma & Nikias 1995; Kuruoglu 2001) of the
M(M−1)/2 pairwise differences D = X_i − X_j. D is SαS(α, 2^{1/α}c) whatever the location, so no
reference gradient is needed: Var log|D| = (π²/6)(1/α² + 1/2) and E log|D| = γ(1/α − 1) + log(2^{1/α}c),
γ Euler's constant. The pairs form a U-statistic, which averages out much of the sampling noise of
log|X|; in every cell measured it beat the block-sum estimator (Mohammadi et al. 2015, which at
M ≤ 512 has only √M blocks) and log moments of the centred samples even with the centre known exactly.
Centring at the column mean biases α̂ up for heavy tails (+0.16 to +0.30 at α = 1.2: the mean of M
draws carries noise of scale c·M^{1/α−1}, about c/2 at M = 64, shared by every sample); centring at
the median leaves near-zero residuals that bias it down near α = 2 (−0.17 to −0.36). Bias/RMSE of
the clipped α̂ over 2000 seeded SαS samples (``benchmarks/bench_tail_estimators.py``), M = 64/128/256/512:
    α=1.2: +0.07/0.23  +0.03/0.16  +0.02/0.11  +0.01/0.08  (block-sum RMSE, centre known: 0.34 0.26 0.19 0.14)
    α=1.5: +0.06/0.24  +0.03/0.17  +0.02/0.12  +0.01/0.09  (block-sum: 0.34 0.29 0.23 0.19)
    α=1.8: +0.03/0.18  +0.02/0.14  +0.01/0.10  +0.01/0.08  (block-sum: 0.31 0.27 0.21 0.18)
    α=2.0: −0.05/0.10  −0.03/0.06  −0.02/0.04  −0.01/0.02  (block-sum: 0.33 0.27 0.21 0.17)
and the scale's relative RMSE with α estimated: 11–20 % at M = 64, 3–7 % at M = 512.

Legend: P parameters (flat length), K eigenvectors (directions), M micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy.hvp import LossFn, _LossClosure, _sharded_gradient
from hf_levy.params import checked_trainable, flatten, is_sharded, local_view, num_elements

EULER_GAMMA = 0.5772156649015329
# Fitted α is clipped into this range. Above 2 there is no stable law. Below 0.5 an estimate from
# M ≤ 512 draws reflects a few near-equal projections (log|D| outliers) more than real tails, the
# sampler overflows float32 ever more often, and any α ≤ 1 already means nothing is injected
# (see injected_scale): the floor only keeps such fits from producing absurd scales.
ALPHA_RANGE = (0.5, 2.0)
# Below 32 micro-batches the α̂ RMSE exceeds 0.3 (measured: 0.32–0.35 at M = 32 for α ≤ 1.5).
MIN_MICROBATCHES = 32
_PAIR_CHUNK = 1 << 22  # elements of the (rows, M, K) difference block held at once
# Pairs closer than this fraction of the column's spread (median absolute deviation) are ties. Projections
# are float32 dot products, and the same micro-batch drawn twice (its examples in another order) differs by
# rounding alone: one such pair among 32 (|D| = 4e-9 to 2e-8 against a spread of ~2e-2) puts log|D| ≈ -19
# outliers into the variance and moved α̂ by up to 0.45 (1.62 → 1.21, 2.0 → 1.49), so a single-process and a
# DDP run of the same calibration disagreed (the copies tied exactly in one, by rounding in the other). A genuine
# pair this close has probability ~1e-5, and dropping one barely moves the moments. Relative to the spread,
# not the values, so the fit stays location-invariant and scale-equivariant.
_TIE_RELATIVE = 1e-5


@dataclass
class Projections:
    """``values_MK`` (float64, CPU): g_m·v_i for M micro-batches and K directions; ``num_gradients``: M."""

    values_MK: Tensor
    num_gradients: int


@dataclass
class DirectionalNoise:
    """Per-direction SαS fit: ``alpha_K`` and ``scale_K`` (float64, CPU, shape (K,))."""

    alpha_K: Tensor
    scale_K: Tensor


def loss_gradient(
    model: nn.Module, batch: Mapping[str, Any], params: Sequence[Tensor], *, loss_fn: LossFn | None = None
) -> Tensor:
    """The flat (P,) gradient of the loss on ``batch`` w.r.t. ``params`` (dtype of the parameters).

    The loss is ``model(**batch).loss`` unless ``loss_fn(model, batch)``; taken in eval mode with
    ``torch.autograd.grad``, so ``.grad``, the modes of all submodules and the global RNG are as before.
    Parameters the loss does not reach get zeros. FSDP2-sharded parameters: every rank calls this on its
    share of the batch and gets its piece (local shards) of the gradient of the mean loss over the ranks
    (a ``backward``, since FSDP reduces only there; ``.grad`` is restored).

    Raises:
        ValueError: empty ``params``, a parameter without ``requires_grad``, or no ``.loss``.
    """
    params = checked_trainable(params)
    device = local_view(params[0]).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    closure = _LossClosure(model, batch, loss_fn, device)
    if any(is_sharded(p) for p in params):
        with closure.frozen_state(), torch.enable_grad():
            return _sharded_gradient(closure, params)
    with closure.frozen_state(), torch.enable_grad():
        grads = torch.autograd.grad(closure(), params, allow_unused=True)
    return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)])


def microbatch_projections(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    params: Sequence[Tensor],
    vectors_PK: Tensor,
    *,
    loss_fn: LossFn | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Projections:
    """Project the gradient of each micro-batch on the K columns of ``vectors_PK``.

    Args:
        model: the module; see :func:`loss_gradient` for how the loss is taken and what is preserved.
        batches: M dicts of tensors, each a micro-batch of the virtual batch size b.
        params: the parameters the vectors are flat over (in that order).
        vectors_PK: (P, K) directions, e.g. ``Eigenpairs.vectors``; products in their dtype.
        reduce: sums partial (K,) projections over ranks when the parameters are FSDP shards (e.g.
            ``ParameterSpace.reduce``); then every rank passes its share of each micro-batch and the rows of
            ``vectors_PK`` for its local elements, and all ranks get the same table.

    Returns:
        :class:`Projections` with ``values_MK`` (M, K) float64 on CPU and ``num_gradients`` = M.

    Raises:
        ValueError: ``vectors_PK`` not of shape (P, K), ``batches`` empty, or as :func:`loss_gradient`.
    """
    params = checked_trainable(params)
    dim = num_elements(params)
    if vectors_PK.dim() != 2 or vectors_PK.shape[0] != dim:
        raise ValueError(
            f"vectors_PK must have shape (P, K) with P={dim} (the elements of params), "
            f"got {tuple(vectors_PK.shape)}"
        )
    rows = []
    for batch in batches:
        g_P = loss_gradient(model, batch, params, loss_fn=loss_fn)
        projection_K = (vectors_PK.mT @ g_P.to(vectors_PK)).double()
        rows.append((projection_K if reduce is None else reduce(projection_K)).cpu())
    if not rows:
        raise ValueError("batches is empty: pass M >= 32 micro-batches of the virtual batch size")
    return Projections(torch.stack(rows), len(rows))


def fit_directional_noise(
    projections_MK: Tensor, *, alpha: float | None = None, clip_alpha: bool = True
) -> DirectionalNoise:
    """Fit SαS(α_i, c_i) to the noise along each direction from M i.i.d. projections.

    Pairwise-difference log moments (module docstring): location-free, so no reference gradient is
    subtracted. Ties (D = 0 up to float32 rounding, e.g. bf16-quantized projections, bootstrap
    duplicates, a micro-batch drawn twice) are dropped; a column without two distinct values gets α = 2 and scale 0 (nothing to inject).

    Args:
        projections_MK: (M, K) projections g_m·v_i, M >= 32 (:attr:`Projections.values_MK`).
        alpha: a float in (0, 2] fixes every α_i (only the scales are fitted); None estimates them.
        clip_alpha: clip estimated α_i into ``ALPHA_RANGE`` = [0.5, 2] (the calibration needs a
            valid α); False returns the raw estimate (diagnostics), possibly above 2 or ``inf``, and
            then takes the scale with min(α̂, 2).

    Returns:
        :class:`DirectionalNoise` with ``alpha_K`` and ``scale_K`` (float64, CPU, shape (K,)).

    Raises:
        ValueError: ``projections_MK`` not 2-D, M < 32, non-finite values; ``alpha`` outside (0, 2].
    """
    if not isinstance(projections_MK, Tensor) or projections_MK.dim() != 2:
        shape = tuple(projections_MK.shape) if isinstance(projections_MK, Tensor) else type(projections_MK)
        raise ValueError(f"projections_MK must be a 2-D tensor (M, K), got {shape}")
    m = projections_MK.shape[0]
    if m < MIN_MICROBATCHES:
        raise ValueError(
            f"projections_MK has M={m} micro-batches; at least {MIN_MICROBATCHES} are needed (the α "
            "estimate's RMSE exceeds 0.3 below that): collect more micro-batches"
        )
    x = projections_MK.detach().double().cpu()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"projections_MK has {bad} non-finite values (nan/inf); drop those micro-batches")
    if alpha is not None and not (0 < alpha <= 2 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be in (0, 2] or None (estimate it), got {alpha!r}")

    mean_K, var_K, count_K = _pairwise_log_moments(x)
    if alpha is not None:
        alpha_K = torch.full_like(mean_K, float(alpha))
    else:
        bracket = 6 * var_K / math.pi**2 - 0.5
        alpha_K = torch.where(bracket > 0, bracket.clamp_min(1e-300).rsqrt(), math.inf)
        if clip_alpha:
            alpha_K = alpha_K.clamp(*ALPHA_RANGE)
    flat = count_K < 2
    alpha_K = torch.where(flat, 2.0, alpha_K)
    inv_alpha = 1 / alpha_K.clamp(max=2.0)
    scale_K = torch.exp(mean_K - EULER_GAMMA * (inv_alpha - 1)) / 2**inv_alpha
    return DirectionalNoise(alpha_K, torch.where(flat, 0.0, scale_K))


def injected_scale(
    scale_b_K: Tensor | float,
    alpha_K: Tensor | float,
    virtual_batch_size: int,
    physical_batch_size: int | None,
) -> Tensor:
    """The SαS scale to inject so that batch-B gradient noise plus it has the batch-b scale.

    c_inj = c_b·(1 − (b/B)^{α−1})^{1/α}, from c_b^α = c_B^α + c_inj^α and c_B = c_b·(b/B)^{1−1/α}.
    ``physical_batch_size=None`` means full batch (no gradient noise of its own): c_inj = c_b.
    For α ≤ 1 the factor is 0: a mean of B/b Cauchy draws has the scale of one draw (α = 1), and
    for α < 1 a larger one, so a bigger batch has no less noise than batch b and nothing is added.

    Args:
        scale_b_K: c_b >= 0 per direction (e.g. ``DirectionalNoise.scale_K``), tensor or float.
        alpha_K: α in (0, 2], tensor broadcastable with ``scale_b_K`` or float.
        virtual_batch_size: b, the batch size whose noise is imitated (>= 1).
        physical_batch_size: B, the examples in one optimizer step's gradient (all ranks, all
            accumulation steps), > b; None for full batch.

    Returns:
        c_inj, float64 tensor of the broadcast shape.

    Raises:
        ValueError: a batch size not a positive integer, b >= B, scale < 0 or non-finite, α outside (0, 2].
    """
    for name, size in (
        ("virtual_batch_size", virtual_batch_size),
        ("physical_batch_size", physical_batch_size),
    ):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
    if physical_batch_size is not None and virtual_batch_size >= physical_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} must be smaller than physical_batch_size="
            f"{physical_batch_size}: injection can only add noise, so imitate a smaller batch (or pass "
            "physical_batch_size=None for full-batch training)"
        )
    scale = torch.as_tensor(scale_b_K, dtype=torch.float64)
    alpha = torch.as_tensor(alpha_K, dtype=torch.float64)
    if not bool(((scale >= 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"scale_b_K must be finite and >= 0, got {scale.flatten().tolist()[:8]}")
    if not bool(((alpha > 0) & (alpha <= 2)).all()):
        raise ValueError(f"alpha_K must be in (0, 2], got {alpha.flatten().tolist()[:8]}")
    if physical_batch_size is None:
        return (scale * torch.ones_like(alpha)).clone()
    ratio = virtual_batch_size / physical_batch_size
    factor = (1 - ratio ** (alpha - 1)).clamp_min(0) ** (1 / alpha)
    return scale * factor


def _pairwise_log_moments(x_MK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and count of log|x_i − x_j| over the pairs i < j that are not ties, per column
    (|x_i − x_j| > _TIE_RELATIVE · MAD of the column)."""
    m, k = x_MK.shape
    total, total_sq, count = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
    rows = max(1, _PAIR_CHUNK // (m * k))
    cols = torch.arange(m)
    tie_K = _TIE_RELATIVE * (x_MK - x_MK.median(0).values).abs().median(0).values
    for start in range(0, m - 1, rows):
        stop = min(m, start + rows)
        diff = x_MK[start:stop, None, :] - x_MK[None, :, :]  # (rows, M, K)
        distinct = diff.abs() > tie_K
        keep = (cols[None, :] > torch.arange(start, stop)[:, None])[:, :, None] & distinct
        logs = torch.where(keep, diff.abs().log(), 0.0)
        total += logs.sum((0, 1))
        total_sq += logs.square().sum((0, 1))
        count += keep.sum((0, 1))
    mean = total / count.clamp_min(1)
    var = (total_sq - count * mean.square()) / (count - 1).clamp_min(1)
    return mean, var, count
