"""Top eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

Shape suffixes: P = dim (the parameters, or this rank's shard of them), K = eigenpairs,
M = Lanczos iterations (basis size), B = columns of a warm-start block, X = any count of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_levy._krylov_basis import KrylovBasis, local_inner

__all__ = ["Eigenpairs", "lanczos"]

# Block warm start: unit combination of the block's columns + this weight x a unit random vector. The random
# part finds a top eigenvector the block lacks, which no breakdown would reveal: 0.03 is 3x the smallest weight
# that always found it, for at most one more product (docs/research/benchmarks.md, "Constants").
_WARM_START_RANDOM_WEIGHT = 0.03
# Offdiag below eps(dtype)**this x the running ||H|| estimate is rounding error (float32: 2.4e-5, above the
# ~1e-6 noise of CGS2 and of float32 HVPs; float64: 3.7e-11): the Krylov space is invariant.
_BREAKDOWN_EPS_POWER = 2.0 / 3.0


@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs of the K largest algebraic eigenvalues.

    values: (K,) float64 on CPU, descending. vectors: (P, K) in the working dtype and device, orthonormal
    columns, column i pairs with values[i]. residuals: (K,) float64 on CPU, the bound on
    ||H v_i - values[i] v_i||. num_matvecs: products used. converged: every pair met the tolerance.
    residual_floor: √eps·‖H‖ (‖H‖ the solver's running estimate): tolerances are relative to
    max(|values[i]|, residual_floor), so an eigenvalue near 0 is judged on the scale of the operator.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool
    residual_floor: float = 0.0

    @property
    def relative_residuals(self) -> Tensor:
        """residuals / max(|values|, residual_floor), as convergence is judged ((K,) float64)."""
        return self.residuals / self.values.abs().clamp(min=max(self.residual_floor, 1e-300))


def _top_ritz(diag: list[float], offdiag: list[float], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k eigenpairs of the tridiagonal (diag, offdiag[:-1]) and their residual bounds offdiag[-1]*|s_m,i|."""
    sub = torch.tensor(offdiag[:-1], dtype=torch.float64)
    tri_MM = torch.diag(torch.tensor(diag, dtype=torch.float64)) + torch.diag(sub, 1) + torch.diag(sub, -1)
    evals_M, evecs_MM = torch.linalg.eigh(tri_MM)
    values_K, ritz_MK = evals_M.flip(0)[:k], evecs_MM.flip(1)[:, :k]
    return values_K, offdiag[-1] * ritz_MK[-1].abs(), ritz_MK


