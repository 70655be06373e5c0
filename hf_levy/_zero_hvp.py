"""Hessian-vector products on this rank's ZeRO piece of v (see :mod:`hf_levy._zero_space`).

* Stages 1 and 2 keep every parameter whole on every rank (only optimizer states and gradients are
  partitioned), so v's pieces are gathered into the (P,) vector, the product runs on the module exactly
  as under DDP (exact double backward or finite differences, ``torch.autograd.grad``, which never
  reaches DeepSpeed's gradient hooks), is averaged over the ranks' shares of the sketch batch, and each
  rank keeps its piece. The (P,) vectors are no larger than the parameters each rank already holds.
* Stage 3 keeps only each rank's piece of every parameter, gathered layer by layer inside forward and
  backward, so the first-order graph cannot be differentiated again: products are central differences
  H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε. θ ± εv is written into each rank's own piece (``ds_tensor``,
  after DeepSpeed's gathered copies are released, so that the next forward gathers the shifted pieces),
  and ∇L comes from ``torch.autograd.grad`` through the engine's gathered forward
  and backward, each parameter's gradient averaged over the ranks and cut to this rank's range as it
  arrives (a tensor hook), so no (P,) vector is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hf_levy.hvp import LossFn, _LossClosure, step_for, warn_if_low_precision
from hf_levy.params import sum_over_ranks

if TYPE_CHECKING:  # the space imports this module to build its products
    from hf_levy._zero_space import ZeroSpace


def zero_matvec(
    model: nn.Module,
    batch: Mapping[str, Any],
    space: ZeroSpace,
    method: str,
    replicated: Callable[[], Callable[[Tensor], Tensor]],
    share: float,
    loss_fn: LossFn | None = None,
) -> Callable[[Tensor], Tensor]:
    """v_piece ↦ (H v)_piece, both (dim,) on this rank.

    ``replicated()`` builds the rank-averaged product on (P,) vectors of whole parameters (stages 1, 2);
    ``share`` is this rank's fraction of the batch.
    """
    if space.stage < 3:
        full_product = replicated()
        return lambda v_P: space.local(full_product(space.full(v_P)))
    if method != "finite_difference":
        raise ValueError(
            "hvp_method='autograd' is not available under DeepSpeed ZeRO-3 (the gathered layers have no "
            "double backward): set hvp_method='finite_difference' or 'auto'"
        )
    return Stage3FiniteDifference(model, batch, space, share, loss_fn)


class Stage3FiniteDifference:
    """Central-difference products on stage-3 pieces (module docstring); the model is left bit for bit."""

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        space: ZeroSpace,
        share: float,
        loss_fn: LossFn | None,
    ):
        self.space, self.share = space, share
        self.params = space.params
        warn_if_low_precision(self.params)  # DeepSpeed's bf16/fp16 keeps low-precision weights
        self.closure = _LossClosure(model, batch, self.params, loss_fn)
        self.pieces = [p.ds_tensor.view(-1)[:n] for p, (_, n) in zip(self.params, space.ranges, strict=True)]
        with torch.no_grad():
            square = sum(float(t.double().pow(2).sum()) for t in self.pieces)
            theta_sq = float(sum_over_ranks(torch.tensor(square, dtype=torch.float64, device=space.device)))
        self.step = step_for(self.params[0].dtype, theta_sq, space.full_dim)
        # Release what DeepSpeed keeps gathered (its persistent parameters, those a no-grad input left
        # active): every forward below then gathers θ ± εv from the pieces.
        self.release = space.optimizer.empty_partition_cache
        self.release()

    def gradient(self) -> Tensor:
        """This rank's (dim,) piece of ∇L, averaged over the ranks by their shares of the batch."""
        space = self.space
        got: list[Tensor | None] = [None] * len(self.params)

        def keep(i: int) -> Callable[[Tensor], Tensor]:
            def hook(grad: Tensor) -> Tensor:
                whole = sum_over_ranks(grad.detach().reshape(-1).to(torch.float32) * self.share)
                first, n = space.ranges[i]
                got[i] = whole[first : first + n].clone()
                return grad.new_zeros(()).expand_as(grad)  # nothing full-sized is kept by autograd.grad

            return hook

        handles = [p.register_hook(keep(i)) for i, p in enumerate(self.params)]
        try:
            with self.closure.frozen_state(), torch.enable_grad():
                torch.autograd.grad(self.closure(), self.params, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            self.release()
        pieces = [g if g is not None else torch.zeros(n) for g, (_, n) in zip(got, space.ranges, strict=True)]
        return space.pad(torch.cat([g.to(space.device) for g in pieces]))

    def __call__(self, v_P: Tensor) -> Tensor:
        """(H v)_piece for this rank's piece ``v_P`` of v, by central differences; zeros for v = 0."""
        space = self.space
        norm = float(sum_over_ranks(v_P.double().pow(2).sum().to(space.device))) ** 0.5
        if norm == 0.0:
            return torch.zeros_like(v_P, dtype=torch.promote_types(v_P.dtype, torch.float32))
        eps = self.step / norm
        shift = space.unpad(v_P).to(device=space.device, dtype=torch.float32) * eps
        saved = [t.clone() for t in self.pieces]
        try:
            g_plus = self._gradient_at(+1.0, shift, saved)
            g_minus = self._gradient_at(-1.0, shift, saved)
        finally:
            with torch.no_grad():
                for piece, s in zip(self.pieces, saved, strict=True):
                    piece.copy_(s)
        return g_plus.sub_(g_minus).div_(2 * eps).to(device=v_P.device)

    def _gradient_at(self, sign: float, shift: Tensor, saved: list[Tensor]) -> Tensor:
        with torch.no_grad():
            start = 0
            for piece, s in zip(self.pieces, saved, strict=True):
                piece.copy_(s + sign * shift[start : start + s.numel()].to(s.dtype))
                start += s.numel()
        return self.gradient()
