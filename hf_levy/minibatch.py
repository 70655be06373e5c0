"""The real gradient noise of a sub-batch: ξ = κ·(g_b − g), drawn from an optimizer step's own batch.

A step's B examples give the large-batch gradient g; b of them, drawn at random, give g_b, whose deviation
g_b − g is exactly the sampling noise a batch of b would have had at this point (without replacement from
the step's batch). Adding it back turns the full-batch step into a batch-b step (κ = 1) or into one with
the noise of another virtual batch b' (:func:`minibatch_kappa`). The ``"minibatch_topk"`` mode keeps only
the part of it in the span of the sketch's K orthonormal eigenvectors, V Vᵀ(g_b − g).

Everything here takes and returns tensors; which examples, and the generator, come from the caller.

Legend: P parameters (flat length; this rank's piece under FSDP), K eigenvectors, J micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy.hvp import LossFn, loss_gradient
from hf_levy.params import local_view, num_elements


def minibatch_kappa(
    levy_scale: float, noise_batch_size: int, virtual_batch_size: int | None, step_batch_size: int
) -> float:
    """κ = levy_scale · √((1/b' − 1/B) / (1/b − 1/B)).

    The variance of the mean of b examples drawn without replacement from B, about the mean of the B, is
    proportional to 1/b − 1/B; scaling g_b − g by κ gives the noise of a batch of b' (``virtual_batch_size``,
    None: b' = b, so κ = levy_scale). Raises ValueError unless 1 <= b < B and 1 <= b' < B.
    """
    b, big = noise_batch_size, step_batch_size
    if not 1 <= b < big:
        raise ValueError(
            f"levy_noise_batch_size={b} must be >= 1 and smaller than the {big} examples of an optimizer "
            "step: the noise is that of a sub-batch of the step's batch; lower levy_noise_batch_size"
        )
    virtual = b if virtual_batch_size is None else virtual_batch_size
    if not 1 <= virtual < big:
        raise ValueError(
            f"levy_virtual_batch_size={virtual} must be >= 1 and smaller than the {big} examples of an "
            "optimizer step: lower it, or unset it to imitate levy_noise_batch_size"
        )
    return levy_scale * math.sqrt((1 / virtual - 1 / big) / (1 / b - 1 / big))


def batch_length(batch: Mapping[str, Any]) -> int:
    """Examples in a collated batch: the leading size of its first tensor entry.

    Raises:
        ValueError: when the batch holds no tensor.
    """
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"a training batch has no tensor entry to count examples in (keys {sorted(batch)})")


def subbatch_rows(sizes: Sequence[int], count: int, generator: torch.Generator) -> list[Tensor]:
    """``count`` distinct examples drawn uniformly from micro-batches of ``sizes``.

    Returned as sorted row indices per micro-batch (a list of J int64 tensors, some possibly empty).
    ``count`` above Σ sizes takes all.
    """
    total = sum(sizes)
    picked = torch.randperm(total, generator=generator)[: min(count, total)]
    rows, start = [], 0
    for size in sizes:
        inside = picked[(picked >= start) & (picked < start + size)]
        rows.append(inside.sort().values - start)
        start += size
    return rows


def select_rows(batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
    """The examples ``rows`` of a collated batch.

    Entries whose leading size is the batch's are indexed, the rest (scalars, shared tensors, non-tensors)
    kept as they are.
    """
    size = batch_length(batch)
    picked = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            picked[key] = value[rows.to(value.device)]
        else:
            picked[key] = value
    return picked


def subbatch_gradient(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    rows: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    loss_fn: LossFn | None = None,
) -> tuple[Tensor, int]:
    """The flat (P,) gradient of the sub-batch ``rows`` of ``batches`` and its number of examples n.

    g_S = Σ_j n_j ∇L(batch_j[rows_j]) / Σ_j n_j: micro-batches are not concatenated (their padded lengths
    may differ), each part's mean loss is weighted by its examples. Gradients as :func:`loss_gradient`
    (eval mode, ``.grad`` and the RNG untouched). Returns zeros and 0 when no row is picked.
    """
    total: Tensor | None = None
    count = 0
    for batch, picked in zip(batches, rows, strict=True):
        if picked.numel() == 0:
            continue
        g_P = loss_gradient(model, select_rows(batch, picked), params, loss_fn=loss_fn)
        total = g_P.mul_(picked.numel()) if total is None else total.add_(g_P, alpha=picked.numel())
        count += picked.numel()
    if total is None:
        first = local_view(params[0])
        return torch.zeros(num_elements(params), dtype=first.dtype, device=first.device), 0
    return total.div_(count), count


@dataclass(frozen=True)
class MinibatchNoise:
    """One step's ξ (this rank's flat piece, float32 or the gradient dtype) and what it was made of."""

    xi_P: Tensor
    norm: float  # ‖ξ‖ over all ranks
    topk_share: float | None  # ‖Vᵀd‖² / ‖d‖² (minibatch_topk), None for the whole difference


def minibatch_noise(
    grad_P: Tensor,
    subbatch_grad_P: Tensor,
    kappa: float,
    *,
    shrink: float = 1.0,
    vectors_PK: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> MinibatchNoise:
    """ξ = κ·d with d = shrink·g_b − g, or its projection κ·V Vᵀ d when ``vectors_PK`` is given.

    ``vectors_PK`` has orthonormal columns. ``grad_P`` is the step's gradient g as the optimizer will see it
    (after ``max_grad_norm`` clipping), and ``shrink`` = ‖g‖/‖g before clipping‖ the clipping factor: the
    sub-batch gradient is shrunk by it too, so that g + d is the batch-b gradient clipped by the same factor.
    ``reduce`` sums partial inner products over ranks when the vectors are FSDP pieces. Norms and projections
    in float64.
    """
    d_P = subbatch_grad_P.double().mul(shrink).sub_(grad_P.double())
    share = None
    if vectors_PK is not None:
        coef_K = reduce(vectors_PK.mT.double() @ d_P)
        total = float(reduce(d_P.square().sum()))
        share = float(coef_K.square().sum()) / total if total > 0 else math.nan
        xi_P = vectors_PK.double() @ (kappa * coef_K)
    else:
        xi_P = d_P.mul_(kappa)
    norm = float(reduce(xi_P.square().sum())) ** 0.5
    return MinibatchNoise(xi_P.to(grad_P.dtype), norm, share)
