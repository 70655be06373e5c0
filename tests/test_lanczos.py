"""lanczos against eigenpairs computed a second way: known spectra, torch.linalg.eigh, scipy's ARPACK."""

from __future__ import annotations

import functools
import importlib
import threading

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, hessian

from hf_levy._krylov_basis import KrylovBasis
from hf_levy.lanczos import Eigenpairs, lanczos

F64 = torch.float64


@pytest.fixture(params=[None, 3], ids=["one-block", "blocks-of-3"])
def block_rows(request, monkeypatch):
    """lanczos with the CPU's basis (one block) and with an accelerator's (rows allocated in small blocks)."""
    if request.param is not None:
        blocked = functools.partial(KrylovBasis, block_rows=request.param)
        # the module, not the function hf_levy re-exports under the same name
        monkeypatch.setattr(importlib.import_module("hf_levy.lanczos"), "KrylovBasis", blocked)
    return request.param


def rotated(spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(spectrum) Q^T with a seeded random orthogonal Q, float64, exactly symmetric."""
    n = spectrum.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    a = (q * spectrum.to(F64)) @ q.T
    return (a + a.T) / 2


def top_eigh(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(a)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want) / want.abs()).abs().max().item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_returns_largest_algebraic_eigenvalues_not_largest_magnitude():
    # -50 and -40 outweigh every positive eigenvalue in magnitude, yet are not among the top 5.
    planted = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, -50.0, -40.0], dtype=F64)
    spectrum = torch.cat([planted, torch.linspace(-5.0, 5.0, 193, dtype=F64)])
    pairs = lanczos(lambda v: spectrum * v, 200, 5, tol=1e-8, dtype=F64, generator=seeded(0))

    assert isinstance(pairs, Eigenpairs) and pairs.converged
    assert pairs.values.dtype == F64 and pairs.vectors.shape == (200, 5) and pairs.vectors.dtype == F64
    torch.testing.assert_close(pairs.values, planted[:5], rtol=1e-6, atol=0)
    alignment = pairs.vectors[torch.arange(5), torch.arange(5)].abs()  # |<v_i, e_i>|
    assert (alignment > 1 - 1e-6).all(), f"alignment with unit vectors {alignment}"


MATRICES = {
    # Indefinite: a bulk with negative eigenvalues larger in magnitude than the 6th largest.
    "indefinite": torch.cat([torch.tensor([12.0, 10.0, 9.0, 8.0, 7.5, 7.0]), torch.linspace(-9.0, 6.0, 294)]),
    "spd": torch.cat([torch.tensor([30.0, 20.0, 15.0, 12.0, 10.0, 9.0]), torch.logspace(-3.0, 0.8, 294)]),
}
# dtype -> (tol, eigenvalue rtol, 1 - alignment, orthonormality)
PRECISION = {F64: (1e-8, 1e-10, 1e-8, 1e-10), torch.float32: (1e-4, 1e-5, 1e-4, 1e-5)}


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(MATRICES))
def test_matches_eigh_on_dense_symmetric_matrices(kind, dtype, block_rows):
    a = rotated(MATRICES[kind])
    want_values, want_vectors = top_eigh(a, 6)
    tol, value_rtol, align_tol, orth_tol = PRECISION[dtype]
    pairs = lanczos(
        lambda v: a.to(dtype) @ v, 300, 6, tol=tol, num_iters=120, dtype=dtype, generator=seeded(1)
    )

    assert pairs.converged and pairs.vectors.dtype == dtype
    assert max_rel_error(pairs.values, want_values) < value_rtol
    vectors = pairs.vectors.double()
    alignment = (vectors * want_vectors).sum(0).abs()
    assert (alignment > 1 - align_tol).all(), f"alignment {alignment}"
    gram_error = (vectors.T @ vectors - torch.eye(6, dtype=F64)).abs().max().item()
    assert gram_error < orth_tol, f"V^T V - I = {gram_error:.1e}"


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_reported_residuals_bound_the_actual_residuals(dtype, block_rows):
    a = rotated(MATRICES["indefinite"])
    pairs = lanczos(lambda v: a.to(dtype) @ v, 300, 6, tol=1e-3, dtype=dtype, generator=seeded(2))
    vectors = pairs.vectors.double()
    actual = (a @ vectors - vectors * pairs.values).norm(dim=0)
    rounding = (
        10 * torch.finfo(dtype).eps * torch.linalg.matrix_norm(a, ord=2)
    )  # what the dtype cannot resolve
    assert (actual <= 1.01 * pairs.residuals + rounding).all(), f"actual {actual} vs bound {pairs.residuals}"
    assert (pairs.residuals <= 1e-3 * pairs.values.abs()).all()


def test_float32_vectors_of_a_million_entries_keep_ritz_values_accurate():
    # Float32 dot products over 2^20 entries are off by ~1e-5 relative; float64 accumulation gives ~1e-7.
    spectrum = torch.rand(1 << 20, generator=seeded(0), dtype=F64) * 2 - 1
    spectrum[:4] = torch.tensor([4.0, 3.5, 3.0, 2.8], dtype=F64)
    spectrum32 = spectrum.float()
    want = spectrum32.double()[:4]
    pairs = lanczos(lambda v: spectrum32 * v, 1 << 20, 4, tol=1e-5, generator=seeded(1))
    assert pairs.converged
    assert max_rel_error(pairs.values, want) < 1e-6


def test_uses_no_more_products_than_scipy_eigsh():
    n, k, tol = 2000, 8, 1e-3
    ranks = torch.arange(1, n // 2 + 1, dtype=F64)
    spectrum = torch.cat([100.0 / ranks, -30.0 / ranks])  # decaying, indefinite
    a = rotated(spectrum, seed=3)
    want, _ = top_eigh(a, k)
    a_np = a.numpy()
    arpack_products = []

    def counted_matvec(x):
        arpack_products.append(1)
        return a_np @ x

    v0 = np.random.default_rng(0).standard_normal(n)
    operator = LinearOperator((n, n), matvec=counted_matvec, dtype=np.float64)
    arpack_values = np.sort(eigsh(operator, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False))[::-1]
    pairs = lanczos(lambda v: a @ v, n, k, tol=tol, dtype=F64, generator=seeded(0))

    assert max_rel_error(torch.from_numpy(arpack_values.copy()), want) < 1e-3  # the reference did its job
    assert pairs.converged and max_rel_error(pairs.values, want) < 1e-3
    assert pairs.num_matvecs <= len(arpack_products), (
        f"lanczos {pairs.num_matvecs} vs eigsh {len(arpack_products)}"
    )


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def mlp_hessian_problem():
    """A 10-16-3 tanh MLP (227 parameters), float64: its loss as a function of flat parameters, and the point."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    x, y = torch.randn(40, 10, dtype=F64), torch.randint(0, 3, (40,))
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]

    def loss(flat):
        chunks = [c.view(s) for c, s in zip(torch.split(flat, numels), shapes, strict=True)]
        logits = functional_call(model, dict(zip(names, chunks, strict=True)), (x,))
        return nn.functional.cross_entropy(logits, y)

    return loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("product", ["dense", "double_backward"])
