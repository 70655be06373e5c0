"""Tests of hf_levy.diagnostics on least squares whose gradient noise has a known law.

The dataset holds N examples of tests/least_squares.py with residuals drawn by scipy.stats.levy_stable:
along q_k a mini-batch's noise is a mean of b residuals (minus the dataset mean), so its tail index is
that of the residuals (2 for Gaussian ones, 1.5 for SαS(1.5) ones) whatever b.
"""

import functools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from least_squares import LeastSquares, features, optimum, orthonormal_directions

from hf_levy.diagnostics import format_table, tail_index_profile
from hf_levy.recipes.plots import plot_tail_index

N, P, K = 2048, 4, 2
BATCH_SIZES = [4, 16]
SETTINGS = {"num_batches": 256, "bootstrap": 100, "progress": False}


def collate(examples):
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def problem(alpha: float, scales_K: torch.Tensor, q_PK: torch.Tensor, seed: int = 0):
    dim, k = q_PK.shape
    w_star = optimum(dim)
    x = features(scales_K, q_PK)
    eps = torch.from_numpy(
        scipy.stats.levy_stable.rvs(alpha, 0.0, size=(N, k), random_state=np.random.default_rng(seed))
    )
    dataset = [{"features": x, "targets": x @ w_star + e} for e in eps]
    return LeastSquares(w_star), dataset


def two_directions(alpha: float):
    q = orthonormal_directions(P, K)
    model, dataset = problem(alpha, torch.tensor([1.0, 4.0], dtype=torch.float64), q)
    return model, dataset, q


@functools.cache
def profile(alpha: float, seed: int = 0) -> tuple:
    model, dataset, q = two_directions(alpha)
    rows = tail_index_profile(
        model, dataset, collate, [model.w], BATCH_SIZES, vectors_PK=q, seed=seed, **SETTINGS
    )
    return tuple(rows)


def directional(rows):
    return [r for r in rows if r["direction"] != "pooled"]


def test_gaussian_noise_reads_alpha_near_two_with_an_interval_containing_two():
    rows = directional(profile(2.0))
    assert len(rows) == len(BATCH_SIZES) * K
    for r in rows:
        assert abs(r["alpha"] - 2.0) < 0.15, r
        assert r["alpha_low"] <= 2.0 <= r["alpha_high"], r


def test_stable_noise_reads_an_interval_that_excludes_two():
    for r in directional(profile(1.5)):
        assert r["alpha_high"] < 2.0, r
        assert r["alpha_low"] <= 1.5 + 0.1 and r["alpha_high"] >= 1.5 - 0.1, r  # near the truth


def test_directional_scale_follows_the_closed_form_batch_scaling():
    # Gaussian residuals of unit SαS scale: along q_k the batch-b noise has scale s_k b^{-1/2} (up to
    # the finite-population correction sqrt(1 − b/N) of sampling without replacement).
    for r in directional(profile(2.0)):
        s = 1.0 if r["direction"] == "v0" else 4.0
        b = r["batch_size"]
        expected = s * b**-0.5 * math.sqrt(1 - b / N)
        assert r["scale_low"] <= expected <= r["scale_high"], (r, expected)


def test_pooled_estimate_reads_gaussians_of_unequal_scales_as_heavy_tailed():
    # Coordinates = directions with scales spread over 3.5 decades: pooled they look like α̂ << 2,
    # while each direction alone is Gaussian (the critique of coordinate pooling).
    dim = 8
    q = torch.eye(dim, dtype=torch.float64)
    model, dataset = problem(2.0, 10 ** (torch.arange(dim, dtype=torch.float64) / 2), q, seed=3)
    rows = tail_index_profile(model, dataset, collate, [model.w], [8], vectors_PK=q, **SETTINGS)
    pooled = rows[0]
    assert pooled["direction"] == "pooled" and pooled["alpha_high"] < 1.5, pooled
    for r in rows[1:]:
        assert r["alpha_low"] <= 2.0 <= r["alpha_high"], r


def test_same_seed_is_deterministic_and_another_seed_differs():
    model, dataset, q = two_directions(2.0)
    again = tail_index_profile(model, dataset, collate, [model.w], BATCH_SIZES, vectors_PK=q, **SETTINGS)
    assert again == list(profile(2.0))
    other = tail_index_profile(model, dataset, collate, [model.w], BATCH_SIZES[:1], seed=1, **SETTINGS)
    assert other[0]["alpha"] != profile(2.0)[0]["alpha"]


