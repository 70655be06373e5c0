"""The trainable-parameter space: flat vectors over a fixed list of parameters.

Every vector the sketch and the noise handle is a 1-D tensor of length P = Σ numel(p) over the
parameters in the order given (the order of ``model.parameters()`` for ``trainable_parameters``).

Legend for shape suffixes: P parameters (flat length), K eigenpairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: ``requires_grad`` ones (PEFT adapters only, under LoRA), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_elements(params: Sequence[Tensor]) -> int:
    """P, the length of a flat vector over ``params``."""
    return sum(p.numel() for p in params)


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate ``tensors`` into one flat (P,) tensor (a copy), optionally cast to ``dtype``."""
    return torch.cat([t.reshape(-1).to(dtype) if dtype else t.reshape(-1) for t in tensors])


def unflatten(flat_P: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat (P,) tensor into views shaped like ``like`` (dtype of ``flat_P`` kept).

    Raises:
        ValueError: when the length of ``flat_P`` is not P of ``like``.
    """
    numels = [t.numel() for t in like]
    if flat_P.dim() != 1 or flat_P.numel() != sum(numels):
        raise ValueError(
            f"expected a flat vector of length {sum(numels)} (the number of elements of the "
            f"{len(numels)} parameters), got shape {tuple(flat_P.shape)}"
        )
    return [chunk.view(t.shape) for chunk, t in zip(torch.split(flat_P, numels), like, strict=True)]


def gradients(params: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor | None:
    """The flat (P,) gradient of ``params`` (zeros where ``.grad`` is None), or None when no grad exists."""
    if all(p.grad is None for p in params):
        return None
    return flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], dtype)


def identity_reduce(partial: Tensor) -> Tensor:
    """The ``reduce`` of a single process: local inner products are already global."""
    return partial


def global_dot(a_P: Tensor, b_P: Tensor, reduce: Callable[[Tensor], Tensor] = identity_reduce) -> Tensor:
    """<a, b> accumulated in float64 over all shards (``reduce`` sums the local partials across ranks)."""
    return reduce(torch.dot(a_P.double(), b_P.double()))