def test_top_eigenvalues_of_a_tiny_mlp_hessian_match_eigh(product):
    loss, flat = mlp_hessian_problem()
    dense = hessian(loss)(flat)
    want, _ = top_eigh(dense, 5)
    if product == "dense":
        matvec = lambda v: dense @ v  # noqa: E731
    else:
        point = flat.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(point), point, create_graph=True)

        def matvec(v):
            (hv,) = torch.autograd.grad(grad, point, grad_outputs=v, retain_graph=True)
            return hv.detach()

    pairs = lanczos(matvec, flat.numel(), 5, tol=1e-8, dtype=F64, generator=seeded(0))
    assert pairs.converged
    assert max_rel_error(pairs.values, want) < 1e-8, f"{pairs.values} vs {want}"


def diagonal_spectrum(n: int) -> torch.Tensor:
    return torch.cat(
        [torch.tensor([20.0, 15.0, 12.0, 10.0, 9.0, 8.5, 8.0], dtype=F64), torch.linspace(-6, 6, n - 7)]
    )


def test_warm_start_from_perturbed_eigenvectors_needs_fewer_products():
    n, k = 20_000, 4
    spectrum = diagonal_spectrum(n)
    noise = torch.randn(n, k, dtype=F64, generator=seeded(10))
    previous = torch.eye(n, k, dtype=F64) + 0.1 * noise / noise.norm(dim=0)  # 10% off the true eigenvectors
    cold = lanczos(lambda v: spectrum * v, n, k, dtype=F64, generator=seeded(0))
    warm = lanczos(lambda v: spectrum * v, n, k, init=previous, generator=seeded(0))

    assert cold.converged and warm.converged
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-5, atol=0)
    assert warm.num_matvecs <= 0.6 * cold.num_matvecs, f"warm {warm.num_matvecs} vs cold {cold.num_matvecs}"


