"""DeepSpeed ZeRO (stages 1, 2, 3): flat vectors over the elements this rank's optimizer partition owns.

ZeRO splits the trainable parameters between the ranks as contiguous ranges of their flattened elements
(stages 1 and 2: ranges of each parameter group's flat buffer, so a parameter may be split between two
ranks or held whole by one; stage 3: every parameter in N equal pieces, the last padded). Between
DeepSpeed's backward and its optimizer step the gradient, averaged over the ranks, exists only in those
ranges. So a flat vector here is, like an FSDP shard, this rank's piece: for each parameter in order the
range ``[start, start + n)`` of its flattened elements the rank owns, concatenated (P_local elements) and
padded with zeros to ``dim`` = max over ranks of P_local. A global inner product is a local dot and a
sum over ranks; the pieces of all ranks together are the full (P,) vector exactly once.

Gradients are read and written through DeepSpeed's own gradient fragments: stage 3's
``safe_get_local_grad`` / ``safe_set_local_grad``, and at stages 1 and 2 the fragment tensor that
``safe_set_full_grad`` writes (DeepSpeed has no local setter there). Under fp16 they hold the gradient
times the loss scale; every method here works in unscaled units.

Where the noise enters (:func:`install_before_step`): right before the ZeRO optimizer's ``step``. Under
DeepSpeed the optimizer step runs inside the Trainer's ``accelerator.backward`` (the engine's
``step()`` on the last micro-batch of an optimizer step), so ``on_pre_optimizer_step`` comes after the
update. The engine calls its ZeRO optimizer's ``step`` once per optimizer step, after the backward has
averaged the gradients over the ranks into each rank's partition and before that ``step`` checks for
fp16 overflow, unscales, clips and updates. That call is wrapped here.

Clipping moves with it: elsewhere the noise is added after ``max_grad_norm`` clipping and is not
clipped itself (its size is relative to the clipped ‖g‖), but DeepSpeed clips inside ``step``, after
anything added before it. So the ZeRO optimizer's clipping is off during the call and the wrapper clips first with DeepSpeed's
formula (:func:`clip_zero_grads`), then adds the noise. DeepSpeed's grad norm, which the Trainer logs as
``grad_norm``, is set back to ‖g‖ before clipping and noise, what the Trainer logs without DeepSpeed.

Legend: P trainable parameters (all elements), P_local this rank's, K eigenpairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy import _compat
from hf_levy._zero_hvp import zero_matvec
from hf_levy.params import ParameterSpace, ProductInputs, rank_and_world, sum_over_ranks


def zero_optimizer_of(optimizer: Any) -> Any:
    """The DeepSpeed ZeRO optimizer inside the Trainer's optimizer wrappers (Accelerate's, DeepSpeed's).

    Raises:
        ValueError: naming what was found, when no ZeRO stage 1-3 optimizer is inside (ZeRO stage 0, or
            DeepSpeed's BF16_Optimizer, which it picks for bf16 at stage 1 with fp32 gradient accumulation).
    """
    seen = []
    while optimizer is not None:
        seen.append(type(optimizer).__name__)
        if type(optimizer).__name__ in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    raise ValueError(
        f"hf_levy needs a DeepSpeed ZeRO stage 1, 2 or 3 optimizer, found {' -> '.join(seen) or 'none'}: set "
        '"zero_optimization": {"stage": 1, 2 or 3} in the DeepSpeed config; DeepSpeed\'s BF16_Optimizer (bf16 '
        'at stage 1 with "data_types": {"grad_accum_dtype": "fp32"}) is not supported: use stage 2 or 3'
    )


def zero_stage(optimizer: Any) -> int:
    """3 for DeepSpeed's stage-3 optimizer, else 2 when it partitions gradients, else 1."""
    if type(optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        return 3
    return 2 if getattr(optimizer, "partition_gradients", False) else 1


def full_numel(p: Tensor) -> int:
    """Elements of parameter ``p`` (stage 3 keeps only this rank's piece in memory: ``ds_numel``)."""
    return p.ds_numel if hasattr(p, "ds_id") else p.numel()


def owned_range(p: Tensor, rank: int) -> tuple[int, int]:
    """(start, n): the elements ``[start, start + n)`` of flattened ``p`` that this rank's partition owns."""
    if hasattr(p, "ds_id"):  # stage 3: equal pieces of ds_tensor.numel(), the last one padded
        size = p.ds_tensor.numel()
        start = rank * size
        return start, max(0, min(size, p.ds_numel - start))
    # stages 1, 2: DeepSpeed links a parameter to its owned fragment only
    mapping = _compat.get(p, _compat.DS_HP_MAPPING, None)
    if mapping is None:
        return 0, 0
    return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


class ZeroSpace(ParameterSpace):
    """:class:`ParameterSpace` over the ranges a ZeRO optimizer partition owns (see the module docstring).

    ``pad``, ``unpad``, ``reduce`` and ``broadcast_`` are the parent's; gradients go through DeepSpeed's
    fragments, and :meth:`full` / :meth:`local` convert between the (P,) vector and this rank's piece.
    """

    # The engine steps inside backward: the noise enters through install_before_step, and nothing may run a
    # second backward on the step's batch (no sub-batch noise, calibration or noise-scale measurement).
    steps_inside_backward = True

    def __init__(self, params: Sequence[nn.Parameter], optimizer: Any):
        self.optimizer = optimizer
        self.stage = zero_stage(optimizer)
        rank = rank_and_world()[0]
        self.ranges = [owned_range(p, rank) for p in params]
        sizes = [full_numel(p) for p in params]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]  # of each parameter in the (P,) vector
        self.full_dim = sum(sizes)
        super().__init__(params, sharded=True, local_numel=sum(n for _, n in self.ranges))

    @property
    def engine(self) -> str:
        """The engine's name, for messages."""
        return f"DeepSpeed ZeRO-{self.stage}"

    @property
    def weighs_rank_shares(self) -> bool:
        """True: the products weigh each rank's share of the sketch batch (:mod:`hf_levy._zero_hvp`)."""
        return True

    def sketch_matvec(self, inputs: ProductInputs) -> Callable[[Tensor], Tensor]:
        """v_piece ↦ (H v)_piece, both (dim,) on this rank (:func:`hf_levy._zero_hvp.zero_matvec`).

        Stages 1 and 2: v gathered, the ranks' products on whole parameters weighted by their shares of the
        batch and summed, this rank's piece kept; stage 3: central differences on the pieces.
        """
        share = inputs.share()
        whole = lambda: self.rank_averaged(inputs.local(), share)  # noqa: E731
        return zero_matvec(inputs.model, inputs.batch, self, inputs.method, whole, share, inputs.loss_fn)

    @property
    def device(self) -> torch.device:
        """Where this rank's pieces live (a ZeRO-3 parameter's partition, else the parameter)."""
        p = self.params[0]
        return p.ds_tensor.device if hasattr(p, "ds_id") else p.device

    @property
    def exact_products(self) -> bool:
        """Stages 1 and 2 keep whole parameters, which double backward needs; stage 3 does not."""
        return self.stage < 3

    @property
    def loss_scale(self) -> float:
        """DeepSpeed's fp16 loss scale (1 without fp16): the factor its gradient fragments carry."""
        return float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)

    # ------------------------------------------------------------------ gradients
    def _fragments(self) -> list[Tensor | None]:
        """Each parameter's owned gradient fragment (n elements, flat), or None where it owns none."""
        out: list[Tensor | None] = []
        for p, (_, n) in zip(self.params, self.ranges, strict=True):
            if n == 0:
                out.append(None)
            elif self.stage == 3:
                from deepspeed.utils import safe_get_local_grad

                out.append(safe_get_local_grad(p).reshape(-1)[:n])
            else:
                # view, not reshape: the noise must land in DeepSpeed's buffer, never in a silent copy
                mapping = _compat.get(p, _compat.DS_HP_MAPPING)
                out.append(mapping.get_lp_grad_fragment(_compat.get(p, _compat.DS_INDEX_IN_GROUP)).view(-1))
        return out

    def _write(self, p: Tensor, fragment: Tensor, n: int) -> None:
        """Stage 3 hands out copies: the changed owned elements go back through DeepSpeed's setter."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            whole = safe_get_local_grad(p).clone().reshape(-1)
            whole[:n] = fragment
            safe_set_local_grad(p, whole)

    def has_grads(self) -> bool:
        """True: the seam runs between DeepSpeed's backward and its step, where the fragments exist."""
        return True

    def grad_norm(self) -> float:
        """‖g‖ (unscaled, float64) over all ranks from the owned fragments; one host sync."""
        local = [f for f in self._fragments() if f is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        if local:
            squares = torch.stack(torch._foreach_norm(local)).double().pow(2).sum().to(self.device)
        return float(sum_over_ranks(squares).sqrt()) / self.loss_scale

    def scale_grads(self, factor: float) -> None:
        """g ← factor · g in every owned fragment (the clipping DeepSpeed would have done)."""
        for p, f, (_, n) in zip(self.params, self._fragments(), self.ranges, strict=True):
            if f is not None:
                f.mul_(factor)
                self._write(p, f, n)

    def add_to_grads(self, flat_P: Tensor) -> None:
        """g += ``flat_P`` (a (dim,) vector of this rank's pieces, in unscaled units; padding ignored)."""
        scale = self.loss_scale
        start = 0
        for p, f, (_, n) in zip(self.params, self._fragments(), self.ranges, strict=True):
            if f is not None:
                piece = flat_P[start : start + n].to(device=f.device, dtype=torch.float64) * scale
                f.add_(piece.to(f.dtype))
                self._write(p, f, n)
            start += n

    def add_combination_to_grads(self, vectors_PK: Tensor, coef_K: Tensor) -> None:
        """g += ``vectors_PK`` · ``coef_K`` on the owned fragments (vectors: this rank's pieces)."""
        self.add_to_grads(vectors_PK @ coef_K.to(device=vectors_PK.device, dtype=vectors_PK.dtype))

    def orient_(self, vectors_PK: Tensor) -> Tensor:
        """Flip each column so that its entries sum to a positive number (over all ranks); returns it.

        An eigenvector is defined up to its sign, which Lanczos takes from its random start, drawn in each
        layout's own coordinates (stage 3 splits the parameters differently from stages 1 and 2). ξ = V·coef
        changes with that sign, so without a rule the same eigenvectors would give another run.
        """
        sums_K = self.reduce(self.unpad(vectors_PK).double().sum(dim=0))
        vectors_PK.mul_(torch.where(sums_K < 0, -1.0, 1.0).to(vectors_PK))
        return vectors_PK

    # ------------------------------------------------------------------ conversions
    def full(self, v_P: Tensor) -> Tensor:
        """The (P,) vector whose pieces the ranks hold as ``v_P`` ((dim,) each): one all-reduce of P."""
        out = torch.zeros(self.full_dim, dtype=v_P.dtype, device=self.device)
        start = 0
        for offset, (first, n) in zip(self.offsets, self.ranges, strict=True):
            out[offset + first : offset + first + n] = v_P[start : start + n]
            start += n
        return sum_over_ranks(out).to(v_P.device)

    def local(self, full_P: Tensor) -> Tensor:
        """This rank's (dim,) piece of a (P,) vector (padded with zeros)."""
        pieces = [
            full_P[o + first : o + first + n] for o, (first, n) in zip(self.offsets, self.ranges, strict=True)
        ]
        return self.pad(torch.cat(pieces)) if pieces else full_P.new_zeros(self.dim)


def clip_zero_grads(space: ZeroSpace, max_norm: float) -> float:
    """DeepSpeed's ``gradient_clipping``, done by hf_levy so that the noise comes after it, as elsewhere.

    g ← g / max(1, (‖g‖ + 1e-6) / max_norm) (DeepSpeed's formula). Returns ‖g‖ before clipping; a
    non-finite norm (fp16 overflow: DeepSpeed skips the step) leaves g as it is.
    """
    norm = space.grad_norm()
    if max_norm > 0 and math.isfinite(norm):
        factor = (norm + 1e-6) / max_norm
        if factor > 1.0:
            space.scale_grads(1.0 / factor)
    return norm


def uses_deepspeed(optimizer: Any) -> bool:
    """Whether the Trainer's optimizer is (or wraps) one of DeepSpeed's (or Accelerate's DeepSpeed wrapper)."""
    while optimizer is not None:
        kind = type(optimizer)
        if kind.__module__.split(".")[0] == "deepspeed" or kind.__name__.startswith("DeepSpeed"):
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False


WRAPPED = "_hf_levy_before_step"  # the ZeRO optimizer attribute holding the current hook


def install_before_step(optimizer: Any, before_step: Callable[[float], float]) -> None:
    """Wrap ``optimizer.step`` (a DeepSpeed ZeRO optimizer) to call ``before_step(max_norm)`` first.

    ``max_norm`` is DeepSpeed's ``gradient_clipping`` (0: none), which the wrapper takes over for the
    call; ``before_step`` returns ‖g‖ before clipping. Installing again (a second ``train()``) only replaces
    the hook.
    """
    if hasattr(optimizer, WRAPPED):
        setattr(optimizer, WRAPPED, before_step)
        return
    setattr(optimizer, WRAPPED, before_step)
    original = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        # Off only for this call: DeepSpeed saves clip_grad in its checkpoints, which must keep the setting.
        max_norm = float(_compat.get(optimizer, _compat.DS_CLIP_GRAD) or 0.0)
        norm = getattr(optimizer, WRAPPED)(max_norm)
        _compat.set_existing(optimizer, _compat.DS_CLIP_GRAD, 0.0)
        try:
            result = original(*args, **kwargs)
        finally:
            _compat.set_existing(optimizer, _compat.DS_CLIP_GRAD, max_norm)
        if math.isfinite(norm) and not _compat.get(optimizer, _compat.DS_OVERFLOW, False):
            _compat.set_existing(optimizer, _compat.DS_GLOBAL_GRAD_NORM, norm)
        return result

    optimizer.step = step
