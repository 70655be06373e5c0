"""Hessian-vector products of a model's loss on one fixed batch.

H = ∇²_θ L(θ; batch) over the parameters θ = ``params`` (flattened in the order given, length P).

* ``autograd``: exact, Pearlmutter's double backward: g = ∇L built once with ``create_graph=True``,
  then H v = ∇(gᵀv), reusing the first-order graph for every product: a product then costs one
  backward through it instead of a forward and two backwards (docs/research/benchmarks.md gives the costs).
* ``finite_difference``: H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, two ordinary gradients, so it works
  wherever forward/backward works (fused attention kernels, FSDP). Truncation error O(ε²‖∇³L‖),
  rounding error O(u‖∇L‖/ε) with u the unit roundoff; the default step balances the two (see
  :func:`finite_difference_step`).

Both leave the model as they found it: its train/eval mode (of every submodule), ``.grad``, parameter
values (bit for bit) and the global RNG. Dropout is off during the products (eval mode). The flat
gradient ∇L itself, with the loss taken and the model left in the same way, is :func:`loss_gradient`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hf_levy.params import checked_trainable, flatten, is_sharded, local_view, sum_over_ranks, unflatten

HvpMethod = Literal["autograd", "finite_difference"]
LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


class DoubleBackwardError(RuntimeError):
    """The model's graph has no second derivative (fused attention, reentrant checkpointing, ...)."""


# Fragments of PyTorch errors raised when a graph cannot be differentiated twice, and what causes them.
_DOUBLE_BACKWARD_CAUSES = (
    ("not implemented", "an operation without a second derivative (fused SDPA/flash attention kernels)"),
    ("use_reentrant=True", "reentrant gradient checkpointing (use_reentrant=True)"),
    ("does not require grad", "a graph cut by reentrant gradient checkpointing or torch.no_grad"),
    ("not have been used in the graph", "a graph cut by reentrant gradient checkpointing"),
)


def make_hvp(
    model: nn.Module,
    batch: Mapping[str, Any],
    params: Sequence[Tensor],
    *,
    method: HvpMethod = "autograd",
    loss_fn: LossFn | None = None,
    fd_step: float | None = None,
    reuse_graph: bool = True,
) -> Callable[[Tensor], Tensor]:
    """Build v ↦ H v for the loss of ``model`` on ``batch`` w.r.t. ``params``.

    Args:
        model: the module; its loss is ``model(**batch).loss`` unless ``loss_fn(model, batch)`` is given.
        batch: a dict of tensors (moved to the device of the first parameter).
        params: the parameters to differentiate, all with ``requires_grad``; vectors are flat over them.
        method: ``"autograd"`` (exact double backward) or ``"finite_difference"``.
        loss_fn: optional ``(model, batch) -> scalar loss``.
        fd_step: finite-difference step ε for a unit vector; default :func:`finite_difference_step`.
        reuse_graph: autograd only: build the first-order graph once and keep it for every product
            (faster, holds the activations until the returned function is released).

    Returns:
        ``hvp(v_P) -> Hv_P``: ``v_P`` a 1-D tensor of length P = Σ numel(params); the result is on the
        device of ``v_P``, in the wider of its dtype and the parameters' (a float64 model answers in float64,
        so :func:`hf_levy.lanczos` works in float64 without being told). Parameters must not change while
        the function is in use.

    Raises:
        ValueError: bad ``method``, empty ``params``, a parameter without ``requires_grad``, or a model
            output with no ``.loss`` and no ``loss_fn``.
        DoubleBackwardError: (autograd) the graph has no second derivative; the message names the cause
            and suggests ``method="finite_difference"``.
    """
    if method not in ("autograd", "finite_difference"):
        raise ValueError(f"method must be 'autograd' or 'finite_difference', got {method!r}")
    params = checked_trainable(params)
    if fd_step is not None and not fd_step > 0:
        raise ValueError(f"fd_step must be > 0, got {fd_step}")
    closure = _LossClosure(model, batch, params, loss_fn)
    if method == "finite_difference":
        return _on_device(_finite_difference_hvp(closure, params, fd_step), closure.device)
    if any(is_sharded(p) for p in params):
        raise DoubleBackwardError(
            "double backward is not available on FSDP-sharded (DTensor) parameters: the forward uses "
            "all-gathered copies, so the shards are not in the graph. Use method='finite_difference'."
        )
    return _on_device(_autograd_hvp(closure, params, reuse_graph), closure.device)