def test_warm_start_block_missing_the_top_eigenvector_still_finds_it():
    # The block spans exactly eigenvectors 2..K+1, an invariant subspace; its random admixture finds e_1.
    n, k = 20_000, 4
    spectrum = diagonal_spectrum(n)
    stale = torch.eye(n, k + 1, dtype=F64)[:, 1:]
    pairs = lanczos(lambda v: spectrum * v, n, k, init=stale, generator=seeded(0))
    assert pairs.converged
    torch.testing.assert_close(pairs.values, spectrum[:k], rtol=1e-4, atol=0)  # missing e_1: 25% off


THREE_VALUES = torch.tensor([3.0, 1.0, -2.0], dtype=F64).repeat(10)  # each eigenvalue 10 times


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    ("start", "k", "want"),
    [
        (None, 2, [3.0, 3.0]),
        (0, 2, [3.0, 3.0]),
        (2, 1, [3.0]),
        (1, 4, [3.0] * 4),
        (2, 12, [3.0] * 10 + [1.0] * 2),
    ],
    ids=["random-start", "start-top-eigenvector", "start-bottom-eigenvector", "k4", "k12"],
)
def test_invariant_subspaces_restart_and_find_repeated_eigenvalues(start, k, want, dtype, block_rows):
    init = None if start is None else torch.eye(30, dtype=dtype)[start]
    pairs = lanczos(
        lambda v: THREE_VALUES.to(v.dtype) * v, 30, k, init=init, dtype=dtype, generator=seeded(0)
    )
    assert torch.isfinite(pairs.vectors).all() and torch.isfinite(pairs.values).all()
    assert pairs.converged
    torch.testing.assert_close(pairs.values, torch.tensor(want, dtype=F64), rtol=1e-6, atol=1e-6)
    vectors = pairs.vectors.double()
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(THREE_VALUES[:, None] * vectors, vectors * pairs.values, rtol=0, atol=1e-6)


