"""The Lanczos basis: orthonormal rows kept in blocks that are allocated as the run needs them.

An accelerator reserves a tensor's memory when it is created, so one ``(num_iters, P)`` tensor would hold
``itemsize·P·num_iters`` bytes however early the run converges (at P = 0.57B in float32 and 48 iterations:
110 GB). Rows therefore come in blocks of ``ACCELERATOR_BLOCK_ROWS``; a run that stops after m products
holds ``ceil(m / 8) · 8`` rows. On the CPU, pages become resident only when written, so a single block of
all rows costs the same and keeps the arithmetic (and the results) exactly those of one contiguous basis.

Products against the basis accumulate in float64, in column chunks that keep the float64 scratch small.

Shape suffixes: P = vector length, X / Y = row counts, K = combinations.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

ACCELERATOR_BLOCK_ROWS = 8
# Float64 accumulation casts this many basis entries at a time, so the scratch stays in cache: casting the
# whole basis at once is an order of magnitude slower (docs/research/benchmarks.md, "Constants").
_CHUNK_NUMEL = 1 << 19
# On an accelerator, chunks this large keep kernel launches few (at billions of parameters, launching small
# chunks would dominate) while the float64 scratch stays at 1 GB; every chunked operand also stays far below
# 2^31 elements, where large matrix products fall back to full copies.
_CHUNK_NUMEL_ACCELERATOR = 1 << 27


def _columns_per_chunk(rows: int, device: torch.device) -> int:
    budget = _CHUNK_NUMEL if device.type == "cpu" else _CHUNK_NUMEL_ACCELERATOR
    return max(1, budget // max(rows, 1))


def local_inner(a_XP: Tensor, b_YP: Tensor) -> Tensor:
    """a_XP @ b_YP.T accumulated in float64, shape (X, Y).

    Float64 because float32 sums over ~1M entries put errors of order 1e-5 into the Ritz values and the basis's
    orthogonality, even with diag and norms in float64 (docs/research/benchmarks.md, "Constants").
    """
    if a_XP.dtype == torch.float64:
        return a_XP @ b_YP.T
    out_XY = torch.zeros(a_XP.shape[0], b_YP.shape[0], dtype=torch.float64, device=a_XP.device)
    step = _columns_per_chunk(max(a_XP.shape[0], b_YP.shape[0]), a_XP.device)
    for start in range(0, a_XP.shape[1], step):
        out_XY += a_XP[:, start : start + step].double() @ b_YP[:, start : start + step].double().T
    return out_XY


class KrylovBasis:
    """Rows q_0, q_1, ... of length P in the working dtype and device, stored in blocks of ``block_rows``."""

    def __init__(
        self, max_rows: int, dim: int, dtype: torch.dtype, device: torch.device, block_rows: int | None = None
    ):
        if block_rows is None:
            block_rows = max_rows if device.type == "cpu" else ACCELERATOR_BLOCK_ROWS
        self.block_rows = max(1, min(block_rows, max_rows))
        self.max_rows, self.dim, self.dtype, self.device = max_rows, dim, dtype, device
        self.blocks: list[Tensor] = []

    def __setitem__(self, row: int, q_P: Tensor) -> None:
        """Store row ``row`` (rows are written in order; a new block is allocated when one fills)."""
        block, offset = divmod(row, self.block_rows)
        while len(self.blocks) <= block:
            rows = min(self.block_rows, self.max_rows - len(self.blocks) * self.block_rows)
            self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device))
        self.blocks[block][offset] = q_P

    def first(self, rows: int) -> list[Tensor]:
        """Views of rows [0, rows) as a list of (X, P) blocks."""
        full, rest = divmod(rows, self.block_rows)
        views = self.blocks[:full]
        return views + [self.blocks[full][:rest]] if rest else views

    def local_inner(self, rows: int, w_P: Tensor) -> Tensor:
        """(rows,) float64: this process's part of <q_i, w> for i < rows (reduce it over shards)."""
        return torch.cat([local_inner(block_XP, w_P[None])[:, 0] for block_XP in self.first(rows)])

    def _column_chunks(self, rows: int) -> Iterator[tuple[slice, slice, Tensor]]:
        """(row slice, column slice, rows × columns view of the basis) over the first ``rows`` rows.

        Block by block, in column chunks sized for the float64 scratch budget.
        """
        offset = 0
        for block_XP in self.first(rows):
            count = block_XP.shape[0]
            step = _columns_per_chunk(count, block_XP.device)
            for start in range(0, self.dim, step):
                columns = slice(start, start + step)
                yield slice(offset, offset + count), columns, block_XP[:, columns]
            offset += count

    def minus_combination(self, w_P: Tensor, coeffs_X: Tensor) -> Tensor:
        """w − Σ_i coeffs_i q_i over the first len(coeffs) rows, as a new tensor (matvec may own w)."""
        out_P = w_P.clone()
        coeffs_1X = coeffs_X.to(w_P.dtype)[None]
        for rows, columns, chunk_XC in self._column_chunks(coeffs_X.shape[0]):
            out_P[columns] -= (coeffs_1X[:, rows] @ chunk_XC)[0]
        return out_P

    def combine(self, weights_XK: Tensor) -> Tensor:
        """weights_XKᵀ · rows as a (K, P) tensor over the first len(weights) rows."""
        out_KP = torch.empty(weights_XK.shape[1], self.dim, dtype=self.dtype, device=self.device)
        weights_KX = weights_XK.T.to(self.dtype)
        for rows, columns, chunk_XC in self._column_chunks(weights_XK.shape[0]):
            part_KC = weights_KX[:, rows] @ chunk_XC
            if rows.start == 0:  # the first block writes, later blocks add
                out_KP[:, columns] = part_KC
            else:
                out_KP[:, columns] += part_KC
        return out_KP
