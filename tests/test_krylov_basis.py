"""KrylovBasis: blocked storage and its float64 products, against the same algebra on one dense matrix."""

from __future__ import annotations

import pytest
import torch

from hf_levy import _krylov_basis as krylov_basis
from hf_levy._krylov_basis import KrylovBasis

F64 = torch.float64


def filled(rows_written: int, block_rows: int | None, max_rows: int = 10, dim: int = 50, dtype=torch.float32):
    rows = torch.randn(max_rows, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    basis = KrylovBasis(max_rows, dim, dtype, torch.device("cpu"), block_rows=block_rows)
    for i in range(rows_written):
        basis[i] = rows[i]
    return basis, rows[:rows_written]


def test_rows_are_allocated_a_block_at_a_time():
    basis, _ = filled(4, block_rows=3)
    assert [tuple(b.shape) for b in basis.blocks] == [(3, 50), (3, 50)]  # 6 rows held, not 10
    basis, _ = filled(10, block_rows=3)
    assert [b.shape[0] for b in basis.blocks] == [3, 3, 3, 1]  # the last block stops at max_rows


def test_on_the_cpu_the_default_is_one_block_of_all_rows():
    basis, _ = filled(1, block_rows=None)
    assert [tuple(b.shape) for b in basis.blocks] == [(10, 50)]


@pytest.mark.parametrize("block_rows", [None, 1, 3, 4])
@pytest.mark.parametrize("used", [1, 3, 7, 10])
def test_products_match_the_dense_matrix_of_the_rows_written(block_rows, used):
    basis, rows = filled(10, block_rows)
    dense = rows.double()[:used]
    w = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert torch.cat(basis.first(used)).shape == (used, 50) and torch.equal(
        torch.cat(basis.first(used)), rows[:used]
    )
    torch.testing.assert_close(basis.local_inner(used, w), dense @ w.double(), rtol=1e-12, atol=1e-12)
    coeffs = torch.randn(used, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = basis.minus_combination(w, coeffs)
    torch.testing.assert_close(out.double(), w.double() - coeffs @ dense, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32 and out.data_ptr() != w.data_ptr()  # a new tensor; w is untouched
    weights = torch.randn(used, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(basis.combine(weights).double(), weights.T @ dense, rtol=0, atol=1e-5)


def _check_against_dense(basis, rows, used, dim):
    dense = rows.double()[:used]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(dim, generator=g)
    torch.testing.assert_close(basis.local_inner(used, w), dense @ w.double(), rtol=1e-12, atol=1e-12)
    coeffs = torch.randn(used, dtype=F64, generator=g)
    out = basis.minus_combination(w, coeffs)
    torch.testing.assert_close(out.double(), w.double() - coeffs @ dense, rtol=0, atol=1e-4)
    weights = torch.randn(used, 3, dtype=F64, generator=g)
    torch.testing.assert_close(basis.combine(weights).double(), weights.T @ dense, rtol=0, atol=1e-4)


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("used", [1, 7, 10])
def test_products_split_into_many_column_chunks_match_the_dense_matrix(monkeypatch, block_rows, used):
    # A scratch budget of 20 entries cuts 53 columns into chunks of 2 (10 rows) or 6 (3 rows), the last one
    # partial: every column must be visited exactly once, as it is on a real model (P >> 2^19 / rows).
    monkeypatch.setattr(krylov_basis, "_CHUNK_NUMEL", 20)
    basis, rows = filled(10, block_rows, dim=53)
    assert krylov_basis._columns_per_chunk(10, torch.device("cpu")) == 2
    _check_against_dense(basis, rows, used, 53)


def test_products_at_a_size_where_the_cpu_chunks_the_columns_match_the_dense_matrix():
    # 10 rows of 2 x 52,428 + 37 columns: the production chunk budget (2^19 entries) gives three column chunks.
    dim = 2 * ((1 << 19) // 10) + 37
    basis, rows = filled(10, None, dim=dim)
    _check_against_dense(basis, rows, 10, dim)


def test_local_inner_of_two_row_blocks_in_many_chunks_is_the_float64_matrix_product(monkeypatch):
    monkeypatch.setattr(krylov_basis, "_CHUNK_NUMEL", 12)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 41, generator=g), torch.randn(3, 41, generator=g)
    got = krylov_basis.local_inner(a, b)
    assert got.dtype == F64 and got.shape == (4, 3)
    torch.testing.assert_close(got, a.double() @ b.double().T, rtol=1e-12, atol=1e-12)
    # float32 entries whose float32 dot product loses everything: accumulated in float64, nothing is lost
    big = torch.tensor([[1e8, 1.0, -1e8]], dtype=torch.float32)
    ones = torch.ones(1, 3, dtype=torch.float32)
    assert krylov_basis.local_inner(big, ones).item() == 1.0
