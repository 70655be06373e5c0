"""Tail-index profile of a model's gradient noise across batch sizes (the measurement behind hf_levy).

For each batch size b, M mini-batch gradients minus a reference gradient (a much larger batch, or the
full dataset) give M noise vectors. Two estimates per b, each with a percentile bootstrap interval
over the M vectors:

* **pooled**, as Şimşekli, Sagun & Gürbüzbalaban (ICML 2019) did: every coordinate of every noise
  vector is one scalar sample, fed to the block-sum estimator (``hf_levy.estimate_tail_index``);
* **per direction**: the projections on each column of ``vectors_PK`` (e.g. the top Hessian
  eigenvectors), fitted by :func:`hf_levy.calibration.fit_directional_noise` (raw α̂, not clipped).

What this can and cannot tell. The pooled estimate treats coordinates with very different noise
scales as draws of one law. Block sums of Gaussians with unequal variances grow faster than √K1
(their log mean exceeds the mean log by the spread of log-scales), so a scale mixture of Gaussians
reads as α̂ < 2: a pooled α̂ < 2 alone does not prove heavy tails (Panigrahi et al. 2019; Xie et
al. 2023; ``test_pooled_estimate_reads_gaussians_of_unequal_scales_as_heavy_tailed`` gets 0.76 from
Gaussian noise). It also takes the coordinates of one noise vector as independent; correlated ones
that cancel in block sums push α̂ far above 2 (5 to 35 for Gaussian noise on a 4-parameter model). The
per-direction estimate fits one scalar law along one fixed direction, which is the quantity
hf_levy injects; it still assumes the M gradients are i.i.d. and the law stable, and with M ≤ 512
its RMSE is 0.02–0.25 (see ``hf_levy.calibration``), so read the interval, not the point.

Legend: P parameters (flat), K directions, M mini-batches per batch size, S pooled coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hf_levy import _rng
from hf_levy._rng import step_generator
from hf_levy.calibration import MIN_MICROBATCHES, fit_directional_noise
from hf_levy.hvp import LossFn, loss_gradient
from hf_levy.params import num_elements
from hf_levy.stable import MIN_ESTIMATOR_SAMPLES, estimate_stable_scale, estimate_tail_index

Row = dict[str, Any]


def tail_index_profile(
    model: nn.Module,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]],
    params: Sequence[Tensor],
    batch_sizes: Sequence[int],
    *,
    num_batches: int = 256,
    reference_batch_size: int | None = None,
    vectors_PK: Tensor | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    pooled_coordinates: int | None = 10_000,
    progress: bool = True,
) -> list[Row]:
    """Estimate α (and the SαS scale) of the gradient noise at each batch size.

    Mini-batches are drawn without replacement within a batch, from a generator seeded by
    (``seed``, b), never the global RNG. The reference gradient is the mean of chunk gradients
    weighted by chunk size, so the loss must be a mean over the examples of a batch.

    Args:
        model: the module whose gradients are measured, as in :func:`hf_levy.hvp.loss_gradient` (eval
            mode; the model's modes, ``.grad`` and the global RNG are left as they were).
        dataset: map-style (``len`` and integer indexing).
        collate_fn: makes a batch from a list of examples.
        params: the trainable parameters the gradients are flat over, as in ``loss_gradient``.
        batch_sizes: the b to profile, each in [1, len(dataset)).
        num_batches: M mini-batches per batch size (>= 32).
        reference_batch_size: examples in the reference gradient (>= max(batch_sizes); 10× or more
            keeps its own noise small); None: the whole dataset, in chunks of max(batch_sizes).
        vectors_PK: (P, K) directions for per-direction estimates; None: pooled only.
        bootstrap: resamples of the M noise vectors for the 95 % percentile intervals (0: none).
        seed: seeds the mini-batch draws, the reference chunks, the pooled coordinates and the bootstrap.
        loss_fn: ``loss_fn(model, batch)`` instead of ``model(**batch).loss``, as in ``loss_gradient``.
        pooled_coordinates: S coordinates (a seeded random subset, kept in parameter order) pooled
            for Şimşekli's estimate, bounding memory at M·S; None pools all P.
        progress: show a tqdm bar over the gradient evaluations.

    Returns:
        One dict per (batch size, direction), batch sizes in the order given, ``"pooled"`` first then
        ``"v0"``, ``"v1"``, ...: keys ``batch_size``, ``direction``, ``alpha``, ``alpha_low``,
        ``alpha_high``, ``scale``, ``scale_low``, ``scale_high`` (floats; bounds nan without bootstrap;
        α̂ is raw, so above 2 or ``inf`` for light tails), ``num_batches`` and ``num_samples``.

    Raises:
        ValueError: a bad batch size, ``num_batches`` < 32, ``reference_batch_size`` too small or
            too large, ``vectors_PK`` not (P, K), ``bootstrap`` < 0, ``pooled_coordinates`` < 1, or
            fewer than 100 pooled samples.
    """
    params = list(params)
    n, dim = len(dataset), num_elements(params)
    batch_sizes = list(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes is empty: pass the batch sizes to profile, e.g. [8, 32, 128]")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < n:
            raise ValueError(f"batch_sizes must hold integers in [1, {n}) (the dataset size), got {b!r}")
    if num_batches < MIN_MICROBATCHES:
        raise ValueError(f"num_batches must be >= {MIN_MICROBATCHES}, got {num_batches}")
    largest = max(batch_sizes)
    if reference_batch_size is not None and not largest <= reference_batch_size <= n:
        raise ValueError(
            f"reference_batch_size must be in [{largest}, {n}] (max(batch_sizes), the dataset size), got "
            f"{reference_batch_size}; None uses the whole dataset"
        )
    if vectors_PK is not None and (vectors_PK.dim() != 2 or vectors_PK.shape[0] != dim):
        raise ValueError(f"vectors_PK must have shape (P, K) with P={dim}, got {tuple(vectors_PK.shape)}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 (0 turns the intervals off), got {bootstrap}")
    if pooled_coordinates is not None and pooled_coordinates < 1:
        raise ValueError(f"pooled_coordinates must be >= 1 or None (all), got {pooled_coordinates}")
    pooled_n = num_batches * min(dim, pooled_coordinates or dim)
    if pooled_n < MIN_ESTIMATOR_SAMPLES:
        raise ValueError(
            f"the pooled estimate needs num_batches × coordinates >= {MIN_ESTIMATOR_SAMPLES}, got "
            f"{num_batches} × {pooled_n // num_batches}: raise num_batches or pooled_coordinates"
        )

    coords = None
    if pooled_coordinates is not None and pooled_coordinates < dim:
        perm = torch.randperm(dim, generator=step_generator(seed + _rng.TAIL_COORDINATE, 0))
        coords = perm[:pooled_coordinates].sort().values
    ref_n = n if reference_batch_size is None else reference_batch_size
    total = math.ceil(ref_n / largest) + len(batch_sizes) * num_batches
    bar = tqdm(total=total, disable=not progress, desc="tail_index_profile", unit="grad")

    def gradient(indices: list[int]) -> Tensor:
        g = loss_gradient(model, collate_fn([dataset[i] for i in indices]), params, loss_fn=loss_fn)
        bar.update()
        return g

    try:
        if reference_batch_size is None:
            ref_indices = list(range(n))
        else:
            ref_gen = step_generator(seed + _rng.TAIL_REFERENCE, 0)
            ref_indices = torch.randperm(n, generator=ref_gen)[:reference_batch_size].tolist()
        chunks = [ref_indices[i : i + largest] for i in range(0, len(ref_indices), largest)]
        reference = sum(gradient(c).double() * len(c) for c in chunks) / len(ref_indices)

        rows: list[Row] = []
        for b in batch_sizes:
            generator = step_generator(seed, b)
            pooled, projected = [], []
            for _ in range(num_batches):
                noise = gradient(torch.randperm(n, generator=generator)[:b].tolist()).double() - reference
                pooled.append((noise if coords is None else noise[coords.to(noise.device)]).cpu())
                if vectors_PK is not None:
                    projected.append((vectors_PK.mT @ noise.to(vectors_PK)).double().cpu())
            pooled_MS = torch.stack(pooled)
            projected_MK = torch.stack(projected) if projected else None
            rows += _estimate(
                b, pooled_MS, projected_MK, bootstrap, step_generator(seed + _rng.TAIL_BOOTSTRAP, b)
            )
    finally:
        bar.close()
    return rows


def _estimate(
    b: int, pooled_MS: Tensor, projected_MK: Tensor | None, bootstrap: int, generator: torch.Generator
) -> list[Row]:
    """Point estimates and bootstrap intervals for one batch size."""

    def fit(idx: Tensor | None) -> list[tuple[float, float]]:
        x = pooled_MS if idx is None else pooled_MS[idx]
        alpha = estimate_tail_index(x)
        out = [(alpha, estimate_stable_scale(x, min(max(alpha, 0.1), 2.0)))]
        if projected_MK is not None:
            noise = fit_directional_noise(
                projected_MK if idx is None else projected_MK[idx], clip_alpha=False
            )
            out += list(zip(noise.alpha_K.tolist(), noise.scale_K.tolist(), strict=True))
        return out

    m = pooled_MS.shape[0]
    point = fit(None)
    draws = np.array([fit(torch.randint(m, (m,), generator=generator)) for _ in range(bootstrap)])
    k = len(point) - 1
    names = ["pooled"] + [f"v{i}" for i in range(k)]
    rows = []
    for j, (name, (alpha, scale)) in enumerate(zip(names, point, strict=True)):
        if bootstrap:  # "inverted_cdf" picks actual draws, so an inf α̂ never meets an interpolation
            (a_lo, a_hi), (s_lo, s_hi) = (
                np.quantile(draws[:, j, i], [0.025, 0.975], method="inverted_cdf") for i in (0, 1)
            )
        else:
            a_lo = a_hi = s_lo = s_hi = math.nan
        rows.append(
            {
                "batch_size": b,
                "direction": name,
                "alpha": alpha,
                "alpha_low": float(a_lo),
                "alpha_high": float(a_hi),
                "scale": scale,
                "scale_low": float(s_lo),
                "scale_high": float(s_hi),
                "num_batches": m,
                "num_samples": pooled_MS.numel() if name == "pooled" else m,
            }
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table of :func:`tail_index_profile` rows."""
    lines = [
        "| batch size | direction | α̂ | 95% CI | scale | 95% CI | samples |",
        "|---:|:---|---:|:---|---:|:---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['direction']} | {r['alpha']:.3f} | "
            f"[{r['alpha_low']:.3f}, {r['alpha_high']:.3f}] | {r['scale']:.4g} | "
            f"[{r['scale_low']:.4g}, {r['scale_high']:.4g}] | {r['num_samples']} |"
        )
    return "\n".join(lines)
