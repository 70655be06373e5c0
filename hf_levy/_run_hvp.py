"""The sketch's Hessian-vector product inside a training run: its batch, its precision, its ranks.

The sketch batch of step s is the same seeded draw of ``sketch_batch_size`` training examples on every
rank, each rank taking every world-th example. The product v ↦ H v is averaged over the ranks' shares
(replicated parameters) or computed on this rank's padded piece (FSDP, whose gradient reduce-scatter
already averages the ranks). Legend: P trainable parameters (this rank's padded piece under FSDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy import _compat, _rng
from hf_levy._rng import step_generator
from hf_levy.hvp import LossFn, make_hvp
from hf_levy.params import ParameterSpace, ProductInputs, rank_and_world, sum_over_ranks


def sketch_batch(dataset: Any, collate_fn: Callable, size: int, seed: int, step: int) -> dict[str, Any]:
    """This rank's share of the sketch batch of ``step``: the same global draw on every rank."""
    generator = step_generator(seed + _rng.SKETCH_BATCH, step)
    indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    rank, world = rank_and_world()
    return collate_fn([dataset[i] for i in indices[rank::world]])


def count_examples(batch: Mapping[str, Any]) -> int:
    """The batch dimension of the first tensor of a collated batch."""
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("the collated sketch batch holds no tensor with a batch dimension")


def sketch_matvec(
    model: nn.Module,
    batch: Mapping[str, Any],
    params: Sequence[nn.Parameter],
    space: ParameterSpace,
    method: str,
    loss_fn: LossFn | None = None,
) -> Callable[[Tensor], Tensor]:
    """v_P ↦ (H v)_P on the sketch batch as this rank sees it.

    The layout ``space`` decides how the ranks' products combine
    (:meth:`hf_levy.params.ParameterSpace.sketch_matvec`).
    """
    inputs = ProductInputs(
        local=lambda: _product(model, batch, params, method, loss_fn),
        share=lambda: _batch_share(batch, space),
        model=model,
        batch=batch,
        method=method,
        loss_fn=loss_fn,
    )
    return space.sketch_matvec(inputs)


def _product(
    model: nn.Module,
    batch: Mapping[str, Any],
    params: Sequence[nn.Parameter],
    method: str,
    loss_fn: LossFn | None,
) -> Callable[[Tensor], Tensor]:
    """This rank's v ↦ H v on its share of the batch, over whole (or FSDP-local) parameters."""
    if method != "finite_difference":
        return make_hvp(model, batch, params, method=method, loss_fn=loss_fn)
    # A central difference divides rounding error by ε, so low-precision matmuls would swamp the
    # product: these products run in float32 even when training uses bf16/fp16 autocast.
    with full_precision_forward(model):
        fd = make_hvp(model, batch, params, method=method, loss_fn=loss_fn)

    def hvp(v_P: Tensor) -> Tensor:
        with full_precision_forward(model):
            return fd(v_P)

    return hvp


def _batch_share(batch: Mapping[str, Any], space: ParameterSpace) -> float:
    """This rank's fraction of the sketch batch (its examples over all ranks' examples)."""
    share = float(count_examples(batch))
    return share / float(sum_over_ranks(torch.tensor(share, dtype=torch.float64, device=space.device)))


@contextlib.contextmanager
def full_precision_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without the autocast wrapper Accelerate puts around its forward for bf16/fp16 training.

    Accelerate keeps the unwrapped forward (:func:`hf_levy._compat.accelerate_original_forward`); it is swapped
    in for the block and the wrapped one put back after, so training itself keeps its mixed precision.
    """
    original = _compat.accelerate_original_forward(model)
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped
