"""The trainable-parameter space: flat vectors over a fixed list of parameters.

A flat vector is a 1-D tensor over the parameters in the order given (``model.parameters()`` order
for :func:`trainable_parameters`). With replicated parameters (one process, DDP) it covers every
element, P = Σ numel(p). Under FSDP2 the parameters are ``DTensor`` shards and every vector is this
rank's piece: the local shards concatenated (P_local elements), so a global inner product is a local
dot followed by a sum over ranks (:meth:`ParameterSpace.reduce`). FSDP shards unevenly (the last
ranks may hold fewer rows), while Lanczos needs the same vector length on every rank, so
:class:`ParameterSpace` pads each rank's piece with zeros to ``dim`` = max over ranks of P_local.

Legend for shape suffixes: P parameters (flat length, or this rank's padded piece), K eigenpairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: ``requires_grad`` ones (PEFT adapters only, under LoRA), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def checked_trainable(params: Sequence[Tensor]) -> list[Tensor]:
    """``params`` as a list, after checking it is non-empty and every tensor requires grad.

    Raises:
        ValueError: naming the empty list or the index and shape of a tensor without ``requires_grad``.
    """
    params = list(params)
    if not params:
        raise ValueError(
            "params is empty: pass the trainable parameters (e.g. hf_levy.trainable_parameters(model))"
        )
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) does not require grad; pass trainable parameters only"
            )
    return params


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient shard)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local_view(t: Tensor) -> Tensor:
    """This rank's elements of ``t``: the local shard of a DTensor (sharing its storage), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def num_elements(params: Sequence[Tensor]) -> int:
    """Length of a flat vector over ``params`` on this rank (local shards under FSDP)."""
    return sum(local_view(p).numel() for p in params)


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate the local elements of ``tensors`` into one flat tensor (a copy), optionally cast."""
    return torch.cat([local_view(t).reshape(-1).to(dtype or local_view(t).dtype) for t in tensors])


def unflatten(flat_P: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat tensor into views shaped like the local elements of ``like`` (dtype of ``flat_P`` kept).

    Raises:
        ValueError: when the length of ``flat_P`` is not that of a flat vector over ``like``.
    """
    shapes = [local_view(t).shape for t in like]
    numels = [s.numel() for s in shapes]
    if flat_P.dim() != 1 or flat_P.numel() != sum(numels):
        raise ValueError(
            f"expected a flat vector of length {sum(numels)} (the number of elements of the "
            f"{len(numels)} parameters), got shape {tuple(flat_P.shape)}"
        )
    return [chunk.view(s) for chunk, s in zip(torch.split(flat_P, numels), shapes, strict=True)]


def sum_over_ranks(t: Tensor) -> Tensor:
    """All-reduce (sum) in place over the default process group; returns ``t``."""
    dist.all_reduce(t)
    return t


@dataclass(frozen=True)
class ProductInputs:
    """What a layout builds the sketch's product v_P ↦ (H v)_P from.

    ``local()`` builds this rank's v ↦ H v on its share of the sketch batch, over the parameters it holds
    (whole, or its FSDP piece); ``share()`` is that share (its examples over all ranks' examples). The rest
    serves layouts that compute the product themselves (ZeRO-3's central differences on each rank's piece).
    """

    local: Callable[[], Callable[[Tensor], Tensor]]
    share: Callable[[], float]
    model: nn.Module
    batch: Any
    method: str
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None