def test_zero_operator_gives_zero_eigenvalues_without_nan():
    pairs = lanczos(torch.zeros_like, 10, 3, dtype=F64)
    assert pairs.converged and torch.equal(pairs.values, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(pairs.vectors.T @ pairs.vectors, torch.eye(3, dtype=F64))


def test_budget_exhausted_returns_unconverged_pairs_and_their_residuals(block_rows):
    a = rotated(MATRICES["indefinite"])
    pairs = lanczos(lambda v: a @ v, 300, 6, num_iters=8, dtype=F64, generator=seeded(0))
    assert not pairs.converged and pairs.num_matvecs == 8
    assert torch.isfinite(pairs.values).all() and (pairs.residuals > 0).all()


def test_num_iters_beyond_dim_is_capped_at_dim():
    spectrum = torch.linspace(-1.0, 1.0, 12, dtype=F64)
    pairs = lanczos(lambda v: spectrum * v, 12, 3, num_iters=100, dtype=F64, generator=seeded(0))
    assert pairs.num_matvecs <= 12 and pairs.converged
    torch.testing.assert_close(pairs.values, spectrum.flip(0)[:3])


class TwoRanks:
    """Two threads standing in for two ranks: all_gather through shared slots and a barrier."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list[torch.Tensor | None] = [None, None]

    def all_gather(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before both have read it
        return gathered


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "block-warm-start"])
def test_vectors_sharded_over_two_ranks_match_the_single_process_eigenpairs(warm, block_rows):
    # Each rank holds half of every vector; reduce sums the local inner products, as all_reduce would.
    n, k = 200, 4
    a = rotated(MATRICES["indefinite"][:n])
    want_values, want_vectors = top_eigh(a, k)
    block = want_vectors + 0.1 * torch.randn(n, k, dtype=F64, generator=seeded(5))
    ranks, results, errors = TwoRanks(), [None, None], []

    def run(rank):
        rows = slice(rank * n // 2, (rank + 1) * n // 2)
        try:
            results[rank] = lanczos(
                lambda v: a[rows] @ torch.cat(ranks.all_gather(rank, v)),
                n // 2,
                k,
                tol=1e-8,
                init=block[rows] if warm else None,
                dtype=F64,
                generator=seeded(0),
                reduce=lambda t: sum(ranks.all_gather(rank, t)),
            )
        except BaseException as err:  # surfaced below; the barrier breaks the other thread
            errors.append(err)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    first, second = results
    assert torch.equal(first.values, second.values) and first.num_matvecs == second.num_matvecs
    assert max_rel_error(first.values, want_values) < 1e-10
    vectors = torch.cat([first.vectors, second.vectors])
    assert ((vectors * want_vectors).sum(0).abs() > 1 - 1e-8).all()


def test_identity_reduce_is_called_and_changes_nothing():
    a = rotated(MATRICES["indefinite"])
    calls = []

    def counting_identity(t):
        calls.append(t.dtype)
        return t

    plain = lanczos(lambda v: a.float() @ v, 300, 4, generator=seeded(0))
    reduced = lanczos(lambda v: a.float() @ v, 300, 4, generator=seeded(0), reduce=counting_identity)
    assert torch.equal(plain.values, reduced.values) and torch.equal(plain.vectors, reduced.vectors)
    assert len(calls) >= 3 * reduced.num_matvecs and set(calls) == {F64}  # 2 Gram-Schmidt passes + a norm


def test_non_finite_product_raises_floating_point_error_naming_the_iteration():
    products = []

    def matvec(v):
        products.append(1)
        return v * float("nan") if len(products) == 4 else 2 * v + v.roll(1) + v.roll(-1)

    with pytest.raises(FloatingPointError, match="iteration 3"):
        lanczos(matvec, 50, 2, generator=seeded(0))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_eigenpairs": 0}, "num_eigenpairs"),
        ({"num_eigenpairs": 11}, "num_eigenpairs"),
        ({"num_iters": 2}, "num_iters"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"init": torch.ones(9)}, "init"),
        ({"init": torch.zeros(10)}, "init"),
        ({"init": torch.zeros(10, 2)}, "init"),
        ({"init": torch.full((10,), float("nan"))}, "init"),
        ({"init": torch.ones(10, 2).index_fill_(0, torch.tensor([3]), float("inf"))}, "init"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, argument):
    arguments = {"matvec": lambda v: v, "dim": 10, "num_eigenpairs": 3, **kwargs}
    with pytest.raises(ValueError, match=argument):
        lanczos(**arguments)


def test_same_generator_seed_gives_bitwise_equal_results():
    a = rotated(MATRICES["indefinite"]).float()
    first = lanczos(lambda v: a @ v, 300, 4, generator=seeded(7))
    second = lanczos(lambda v: a @ v, 300, 4, generator=seeded(7))
    other = lanczos(lambda v: a @ v, 300, 4, generator=seeded(8))
    assert torch.equal(first.values, second.values) and torch.equal(first.vectors, second.vectors)
    assert not torch.equal(first.vectors, other.vectors)


def test_global_rng_is_neither_used_nor_advanced():
    a = rotated(MATRICES["indefinite"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = lanczos(lambda v: a @ v, 300, 4, dtype=F64)  # default generator
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    second = lanczos(lambda v: a @ v, 300, 4, dtype=F64)
    assert torch.equal(first.vectors, second.vectors)


def test_without_a_dtype_a_float64_matrix_is_solved_in_float64():
    # `lambda v: H @ v` with a float64 H rejects a float32 vector: lanczos must notice and work in float64,
    # reaching float64 accuracy against eigh (float32 work would stop near 1e-7).
    a = rotated(torch.linspace(-3.0, 10.0, 40), seed=3)
    want_values, want_vectors = top_eigh(a, 4)
    pairs = lanczos(lambda v: a @ v, 40, 4, tol=1e-10, generator=seeded(0))
    assert pairs.vectors.dtype == F64
    assert max_rel_error(pairs.values, want_values) < 1e-12
    alignment = (pairs.vectors.T @ want_vectors).diagonal().abs()
    assert (alignment > 1 - 1e-10).all()


def test_without_a_dtype_a_matvec_answering_in_float64_gets_float64_vectors():
    a = rotated(torch.linspace(1.0, 5.0, 30), seed=4)
    pairs = lanczos(lambda v: a @ v.double(), 30, 2, tol=1e-10, generator=seeded(0))
    assert pairs.vectors.dtype == F64
    assert max_rel_error(pairs.values, top_eigh(a, 2)[0]) < 1e-12


def test_without_a_dtype_a_float32_matvec_stays_float32():
    a = rotated(torch.linspace(1.0, 5.0, 30), seed=4).float()
    pairs = lanczos(lambda v: a @ v, 30, 2, generator=seeded(0))
    assert pairs.vectors.dtype == torch.float32


def test_other_errors_of_the_matvec_are_not_swallowed():
    def broken(v):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        lanczos(broken, 10, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_float64_model_through_make_hvp_needs_no_dtype_argument(method):
    # The explicit Hessian of the same float64 loss is the truth; float32 work would stop near 1e-6.
    from hf_levy import make_hvp

    loss, flat = mlp_hessian_problem()
    want, _ = top_eigh(hessian(loss)(flat), 3)
    torch.manual_seed(0)
    model = TinyClassifier().double()
    x, y = torch.randn(40, 10, dtype=F64), torch.randint(0, 3, (40,))
    hvp = make_hvp(
        model,
        {"x": x, "y": y},
        list(model.parameters()),
        method=method,
        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )
    pairs = lanczos(hvp, flat.numel(), 3, tol=1e-10, generator=seeded(0))
    assert pairs.vectors.dtype == F64
    assert max_rel_error(pairs.values, want) < (1e-10 if method == "autograd" else 1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_block_of_the_next_eigenvectors_plus_rounding_noise_still_finds_the_top_one(seed):
    # The refresh after a step that moved the top direction: the old block spans eigenvectors 2..K+1 up to 1e-6,
    # no breakdown reveals e_1, and its 1e-6 share grows too slowly to surface before the K pairs certify.
    # Only the random part of the start finds it (without it, every seed returned 9.7 as the top eigenvalue).
    n, k = 20_000, 8
    spectrum = 10 * 0.97 ** torch.arange(n, dtype=F64)
    noise = torch.randn(n, k, dtype=F64, generator=seeded(100 + seed))
    block = torch.eye(n, k + 1, dtype=F64)[:, 1:] + 1e-6 * noise / noise.norm(dim=0)
    pairs = lanczos(lambda v: spectrum.float() * v, n, k, init=block.float(), generator=seeded(seed))
    assert pairs.converged
    torch.testing.assert_close(pairs.values, spectrum[:k], rtol=1e-4, atol=0)


def test_block_warm_start_is_the_sum_of_unit_columns_plus_a_small_random_part():
    # The documented start: Σ_i c_i/‖c_i‖ normalized, plus 0.03 x a random unit vector (then normalized). Columns
    # of norms 1, 100, 0.01 and 3 must weigh the same; the part orthogonal to their sum is the random one, 0.03.
    n = 10_000
    cols = torch.zeros(n, 4, dtype=F64)
    cols[0, 0], cols[1, 1], cols[2, 2], cols[3, 3] = 1.0, 100.0, 0.01, 3.0
    seen = []

    def matvec(v):
        seen.append(v.clone())
        return torch.linspace(1.0, 2.0, n, dtype=F64) * v

    lanczos(matvec, n, 1, num_iters=2, init=cols, generator=seeded(0))
    q0 = seen[0]
    assert q0.norm().item() == pytest.approx(1.0, rel=1e-12)
    # the random part (about 0.03 / sqrt(n) per coordinate) moves each column's weight by far less than 10%
    torch.testing.assert_close(q0[:4], torch.full((4,), q0[:4].mean().item(), dtype=F64), rtol=0.1, atol=0)
    along = torch.zeros(n, dtype=F64)
    along[:4] = 0.5
    rest = (q0 - (q0 @ along) * along).norm().item()
    assert 0.027 < rest < 0.033, f"random part {rest:.4f}, documented 0.03"


def test_an_operator_with_zero_lanczos_diagonal_still_estimates_its_norm():
    # [[0, A], [A^T, 0]] from a start on the first block: every Lanczos vector lives on one block, so every diag
    # entry is exactly 0 and ||H|| shows only in the offdiagonal. With rank(A) = 2 the Krylov space is invariant
    # after 5 vectors: the breakdown (relative to that estimate) ends the run at 6 products, with the zero
    # eigenvalue exact (an estimate from the diagonal alone, 0, needed 26).
    m = 100
    q1, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=seeded(0)))
    q2, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=seeded(1)))
    block = (q1[:, :2] * torch.tensor([3.0, 2.0], dtype=F64)) @ q2[:, :2].T
    h = torch.zeros(2 * m, 2 * m, dtype=F64)
    h[:m, m:], h[m:, :m] = block, block.T
    start = torch.cat([torch.randn(m, dtype=F64, generator=seeded(2)), torch.zeros(m, dtype=F64)])
    pairs = lanczos(lambda v: h @ v, 2 * m, 3, init=start, dtype=F64, generator=seeded(0))
    assert pairs.converged and pairs.num_matvecs <= 8, pairs.num_matvecs
    torch.testing.assert_close(pairs.values, torch.tensor([3.0, 2.0, 0.0], dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_a_zero_eigenvalue_is_certified_at_the_rounding_floor_of_the_dtype(dtype):
    # A zero eigenvalue has no relative accuracy to reach: it is certified once its residual is below
    # tol·sqrt(eps)·||H||, so it costs no more products than an eigenvalue just above that floor certified
    # relative to itself (20 and 32 products here). An eps·||H|| floor demands ~1/sqrt(eps) more accuracy:
    # 28 products in float32, and in float64 the default cap of 48 runs out unconverged.
    n, floor = 2000, torch.finfo(dtype).eps ** 0.5
    bulk = torch.linspace(-0.5, -0.1, n - 2, dtype=F64)
    counts = {}
    for theta in (0.0, 2 * floor):
        spectrum = torch.cat([torch.tensor([1.0, theta], dtype=F64), bulk]).to(dtype)
        pairs = lanczos(lambda v, s=spectrum: s * v, n, 2, dtype=dtype, generator=seeded(0))
        assert pairs.converged and abs(pairs.values[1].item() - theta) < 10 * floor**2
        counts[theta] = pairs.num_matvecs
    assert counts[0.0] <= counts[2 * floor] + 1, counts


def test_negative_top_eigenvalues_are_certified_relative_to_their_magnitude():
    # Near a maximum every eigenvalue is negative: the tolerance is relative to |theta|, as for positive ones,
    # so the mirrored spectrum converges as fast as the original.
    spectrum = -torch.cat([torch.tensor([1.0, 1.5, 2.0]), torch.linspace(4.0, 20.0, 297)]).double()
    mirrored = lanczos(lambda v: -spectrum.flip(0) * v, 300, 3, tol=1e-6, dtype=F64, generator=seeded(0))
    pairs = lanczos(lambda v: spectrum * v, 300, 3, tol=1e-6, dtype=F64, generator=seeded(0))
    assert pairs.converged, pairs.residuals
    torch.testing.assert_close(pairs.values, spectrum[:3], rtol=1e-8, atol=0)
    assert pairs.num_matvecs <= mirrored.num_matvecs + 10


def test_all_eigenpairs_of_a_small_operator_when_k_equals_dim():
    a = rotated(torch.tensor([4.0, -1.0, 2.5, 0.5, 3.0]), seed=6)
    pairs = lanczos(lambda v: a @ v, 5, 5, dtype=F64, generator=seeded(0))
    torch.testing.assert_close(pairs.values, torch.linalg.eigvalsh(a).flip(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pairs.vectors.T @ pairs.vectors, torch.eye(5, dtype=F64), rtol=0, atol=1e-10)


def test_num_iters_equal_to_k_is_allowed_and_spends_exactly_k_products():
    a = rotated(MATRICES["indefinite"])
    pairs = lanczos(lambda v: a @ v, 300, 4, num_iters=4, dtype=F64, generator=seeded(0))
    assert pairs.num_matvecs == 4 and pairs.values.shape == (4,) and torch.isfinite(pairs.values).all()
    # Ritz values of a 4-dimensional Krylov space lie inside the spectrum (Cauchy interlacing)
    assert (pairs.values <= top_eigh(a, 4)[0] + 1e-10).all()


@pytest.mark.parametrize("mix", [1e-4, 1e-6, 1e-8])
def test_residual_bounds_hold_from_a_start_vector_that_is_nearly_an_eigenvector(mix):
    # Start = v_2 + mix·v_1: the Krylov space is invariant up to ~mix. Below the breakdown level
    # eps^(2/3)·||H|| the offdiag is rounding and recorded as 0, so a reported residual may undershoot the
    # actual one by at most that level; declaring breakdown far above it (e.g. at eps^(1/3)) would report
    # residual 0 for pairs that are off by 1e-6.
    a = rotated(torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.linspace(-1.0, 0.5, 297)]).double())
    _, evecs = torch.linalg.eigh(a)
    start = evecs[:, -2] + mix * evecs[:, -1]
    pairs = lanczos(lambda v: a @ v, 300, 2, tol=1e-8, init=start, dtype=F64, generator=seeded(0))
    assert pairs.converged
    torch.testing.assert_close(pairs.values, torch.tensor([3.0, 2.0], dtype=F64), rtol=1e-8, atol=0)
    actual = (a @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0)
    breakdown_level = torch.finfo(F64).eps ** (2 / 3) * 3.0
    assert (actual <= 1.01 * pairs.residuals + breakdown_level).all(), f"actual {actual} vs {pairs.residuals}"


def test_float32_repeated_eigenvalues_of_a_larger_operator_are_all_found():
    # Each of 3, 1, -2 a hundred times: the Krylov space of any start vector is 3-dimensional, and in float32 its
    # breakdown shows as an offdiag of rounding size (~1e-6·||H||, above eps·||H||). Treated as a breakdown, the
    # restarts find the other copies of 3; continued as if it were signal, one copy comes back with 1 and -2.
    a = rotated(torch.tensor([3.0, 1.0, -2.0]).repeat(100)).float()
    pairs = lanczos(lambda v: a @ v, 300, 4, generator=seeded(0))
    assert pairs.converged
    torch.testing.assert_close(pairs.values, torch.full((4,), 3.0, dtype=F64), rtol=1e-5, atol=0)