def loss_gradient(
    model: nn.Module, batch: Mapping[str, Any], params: Sequence[Tensor], *, loss_fn: LossFn | None = None
) -> Tensor:
    """The flat (P,) gradient ∇L of the loss on ``batch`` w.r.t. ``params`` (dtype of the parameters).

    The loss is taken as in :func:`make_hvp` (``model(**batch).loss`` unless ``loss_fn(model, batch)``, in
    eval mode), with ``torch.autograd.grad``, so ``.grad``, the modes of all submodules and the global RNG
    are as before. Parameters the loss does not reach get zeros. FSDP2-sharded parameters: every rank calls
    this on its share of the batch and gets its piece (local shards) of the gradient of the mean loss over
    the ranks (a ``backward``, since FSDP reduces only there; ``.grad`` is restored).

    Raises:
        ValueError: empty ``params``, a parameter without ``requires_grad``, or no ``.loss``.
    """
    params = checked_trainable(params)
    closure = _LossClosure(model, batch, params, loss_fn)
    if any(is_sharded(p) for p in params):
        with closure.frozen_state(), torch.enable_grad():
            return _sharded_gradient(closure, params)
    with closure.frozen_state(), torch.enable_grad():
        grads = torch.autograd.grad(closure(), params, allow_unused=True)
    return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)])