class ParameterSpace:
    """Flat, rank-padded vectors over ``params``, with the inner-product reduction they need.

    ``dim`` is the length Lanczos and the eigenvectors use on this rank; ``reduce`` turns local partial
    inner products into global ones (identity unless the parameters are sharded).
    """

    # What the run asks of a layout. Here: one process, DDP (replicated) or FSDP (sharded parameters).
    steps_inside_backward = False  # DeepSpeed's engine steps inside backward (see hf_levy._zero_space)

    def __init__(
        self, params: Sequence[Tensor], *, sharded: bool | None = None, local_numel: int | None = None
    ):
        """``sharded`` and ``local_numel`` (this rank's elements) default to what the parameters say."""
        self.params = list(params)
        self.sharded = any(is_sharded(p) for p in self.params) if sharded is None else sharded
        self.local_numel = num_elements(self.params) if local_numel is None else local_numel
        self.dim = self.local_numel
        if self.sharded:
            longest = torch.tensor(self.local_numel, dtype=torch.int64, device=self.device)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            self.dim = int(longest)

    @property
    def engine(self) -> str:
        """The engine's name, for messages."""
        return "FSDP" if self.sharded else "DDP"

    @property
    def exact_products(self) -> bool:
        """Whether double-backward products can run (not on FSDP's sharded parameters)."""
        return not self.sharded

    @property
    def weighs_rank_shares(self) -> bool:
        """Whether products weigh each rank's share of the sketch batch (FSDP's backward averages equally)."""
        return not self.sharded

    def sketch_matvec(self, inputs: ProductInputs) -> Callable[[Tensor], Tensor]:
        """v_P ↦ (H v)_P on the sketch batch as this layout needs it.

        FSDP: the product on this rank's padded piece (its gradient reduce-scatter already averages the
        ranks); one process: the product itself; DDP: the ranks' products weighted by their shares of the
        batch and summed (:meth:`rank_averaged`).
        """
        hvp = inputs.local()
        if self.sharded:
            return lambda v_P: self.pad(hvp(self.unpad(v_P)))
        if rank_and_world()[1] == 1:
            return hvp
        return self.rank_averaged(hvp, inputs.share())

    def rank_averaged(self, hvp: Callable[[Tensor], Tensor], weight: float) -> Callable[[Tensor], Tensor]:
        """The ranks' products on replicated parameters, each weighted by ``weight`` (its share), summed.

        One all-reduce per product, on the parameters' device.
        """
        return lambda v_P: sum_over_ranks(hvp(v_P.to(self.device)) * weight).to(v_P.device)

    def orient_(self, vectors_PK: Tensor) -> Tensor:
        """Fix each eigenvector's sign where the layout would otherwise change it; returns ``vectors_PK``.

        Here the sign follows Lanczos' random start, the same for every run of the same model and seed.
        """
        return vectors_PK

    @property
    def device(self) -> torch.device:
        """Where this rank's pieces live (and where collectives run)."""
        return local_view(self.params[0]).device

    def reduce(self, partial: Tensor) -> Tensor:
        """Global inner products from local ones: a sum over ranks when sharded, else the identity.

        The sum runs on the parameters' device (NCCL reduces only accelerator tensors), whatever device
        the partials were computed on (vectors may live in CPU memory).
        """
        if not self.sharded:
            return partial
        return sum_over_ranks(partial.to(self.device)).to(partial.device)

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``t`` with rank ``src``'s copy, sent through the parameters' device; returns ``t``."""
        sent = t.to(self.device)
        dist.broadcast(sent, src=src)
        return t.copy_(sent)

    def pad(self, flat: Tensor) -> Tensor:
        """A local flat vector (P_local,) padded with zeros to (dim,)."""
        if flat.numel() == self.dim:
            return flat
        return torch.cat([flat, flat.new_zeros(self.dim - flat.numel())])

    def unpad(self, flat_P: Tensor) -> Tensor:
        """The first P_local entries of a (dim,) vector: this rank's elements."""
        return flat_P[: self.local_numel]

    def has_grads(self) -> bool:
        """Whether any parameter has a ``.grad`` (none before the first backward, or after zero_grad)."""
        return any(p.grad is not None for p in self.params)

    def flat_grads(self) -> Tensor:
        """This rank's elements of ``.grad`` as one flat (P_local,) copy (zeros where a grad is missing)."""
        return flatten([torch.zeros_like(local_view(p)) if p.grad is None else p.grad for p in self.params])

    def grad_norm(self) -> float:
        """‖g‖ over all ranks' elements (float64), from the local pieces of ``.grad``; one host sync."""
        grads = [local_view(p.grad) for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        squares = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        return float(self.reduce(squares).sqrt())

    def add_combination_to_grads(self, vectors_PK: Tensor, coef_K: Tensor) -> None:
        """``g += vectors_PK · coef_K``, parameter by parameter, without forming the (P,) vector.

        Each parameter's rows of the (dim, K) vectors (padding ignored) are multiplied into its gradient in
        place (one ``addmv`` when the dtypes and layout allow): the step reads V once and the gradient once,
        where forming ξ first would also write and re-read P entries. A missing grad is created.
        """
        # coef copied once per (device, dtype): a host-to-device copy from pageable memory waits for the
        # stream, so one per parameter would serialize the kernel launches with the GPU.
        coefs: dict[tuple[torch.device, torch.dtype], Tensor] = {}

        def coef_on(t: Tensor) -> Tensor:
            key = (t.device, t.dtype)
            if key not in coefs:
                coefs[key] = coef_K.to(device=t.device, dtype=t.dtype)
            return coefs[key]

        start = 0
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = local_view(p.grad)
            rows_NK = vectors_PK[start : start + grad.numel()]
            start += grad.numel()
            if grad.is_contiguous() and rows_NK.dtype == grad.dtype and rows_NK.device == grad.device:
                grad.view(-1).addmv_(rows_NK, coef_on(grad))
            else:  # e.g. bf16 or CPU-offloaded vectors: the product in their dtype, added with type promotion
                piece = rows_NK @ coef_on(rows_NK)  # (the add reads it as is: no separate cast pass over it)
                grad.add_(piece.view(grad.shape).to(grad.device))

    def add_to_grads(self, flat_P: Tensor) -> None:
        """``p.grad += piece`` for each parameter, from a (dim,) vector (padding ignored; a missing grad is created)."""
        for p, piece in zip(self.params, unflatten(self.unpad(flat_P), self.params), strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = local_view(p.grad)
            grad.add_(piece.to(device=grad.device, dtype=grad.dtype))


def host_float(norm: Any) -> float | None:
    """A norm as a Python float (FSDP2's clipping gives a replicated DTensor); None stays None."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
