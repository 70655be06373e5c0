"""Virtual-batch calibration: the noise a batch of size b really shows along the top-K eigenvectors.

With micro-batches of b examples, g_m the gradient of micro-batch m and v_i the eigenvectors,
the projections g_m·v_i (m = 1..M) are i.i.d. draws of (true gradient + batch-b noise)·v_i. Along
each direction the noise is modelled as SαS(α_i, c_{b,i}) in the convention of ``hf_levy.stable``,
E[exp(itX)] = exp(−|c·t|^α). Independent SαS parts compose as c^α = c_1^α + c_2^α, so a mean of
n draws has scale c·n^{1/α−1}: the batch-B gradient carries c_b·(b/B)^{1−1/α} and the noise to inject
on top of it is c_inj = c_b·(1 − (b/B)^{α−1})^{1/α} (:func:`injected_scale`).

Estimator (:func:`fit_directional_noise`): log moments (Ma & Nikias 1995; Kuruoglu 2001) of the
M(M−1)/2 pairwise differences D = X_i − X_j. D is SαS(α, 2^{1/α}c) whatever the location, so no
reference gradient is needed: Var log|D| = (π²/6)(1/α² + 1/2) and
E log|D| = γ(1/α − 1) + log(2^{1/α}c), γ Euler's constant (:func:`hf_levy.stable.alpha_from_log_moments`,
:func:`hf_levy.stable.scale_from_log_moments`).
The pairs form a U-statistic, which averages out much of the sampling noise of log|X|: at M ≤ 512 it is
more accurate than the block-sum estimator (Mohammadi et al. 2015: only √M blocks) and than log moments of
the samples even with their centre known, and it needs no centre, whose estimate (mean or median) would
bias α̂ (docs/research/benchmarks.md, "Tail-index estimators").

Legend: P parameters (flat length), K eigenvectors (directions), M micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy import _rng
from hf_levy._rng import step_generator
from hf_levy.hvp import LossFn, loss_gradient
from hf_levy.params import (
    ParameterSpace,
    checked_trainable,
    num_elements,
    rank_and_world,
    sum_over_ranks,
)
from hf_levy.stable import alpha_from_log_moments, scale_from_log_moments

# Fitted α is clipped into this range. Above 2 there is no stable law. Below 0.5 an estimate from
# M ≤ 512 draws reflects a few near-equal projections (log|D| outliers) more than real tails, the
# sampler overflows float32 ever more often, and any α ≤ 1 already means nothing is injected
# (see injected_scale): the floor only keeps such fits from producing absurd scales.
ALPHA_RANGE = (0.5, 2.0)
# Below 32 micro-batches the α̂ RMSE exceeds 0.3 (docs/research/benchmarks.md, "Tail-index estimators").
MIN_MICROBATCHES = 32
_PAIR_CHUNK = 1 << 22  # elements of the (rows, M, K) difference block held at once
# Pairs closer than this fraction of the column's spread (median absolute deviation) are ties: a micro-batch
# drawn twice differs from its copy by float32 rounding alone, and one log|D| outlier that far below the
# rest drags α̂ down, while a genuine pair this close is rare. Relative to the spread, not the values, so
# the fit stays location-invariant and scale-equivariant.
_TIE_RELATIVE = 1e-5


@dataclass
class Projections:
    """``values_MK`` (float64, CPU): g_m·v_i for M micro-batches and K directions; ``num_gradients``: M.

    ``square_norm_sum`` = Σ_m ‖g_m‖² (float64) and ``gradient_sum_P`` = Σ_m g_m (this rank's piece under
    FSDP) give the gradients' total sample variance for :func:`variance_share`.
    """

    values_MK: Tensor
    num_gradients: int
    square_norm_sum: float = 0.0
    gradient_sum_P: Tensor | None = None


@dataclass
class DirectionalNoise:
    """Per-direction SαS fit: ``alpha_K`` and ``scale_K`` (float64, CPU, shape (K,))."""

    alpha_K: Tensor
    scale_K: Tensor


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
        loss_fn: ``loss_fn(model, batch)`` instead of ``model(**batch).loss``, as in :func:`loss_gradient`.
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
    reduce = reduce or (lambda t: t)
    rows, square_norm_sum, gradient_sum_P = [], 0.0, None
    for batch in batches:
        g_P = loss_gradient(model, batch, params, loss_fn=loss_fn)
        rows.append(reduce((vectors_PK.mT @ g_P.to(vectors_PK)).double()).cpu())
        square_norm_sum += float(reduce(g_P.double().square().sum()))
        gradient_sum_P = g_P.clone() if gradient_sum_P is None else gradient_sum_P.add_(g_P)
    if not rows:
        raise ValueError("batches is empty: pass M >= 32 micro-batches of the virtual batch size")
    return Projections(torch.stack(rows), len(rows), square_norm_sum, gradient_sum_P)


def variance_share(
    values_MK: Tensor,
    square_norm_sum: float,
    gradient_sum_P: Tensor,
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """The share of the M gradients' sample variance that lies in the span of the K orthonormal directions.

    Σ_m ‖V^T(g_m − ḡ)‖² / Σ_m ‖g_m − ḡ‖², with the denominator Σ_m ‖g_m‖² − ‖Σ_m g_m‖²/M and the numerator
    from the (M, K) projections p_m = V^T g_m. In [0, 1] for orthonormal V (up to rounding); ``reduce`` sums
    ‖Σ g_m‖² over ranks when ``gradient_sum_P`` is this rank's FSDP piece.
    """
    m = values_MK.shape[0]
    inside = float((values_MK - values_MK.mean(dim=0)).square().sum())
    sum_square = gradient_sum_P.double().square().sum()
    total = square_norm_sum - float(sum_square if reduce is None else reduce(sum_square)) / m
    return inside / total if total > 0 else math.nan


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
        alpha_K = alpha_from_log_moments(var_K)
        if clip_alpha:
            alpha_K = alpha_K.clamp(*ALPHA_RANGE)
    flat = count_K < 2
    alpha_K = torch.where(flat, 2.0, alpha_K)
    capped_K = alpha_K.clamp(max=2.0)
    scale_K = scale_from_log_moments(mean_K, capped_K) / 2 ** (1 / capped_K)  # D has scale 2^{1/α}·c
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
    """Mean, variance and count of log|x_i − x_j| per column, over the pairs i < j that are not ties.

    A pair counts when |x_i − x_j| > _TIE_RELATIVE · MAD of the column.
    """
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


def calibrate_to_virtual_batch(
    model: nn.Module,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]],
    space: ParameterSpace,
    vectors_PK: Tensor,
    *,
    virtual_batch_size: int,
    num_microbatches: int,
    physical_batch_size: int | None,
    seed: int,
    step: int,
    alpha: float | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[DirectionalNoise, float]:
    """The noise of batch size b along ``vectors_PK`` as the SαS law to inject, and its variance share.

    The law is (α_K, c_inj_K); the share is that of the batch-b gradient-noise variance those K directions
    carry (:func:`variance_share`).

    M micro-batches of b training examples (indices drawn from the calibration stream of ``seed`` at
    ``step``) are split across the ranks: whole micro-batches per rank for replicated parameters, each
    micro-batch's examples under FSDP (whose K dots are summed over ranks). The (M, K) table of
    projections is gathered on every rank, α and c_b are fitted per direction (``alpha`` fixes α), and
    c_inj = :func:`injected_scale` tops the physical batch's own noise up to the batch-b level.
    """
    b, m = virtual_batch_size, num_microbatches
    indices = torch.randint(len(dataset), (m, b), generator=step_generator(seed + _rng.CALIBRATION, step))
    rank, world = rank_and_world()
    mine = list(range(m)) if space.sharded else list(range(rank, m, world))
    share = slice(rank, None, world) if space.sharded else slice(None)
    local = microbatch_projections(
        model,
        (collate_fn([dataset[int(i)] for i in indices[row][share]]) for row in mine),
        space.params,
        space.unpad(vectors_PK),
        loss_fn=loss_fn,
        reduce=space.reduce,
    )
    projections, square_norm_sum, gradient_sum_P = (
        local.values_MK,
        local.square_norm_sum,
        local.gradient_sum_P,
    )
    if world > 1 and not space.sharded:  # each rank fills its rows; the sums gather the table everywhere
        table = torch.zeros(m, projections.shape[1], dtype=torch.float64, device=space.device)
        table[mine] = projections.to(table.device)
        projections = sum_over_ranks(table).cpu()
        square_norm_sum = float(
            sum_over_ranks(torch.tensor(square_norm_sum, dtype=torch.float64, device=space.device))
        )
        gradient_sum_P = sum_over_ranks(gradient_sum_P)
    share_K = variance_share(projections, square_norm_sum, gradient_sum_P, reduce=space.reduce)
    fit = fit_directional_noise(projections, alpha=alpha)
    return DirectionalNoise(
        fit.alpha_K, injected_scale(fit.scale_K, fit.alpha_K, b, physical_batch_size)
    ), share_K