def _on_device(hvp: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    """Accept v on any device (e.g. vectors kept in CPU memory) and return H v beside it."""

    def moved(v_P: Tensor) -> Tensor:
        return hvp(v_P.to(device)).to(v_P.device) if v_P.device != device else hvp(v_P)

    return moved


def finite_difference_step(params: Sequence[Tensor], dtype: torch.dtype | None = None) -> float:
    """Default central-difference step ε for a unit vector: ε = u^(1/3) · (1 + ‖θ‖) / √P.

    u is the unit roundoff of ``dtype`` (default: the parameters'); u^(1/3) is the classical balance of the
    O(ε²) truncation and O(u/ε) rounding errors of a central difference for O(1) quantities, and
    (1 + ‖θ‖)/√P ≈ 1 + RMS(θ) scales it to the parameters' typical size. It is an empirical compromise
    (docs/research/benchmarks.md): in float32 the product is within 1e-3 along top eigenvectors, where the
    sketch's Krylov vectors go, but only within 1e-2 to 8e-2 along random directions at P ≈ 1M; Lanczos
    eigenvalues on it were within 2e-4. For a vector of norm r the step is ε / r. ‖θ‖ and P are global
    (summed over ranks) for sharded parameters. Products need float32 (or float64) arithmetic: bf16 weights
    cannot hold θ ± εv, and bf16 autocast leaves errors of 37-59% along the top eigenvector at any step.
    """
    with torch.no_grad():
        local = [local_view(p).detach() for p in params]
        totals = torch.tensor(
            [sum(float(t.double().pow(2).sum()) for t in local), sum(t.numel() for t in local)]
        )
    if any(is_sharded(p) for p in params):
        totals = sum_over_ranks(totals.to(local[0].device)).cpu()
    return step_for(dtype or params[0].dtype, float(totals[0]), int(totals[1]))


def step_for(dtype: torch.dtype, theta_square_norm: float, count: int) -> float:
    """ε = u^(1/3) · (1 + ‖θ‖) / √P from ‖θ‖² and P (see :func:`finite_difference_step`)."""
    u = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps / 2
    return u ** (1 / 3) * (1.0 + theta_square_norm**0.5) / count**0.5


class _LossClosure:
    """loss() on the fixed batch (moved to the parameters' device).

    Dropout is off while it runs; the model's modes and the global RNG are restored after.
    """

    def __init__(
        self, model: nn.Module, batch: Mapping[str, Any], params: list[Tensor], loss_fn: LossFn | None
    ):
        self.device = local_view(params[0]).device
        self.model, self.loss_fn = model, loss_fn
        self.batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        self.rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []

    @contextlib.contextmanager
    def frozen_state(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            with torch.random.fork_rng(devices=self.rng_devices):
                self.model.eval()
                yield
        finally:
            for module, training in modes:
                module.training = training

    def __call__(self) -> Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(self.model, self.batch)
        else:
            output = self.model(**self.batch)
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
            if loss is None:
                raise ValueError(
                    "model(**batch) returned no .loss: put the labels in the batch (e.g. batch['labels']) "
                    "or pass loss_fn=lambda model, batch: ..."
                )
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        return loss


def _grad(outputs: Sequence[Tensor], params: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """torch.autograd.grad with unused parameters given zero gradients and double-backward errors explained."""
    try:
        grads = torch.autograd.grad(outputs, params, allow_unused=True, **kwargs)
    except RuntimeError as err:
        raise _explain(err) from err
    if all(g is None for g in grads):
        raise DoubleBackwardError(
            "the loss does not depend on any of the given params (a graph cut by reentrant gradient "
            "checkpointing or torch.no_grad?); check `params`, or use method='finite_difference'"
        )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _explain(err: RuntimeError) -> RuntimeError:
    for fragment, cause in _DOUBLE_BACKWARD_CAUSES:
        if fragment in str(err):
            return DoubleBackwardError(
                f"double backward is not available for this model: {cause}. Use "
                f"method='finite_difference' (or hvp_method='auto' in LevyConfig), or switch the model to "
                f"model.set_attn_implementation('eager') / non-reentrant checkpointing. PyTorch said: {err}"
            )
    return err


def _autograd_hvp(
    closure: _LossClosure, params: list[Tensor], reuse_graph: bool
) -> Callable[[Tensor], Tensor]:
    def first_order_graph() -> list[Tensor]:
        with closure.frozen_state():
            return _grad([closure()], params, create_graph=True)

    cached = first_order_graph() if reuse_graph else None

    def hvp(v_P: Tensor) -> Tensor:
        grads = cached if cached is not None else first_order_graph()
        # Gradients that do not depend on θ (loss linear in that parameter) have zero Hessian rows.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        vs = unflatten(v_P, params)
        out = [torch.zeros_like(p) for p in params]
        if live:
            with closure.frozen_state():
                hvs = _grad(
                    [grads[i] for i in live],
                    params,
                    grad_outputs=[vs[i].to(grads[i].dtype) for i in live],
                    retain_graph=reuse_graph,
                )
            out = hvs
        return flatten(out, dtype=torch.promote_types(v_P.dtype, params[0].dtype)).to(v_P.device)

    return hvp


def _finite_difference_hvp(
    closure: _LossClosure, params: list[Tensor], fd_step: float | None
) -> Callable[[Tensor], Tensor]:
    step = fd_step if fd_step is not None else finite_difference_step(params)
    work_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    warn_if_low_precision(params)
    sharded = any(is_sharded(p) for p in params)
    gradient = _sharded_gradient if sharded else (lambda c, ps: flatten(_grad([c()], ps)))
    # Writing through .data keeps autograd's version counters untouched: the values are restored bit for
    # bit afterwards, so graphs built on these parameters elsewhere stay valid. Under FSDP2 the local
    # shard is what the next forward all-gathers.
    shards = [local_view(p.data) for p in params]

    def gradient_at(shift: list[Tensor], sign: float, saved: list[Tensor]) -> Tensor:
        with torch.no_grad():
            for shard, s, d in zip(shards, saved, shift, strict=True):
                shard.copy_(s + sign * d)
        with closure.frozen_state():
            return gradient(closure, params).to(work_dtype)

    def hvp(v_P: Tensor) -> Tensor:
        norm_sq = v_P.double().pow(2).sum()
        norm = float(sum_over_ranks(norm_sq) if sharded else norm_sq) ** 0.5
        if norm == 0.0:
            return torch.zeros_like(v_P, dtype=torch.promote_types(v_P.dtype, params[0].dtype))
        eps = step / norm
        shift = [
            d.to(s.dtype) for d, s in zip(unflatten(v_P.to(work_dtype) * eps, params), shards, strict=True)
        ]
        saved = [s.detach().clone() for s in shards]
        try:
            g_plus = gradient_at(shift, 1.0, saved)
            g_minus = gradient_at(shift, -1.0, saved)
        finally:
            with torch.no_grad():
                for shard, s in zip(shards, saved, strict=True):
                    shard.copy_(s)
        out_dtype = torch.promote_types(v_P.dtype, params[0].dtype)
        # In place on g_plus (a fresh tensor): one P-sized temporary fewer, bitwise the same quotient.
        return g_plus.sub_(g_minus).div_(2 * eps).to(dtype=out_dtype, device=v_P.device)

    return hvp


def warn_if_low_precision(params: Sequence[Tensor]) -> None:
    """Finite differences need weights that can hold θ ± εv: warn for bf16/fp16 ones."""
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if low:
        warnings.warn(
            f"finite-difference Hessian-vector products on {', '.join(low)} parameters are inaccurate (the weights "
            "cannot hold θ ± εv; relative errors of 0.1 to 10 were measured): keep float32 weights (Trainer's "
            "bf16=True does) or use method='autograd'",
            stacklevel=4,
        )


def _sharded_gradient(closure: _LossClosure, params: list[Tensor]) -> Tensor:
    """This rank's piece of ∇L for FSDP2 parameters, by ``loss.backward()``.

    FSDP2's reduce-scatter averages the ranks' gradients, so with equal shares of the batch this is the
    piece of the gradient of the mean loss. ``.grad`` is saved and put back: the caller's is untouched.
    """
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        closure().backward()
        return flatten([torch.zeros_like(local_view(p)) if p.grad is None else p.grad for p in params])
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