def test_a_gradient_every_example_shares_cancels_out_of_the_noise():
    # Away from w* every example's gradient gains the same term (the features are shared), so the noise,
    # a mini-batch gradient minus the full-data reference, and every estimate are those at w* (to rounding).
    model, dataset, q = two_directions(1.5)
    settings = {"num_batches": 64, "bootstrap": 0, "progress": False, "vectors_PK": q}
    at_optimum = tail_index_profile(model, dataset, collate, [model.w], BATCH_SIZES, **settings)
    with torch.no_grad():
        model.w.add_(0.5)
    away = tail_index_profile(model, dataset, collate, [model.w], BATCH_SIZES, **settings)
    for here, there in zip(at_optimum, away, strict=True):
        for key in ("alpha", "scale"):
            assert there[key] == pytest.approx(here[key], rel=1e-6), (key, here, there)


def test_the_reference_gradient_weighs_every_example_alike_over_chunks_of_unequal_size(monkeypatch):
    # 2048 examples in reference chunks of 48 (the largest batch): 42 of 48 and one of 32. The noise of each
    # mini-batch is its gradient minus the mean gradient over the 2048 examples, here computed in closed form
    # (the least-squares gradient F^T(Fw - y) per example, averaged), not as a mean of chunk means.
    import hf_levy.diagnostics as diagnostics

    model, dataset, q = two_directions(1.5)
    batches, captured = [], {}

    def recording(examples):
        batches.append(examples)
        return collate(examples)

    def estimate(b, pooled_MS, projected_MK, *args):
        captured["projected_MK"] = projected_MK
        return []

    monkeypatch.setattr(diagnostics, "_estimate", estimate)
    tail_index_profile(
        model, dataset, recording, [model.w], [48], num_batches=32, vectors_PK=q, bootstrap=0, progress=False
    )

    def mean_gradient(examples):
        w = model.w.detach()
        return torch.stack([e["features"].T @ (e["features"] @ w - e["targets"]) for e in examples]).mean(0)

    reference = mean_gradient(dataset)
    expected_MK = torch.stack([q.T @ (mean_gradient(batch) - reference) for batch in batches[-32:]])
    assert len(batches) == 43 + 32 and len(batches[42]) == 32
    torch.testing.assert_close(captured["projected_MK"], expected_MK, rtol=0, atol=1e-12)


def test_the_intervals_are_the_central_95_percent_of_the_bootstrap_estimates(monkeypatch):
    # The tail-index estimator replaced by a counter: the point estimate reads 0, the 200 bootstrap
    # resamples read 1..200, so a 95% percentile interval is about [5, 196] whatever the quantile rule.
    import hf_levy.diagnostics as diagnostics

    calls = iter(range(10_000))
    monkeypatch.setattr(diagnostics, "estimate_tail_index", lambda x: float(next(calls)))
    model, dataset, _ = two_directions(2.0)
    (row,) = tail_index_profile(
        model, dataset, collate, [model.w], [4], num_batches=32, bootstrap=200, progress=False
    )
    assert row["alpha"] == 0.0
    assert 4 <= row["alpha_low"] <= 6 and 195 <= row["alpha_high"] <= 197, row


def test_global_rng_model_mode_and_grad_are_untouched():
    model, dataset, q = two_directions(1.5)
    model.train()
    model.w.grad = torch.ones_like(model.w)
    torch.manual_seed(9)
    before = torch.get_rng_state()
    tail_index_profile(
        model,
        dataset,
        collate,
        [model.w],
        [8],
        num_batches=32,
        bootstrap=5,
        reference_batch_size=512,
        progress=False,
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and torch.equal(model.w.grad, torch.ones_like(model.w))


def test_table_and_png_are_written(tmp_path):
    rows = list(profile(1.5))
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| batch size | direction | α̂")
    assert len(lines) == 2 + len(rows) and "| 4 | pooled |" in table and "| 16 | v1 |" in table
    path = tmp_path / "alpha.png"
    plot_tail_index(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_sizes": []}, "batch_sizes is empty"),
        ({"batch_sizes": [N]}, "batch_sizes must hold integers"),
        ({"num_batches": 8}, "num_batches must be >= 32"),
        ({"reference_batch_size": 2}, "reference_batch_size must be in"),
        ({"vectors_PK": torch.zeros(P + 1, 2)}, "vectors_PK must have shape"),
        ({"bootstrap": -1}, "bootstrap must be >= 0"),
        ({"pooled_coordinates": 0}, "pooled_coordinates must be >= 1"),
        ({"num_batches": 32, "pooled_coordinates": 3}, "num_batches × coordinates >= 100"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, match):
    model, dataset, _ = two_directions(2.0)
    args = {"batch_sizes": [4], "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        tail_index_profile(model, dataset, collate, [model.w], args.pop("batch_sizes"), **args)