def _first_product(matvec: Callable[[Tensor], Tensor], q_P: Tensor) -> tuple[Tensor, Tensor]:
    """(q, matvec(q)) for a float32 start vector when no dtype was given, or both in float64.

    Float64 when the matvec rejects float32 input (``H @ v`` with a float64 H raises a dtype mismatch) or
    answers in float64.
    """
    try:
        w_P = matvec(q_P)
    except RuntimeError as err:
        if "dtype" not in str(err).lower() and "double" not in str(err).lower():
            raise
        q64_P = q_P.double()
        return q64_P, matvec(q64_P)
    if w_P.dtype == torch.float64 and q_P.dtype != torch.float64:
        return q_P.double(), w_P
    return q_P, w_P


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_eigenpairs: int,
    *,
    num_iters: int | None = None,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Eigenpairs:
    """The ``num_eigenpairs`` largest algebraic eigenvalues of a symmetric operator, with eigenvectors.

    Lanczos builds an orthonormal basis Q of the Krylov space {q, Hq, H^2q, ...} in which Q^T H Q is
    tridiagonal (``diag``, ``offdiag``); its eigenpairs (theta, s) give the Ritz pairs (theta, Q s). Each new
    vector is reorthogonalized against the whole basis (classical Gram-Schmidt, twice) since in floating point
    the three-term recurrence loses orthogonality exactly as Ritz pairs converge (Paige 1971). The residual
    ||H Q s - theta Q s|| equals offdiag_m |s_m| (Parlett, "The Symmetric Eigenvalue Problem", 1980, ch. 13),
    so the run stops once every top-K pair has offdiag_m |s_m,i| <= tol * max(|theta_i|, sqrt(eps) ||H||)
    (relative residual as in ARPACK; ||H|| is a running estimate, and the floor keeps near-zero eigenvalues
    from demanding accuracy below the rounding level of the working dtype). The eigenvalue error is then about
    residual^2 / gap, far below tol.

    When offdiag falls to rounding level the Krylov space is invariant (breakdown): its Ritz pairs are exact,
    but the start vector may have lacked a top eigenvector, or a further copy of a repeated eigenvalue. The run
    then goes on from a random vector orthogonal to the basis (offdiag recorded as 0) and stops only once that
    new block's largest Ritz value is certified too, or, if the new block breaks down as well, is not above the
    K-th value. Without a breakdown, single-vector Lanczos (like ARPACK) resolves repeated eigenvalues only
    through rounding errors, i.e. may return one copy.

    Args:
        matvec: maps a (P,) tensor to H times it, a (P,) tensor. H must be symmetric.
        dim: P, the vector length (under sharding: this rank's shard length, equal on every rank).
        num_eigenpairs: K, with 1 <= K <= dim.
        num_iters: cap on products and basis rows (rows are allocated as used, see hf_levy._krylov_basis);
            default min(dim, 4K + 40), about 1.6x to 4x what a tolerance of 1e-3 needed on LLM Hessians
            (10 / 29 / 44 / 62 products for K = 1 / 4 / 8 / 16).
            Larger values are capped at dim. If the cap ends the run first, the best pairs come back with
            converged=False.
        tol: relative residual tolerance, > 0.
        init: warm start. A (P,) vector is used as the start vector as is. A (P, B) block (e.g. the previous
            eigenvectors) starts from the sum of its unit-normalized columns, plus 0.03 x a random unit vector
            so directions missing from the block can still be found.
        generator: the only source of randomness (cold start, block mixing, breakdown restarts); default a
            fresh CPU generator seeded with 0. The global RNG is never used.
        dtype: working dtype of the vectors; default that of ``init``, else float32, or float64 when the
            matvec works in float64 (it returns float64, or rejects a float32 vector with a dtype error, e.g.
            ``lambda v: H @ v`` with a float64 H).
        device: working device of the vectors; default that of ``init``, else CPU.
        reduce: applied to every local inner-product tensor (float64) before use, e.g.
            ``lambda t: dist.all_reduce(t) or t`` for vectors sharded across ranks; norms go through it too.
            Nothing else communicates. Default: identity.

    Returns:
        Eigenpairs: values (K,) float64 CPU descending; vectors (P, K) dtype/device, orthonormal; residuals
        (K,) float64 CPU; num_matvecs; converged.

    Raises:
        ValueError: bad num_eigenpairs, num_iters, tol, dtype, init, or a matvec output of the wrong shape.
        FloatingPointError: the matvec returned a non-finite value (the message names the iteration).
    """
    k = num_eigenpairs
    if k < 1:
        raise ValueError(f"num_eigenpairs must be >= 1, got {k}; ask for at least one eigenpair.")
    if k > dim:
        raise ValueError(f"num_eigenpairs={k} exceeds dim={dim}; ask for at most dim eigenpairs.")
    if num_iters is not None and num_iters < k:
        raise ValueError(f"num_iters={num_iters} < num_eigenpairs={k}; use num_iters >= num_eigenpairs.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}; use a relative residual tolerance such as 1e-3.")
    if init is not None:
        if init.ndim not in (1, 2) or init.shape[0] != dim:
            raise ValueError(f"init must have shape ({dim},) or ({dim}, B), got {tuple(init.shape)}.")
        if not torch.isfinite(init).all():
            raise ValueError("init has non-finite entries; pass finite vectors (or None for a random start).")
        dtype = dtype or init.dtype
        device = device or init.device
    dtype_from_matvec = dtype is None  # float32 unless the first product shows the matvec works in float64
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}; use torch.float32 or float64.")
    m_max = min(dim, 4 * k + 40 if num_iters is None else num_iters)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    reduce = reduce if reduce is not None else (lambda t: t)

    def inner(a_XP: Tensor, b_YP: Tensor) -> Tensor:
        return reduce(local_inner(a_XP, b_YP))

    def norm(v_P: Tensor) -> float:
        return math.sqrt(max(inner(v_P[None], v_P[None]).item(), 0.0))

    def orthogonalize(w_P: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        # Classical Gram-Schmidt twice ("twice is enough") against the first `rows` basis vectors: two BLAS-2
        # passes, two reductions.
        coeffs_X = reduce(basis.local_inner(rows, w_P))
        w_P = basis.minus_combination(w_P, coeffs_X)
        again_X = reduce(basis.local_inner(rows, w_P))
        return basis.minus_combination(w_P, again_X), coeffs_X + again_X

    def randn() -> Tensor:
        return torch.randn(dim, generator=generator, device=generator.device, dtype=dtype).to(device)

    if init is None:
        start_P = randn()
    elif init.ndim == 1:
        start_P = init.to(device, dtype)
    else:
        block_PB = init.to(device, dtype)
        col_norms_B = inner(block_PB.T, block_PB.T).diagonal().sqrt()
        if not (col_norms_B > 0).all():
            raise ValueError("init has a zero column; drop it or pass None for a random start.")
        start_P = block_PB @ (1.0 / col_norms_B).to(dtype)
        start_P = start_P / max(norm(start_P), torch.finfo(torch.float64).tiny)
        noise_P = randn()
        start_P = start_P + _WARM_START_RANDOM_WEIGHT / norm(noise_P) * noise_P
    start_norm = norm(start_P)
    if start_norm == 0:
        raise ValueError("init is the zero vector; pass a nonzero start vector (or None for a random start).")

    basis = KrylovBasis(m_max, dim, dtype, device)
    q_P = start_P / start_norm
    diag: list[float] = []
    offdiag: list[float] = []
    scale = 0.0  # running estimate of ||H||: max_j |diag_j| + offdiag_{j-1}
    eps = torch.finfo(dtype).eps
    block_start = 0  # first row of the current Krylov block (> 0 after a breakdown restart)

    def certified(values_X: Tensor, residuals_X: Tensor) -> bool:
        return bool((residuals_X <= tol * values_X.abs().clamp(min=math.sqrt(eps) * scale)).all())

    for j in range(m_max):
        if j == 0 and dtype_from_matvec:
            q_P, w_P = _first_product(matvec, q_P)
            if q_P.dtype != dtype:  # a float64 operator (e.g. an explicit float64 Hessian): work in float64
                dtype, eps = q_P.dtype, torch.finfo(q_P.dtype).eps
                basis = KrylovBasis(m_max, dim, dtype, device)
                # The float32 start was unit to float32 rounding only; H is linear, so rescale q and Hq alike.
                unit = norm(q_P)
                q_P, w_P = q_P / unit, w_P / unit
            basis[0] = q_P
        else:
            basis[j] = q_P
            w_P = matvec(q_P)
        if w_P.shape != (dim,):
            raise ValueError(f"matvec must return shape ({dim},), got {tuple(w_P.shape)} at iteration {j}.")
        w_P, coeffs_X = orthogonalize(w_P.to(device, dtype), j + 1)
        diag_j, offdiag_j = coeffs_X[j].item(), norm(w_P)
        # Checked on reduced scalars, so every rank raises together; any inf/NaN in w reaches both.
        if not (math.isfinite(diag_j) and math.isfinite(offdiag_j)):
            raise FloatingPointError(f"matvec returned a non-finite value at Lanczos iteration {j}.")
        scale = max(scale, abs(diag_j) + (offdiag[-1] if offdiag else 0.0))
        breakdown = offdiag_j <= eps**_BREAKDOWN_EPS_POWER * scale
        diag.append(diag_j)
        offdiag.append(0.0 if breakdown else offdiag_j)
        if j + 1 >= k:
            values_K, residuals_K, ritz_MK = _top_ritz(diag, offdiag, k)
            converged = certified(values_K, residuals_K)
            if block_start == 0:
                stop = converged and not breakdown
            else:
                # After a breakdown the pairs are exact but may miss an eigenvalue the start vector lacked, or a
                # further copy of a repeated one. The block grown from a random vector orthogonal to them looks
                # for it: stop once its largest Ritz value is certified, or, if the block is complete
                # (breakdown again), once that value is not above the K-th (else look again).
                top_1, residual_1, _ = _top_ritz(diag[block_start:], offdiag[block_start:], 1)
                if breakdown:
                    margin = tol * max(abs(values_K[-1].item()), math.sqrt(eps) * scale)
                    stop = converged and top_1.item() <= values_K[-1].item() + margin
                else:
                    stop = converged and certified(top_1, residual_1)
            if stop or j + 1 == m_max:
                break
        if breakdown:
            block_start = j + 1
            w_P, _ = orthogonalize(randn(), j + 1)
            offdiag_j = norm(w_P)
        q_P = w_P / offdiag_j

    # Stored as K contiguous rows and returned as their (P, K) transpose view: the noise V·c then runs as
    # one efficient pass over P (a row-major (P, K) layout makes it a skinny product of K-long dots).
    vectors_PK = basis.combine(ritz_MK.to(device)).T
    return Eigenpairs(values_K, vectors_PK, residuals_K, len(diag), converged, math.sqrt(eps) * scale)
