"""KrylovBasis: blocked storage and its float64 products, against the same algebra on one dense matrix."""

from __future__ import annotations

import pytest
import torch

from hf_levy.krylov_basis import KrylovBasis

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
