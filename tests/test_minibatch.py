"""hf_levy.minibatch: the real sub-batch noise, against enumerated subsets and closed-form gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_levy.minibatch import (
    batch_length,
    minibatch_kappa,
    minibatch_noise,
    select_rows,
    subbatch_gradient,
    subbatch_rows,
)


def _subset_mean_variance(points: torch.Tensor, size: int) -> float:
    """E‖mean(S) − mean(all)‖² over every subset S of ``size`` rows, by enumeration."""
    centre = points.mean(0)
    total = [
        (points[list(s)].mean(0) - centre).square().sum()
        for s in itertools.combinations(range(len(points)), size)
    ]
    return float(torch.stack(total).mean())


def test_kappa_squared_is_the_ratio_of_enumerated_subset_mean_variances():
    points = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for b, virtual in ((2, 4), (4, 2), (3, 3), (1, 7)):
        expected = _subset_mean_variance(points, virtual) / _subset_mean_variance(points, b)
        assert minibatch_kappa(1.0, b, virtual, 8) ** 2 == pytest.approx(expected, rel=1e-12), (b, virtual)
    assert minibatch_kappa(0.5, 2, None, 8) == 0.5  # b' = b: κ is levy_scale


@pytest.mark.parametrize(
    ("b", "virtual", "name"),
    [
        (8, None, "levy_noise_batch_size=8"),
        (0, None, "levy_noise_batch_size=0"),
        (2, 8, "levy_virtual_batch_size=8"),
    ],
)
def test_kappa_refuses_sizes_that_are_not_smaller_than_the_step_batch(b, virtual, name):
    with pytest.raises(ValueError, match=name):
        minibatch_kappa(1.0, b, virtual, 8)


def test_subbatch_rows_are_distinct_examples_split_by_micro_batch():
    sizes = [3, 5, 2]
    rows = subbatch_rows(sizes, 6, torch.Generator().manual_seed(1))
    assert [len(r) for r in rows] != [0, 0, 0] and sum(len(r) for r in rows) == 6
    flat = [start + int(i) for start, r in zip((0, 3, 8), rows, strict=True) for i in r]
    assert len(set(flat)) == 6
    assert all(
        bool(((r >= 0) & (r < n)).all()) and r.tolist() == sorted(r.tolist())
        for r, n in zip(rows, sizes, strict=True)
    )
    again = subbatch_rows(sizes, 6, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(rows, again, strict=True))
    assert [r.tolist() for r in subbatch_rows(sizes, 99, torch.Generator())] == [
        [0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 1],
    ]


def test_subbatch_rows_draw_every_subset_uniformly():
    """All C(5, 2) = 10 pairs out of micro-batches [2, 3], each about 1/10 of 4,000 draws (±5 sd)."""
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(4000):
        rows = subbatch_rows([2, 3], 2, torch.Generator().manual_seed(seed))
        key = tuple([int(i) for i in rows[0]] + [2 + int(i) for i in rows[1]])
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 10
    sd = math.sqrt(4000 * 0.1 * 0.9)
    assert all(abs(c - 400) < 5 * sd for c in counts.values()), counts


def test_select_rows_indexes_per_example_entries_only():
    batch = {
        "x": torch.arange(12).view(4, 3),
        "labels": torch.arange(4),
        "scale": torch.tensor(2.0),
        "name": "b",
    }
    picked = select_rows(batch, torch.tensor([1, 3]))
    assert picked["x"].tolist() == [[3, 4, 5], [9, 10, 11]] and picked["labels"].tolist() == [1, 3]
    assert picked["scale"] is batch["scale"] and picked["name"] == "b"
    assert batch_length(batch) == 4
    with pytest.raises(ValueError, match="no tensor entry"):
        batch_length({"name": "b"})


class _Regression(torch.nn.Module):
    """Mean squared error of a linear model, float64: ∇ = (2/n) Xᵀ(Xw − y) in closed form."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, dim, dtype=torch.float64))

    def forward(self, x, labels):
        return {"loss": ((x.double() @ self.w - labels.double()) ** 2).mean()}


def _closed_form_gradient(w, x, y):
    return 2 * x.T @ (x @ w - y) / len(y)


def test_subbatch_gradient_is_the_per_example_mean_over_micro_batches_of_unequal_size():
    generator = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(9, 4, generator=generator, dtype=torch.float64),
        torch.randn(9, generator=generator).double(),
    )
    model = _Regression(4)
    batches = [{"x": x[:2], "labels": y[:2]}, {"x": x[2:9], "labels": y[2:9]}]
    rows = [
        torch.tensor([1]),
        torch.tensor([0, 2, 6]),
    ]  # examples 1, 2, 4, 8: one from the first, three after
    picked = [1, 2, 4, 8]
    gradient, count = subbatch_gradient(model, batches, rows, list(model.parameters()))
    expected = _closed_form_gradient(model.w.detach(), x[picked], y[picked])
    assert count == 4
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    assert model.w.grad is None  # .grad untouched
    empty, none = subbatch_gradient(model, batches, [torch.tensor([], dtype=torch.long)] * 2, [model.w])
    assert none == 0 and torch.equal(empty, torch.zeros(4, dtype=torch.float64))


def test_minibatch_noise_is_kappa_times_the_shrunk_difference():
    generator = torch.Generator().manual_seed(3)
    g, g_b = torch.randn(6, generator=generator), torch.randn(6, generator=generator)
    noise = minibatch_noise(g, g_b, 0.7, shrink=0.25)
    expected = 0.7 * (0.25 * g_b.double() - g.double())
    torch.testing.assert_close(noise.xi_P.double(), expected, rtol=1e-6, atol=1e-7)
    assert noise.xi_P.dtype == g.dtype and noise.topk_share is None
    assert noise.norm == pytest.approx(float(expected.norm()), rel=1e-12)
    # g + ξ at κ = 1 and no clipping is the sub-batch gradient itself
    torch.testing.assert_close(g + minibatch_noise(g, g_b, 1.0).xi_P, g_b)


def test_minibatch_topk_projects_on_the_span_and_reports_its_share():
    generator = torch.Generator().manual_seed(4)
    vectors, _ = torch.linalg.qr(torch.randn(10, 3, generator=generator, dtype=torch.float64))
    g, g_b = torch.randn(10, generator=generator).double(), torch.randn(10, generator=generator).double()
    noise = minibatch_noise(g, g_b, 2.0, vectors_PK=vectors)
    projector = vectors @ vectors.T
    d = g_b - g
    torch.testing.assert_close(noise.xi_P, 2.0 * projector @ d, rtol=1e-12, atol=1e-12)
    assert noise.topk_share == pytest.approx(
        float((projector @ d).square().sum() / d.square().sum()), rel=1e-12
    )
    assert math.isnan(minibatch_noise(g, g, 1.0, vectors_PK=vectors).topk_share)  # d = 0: no share
