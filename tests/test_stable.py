"""Tests of hf_levy.stable: exact coupling first, then statistics against independent ground truths.

Ground truths: the closed-form characteristic function exp(-|scale·t|^alpha), scipy's Cauchy and
normal laws, and scipy.stats.levy_stable (default S1 parametrization, which with beta = 0 has the
same characteristic function; test_scipy_levy_stable_has_our_parametrization pins that down).
"""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from hf_levy.stable import (
    alpha_from_log_moments,
    estimate_stable_scale,
    estimate_tail_index,
    estimate_tail_index_log_moments,
    sample_symmetric_stable,
    scale_from_log_moments,
)

ALPHAS = [0.5, 1.0, 1.5, 2.0]
TS = [0.1, 0.3, 0.7, 1.5]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ecf_error(x: torch.Tensor, alpha: float, scale: float) -> float:
    """Largest |mean cos(tX) − exp(−|scale·t|^alpha)| over TS (t in units of 1/scale)."""
    x = x.double()
    return max(abs(torch.cos(t / scale * x).mean().item() - math.exp(-(t**alpha))) for t in TS)


# ECF means of |cos| <= 1 over n = 200k have sd <= 0.0016; 0.01 is ~6 sd, yet far below what a
# wrong law gives (see test_ecf_tolerance_rejects_wrong_laws).
N_ECF, ECF_TOL = 200_000, 0.01


# ---------------------------------------------------------------- exact coupling and RNG hygiene
@pytest.mark.parametrize("alpha", ALPHAS)
def test_scale_is_an_exact_multiplier_under_a_shared_seed(alpha):
    unit = sample_symmetric_stable(10_000, alpha, generator=gen(3))
    scaled = sample_symmetric_stable(10_000, alpha, 2.5, generator=gen(3))
    torch.testing.assert_close(scaled, 2.5 * unit, rtol=1e-6, atol=0)


def test_same_seed_is_bitwise_identical_and_other_seeds_differ():
    a = sample_symmetric_stable((50, 7), 1.3, 0.4, generator=gen(11))
    b = sample_symmetric_stable((50, 7), 1.3, 0.4, generator=gen(11))
    c = sample_symmetric_stable((50, 7), 1.3, 0.4, generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_untouched_when_a_generator_is_given():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for alpha in ALPHAS + [torch.tensor([0.8, 1.0, 2.0])]:
        sample_symmetric_stable((100, 3), alpha, generator=gen())
    assert torch.equal(torch.get_rng_state(), before)


def test_without_a_generator_the_default_generator_is_used():
    torch.manual_seed(5)
    a = sample_symmetric_stable(100, 1.5)
    torch.manual_seed(5)
    assert torch.equal(a, sample_symmetric_stable(100, 1.5))


# ---------------------------------------------------------------- the law
def test_scipy_levy_stable_has_our_parametrization():
    assert scipy.stats.levy_stable.parameterization == "S1"
    x = torch.from_numpy(scipy.stats.levy_stable.rvs(1.3, 0, scale=0.6, size=N_ECF, random_state=7))
    assert ecf_error(x, 1.3, 0.6) < ECF_TOL


@pytest.mark.parametrize("alpha", ALPHAS)
def test_empirical_characteristic_function_matches(alpha):
    x = sample_symmetric_stable(N_ECF, alpha, 1.7, generator=gen(1))
    err = ecf_error(x, alpha, 1.7)
    assert err < ECF_TOL, f"alpha={alpha}: ECF off by {err:.4f} (tolerance {ECF_TOL})"


def test_ecf_tolerance_rejects_wrong_laws():
    # The N(0, scale²) convention (off by √2 from ours at alpha = 2) ...
    normal = torch.from_numpy(scipy.stats.norm.rvs(size=N_ECF, random_state=0))
    assert ecf_error(normal, 2.0, 1.0) > 5 * ECF_TOL
    # ... and a swapped alpha are both far outside the tolerance.
    x = sample_symmetric_stable(N_ECF, 1.5, generator=gen(2))
    assert ecf_error(x, 0.5, 1.0) > 5 * ECF_TOL


def test_alpha_one_matches_cauchy_quantiles():
    n, s = N_ECF, 0.8
    x = sample_symmetric_stable(n, 1.0, s, generator=gen(4), dtype=torch.float64).numpy()
    law = scipy.stats.cauchy(scale=s)
    for p in [0.05, 0.25, 0.5, 0.75, 0.95]:
        q = law.ppf(p)
        sd = math.sqrt(p * (1 - p) / n) / law.pdf(q)  # asymptotic sd of the sample quantile
        assert abs(np.quantile(x, p) - q) < 6 * sd, f"p={p}: {np.quantile(x, p)} vs {q} (sd {sd:.4f})"


def test_alpha_two_is_gaussian_with_variance_two_scale_squared():
    s = 1.3
    x = sample_symmetric_stable(N_ECF, 2.0, s, generator=gen(5), dtype=torch.float64)
    assert x.var().item() == pytest.approx(2 * s**2, rel=0.02)
    assert scipy.stats.kstest(x.numpy(), scipy.stats.norm(scale=math.sqrt(2) * s).cdf).pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("alpha", "wrong_alpha"), [(0.7, 1.2), (1.3, 0.8), (1.8, 1.2)])
def test_ks_against_scipy_levy_stable(alpha, wrong_alpha):
    x = sample_symmetric_stable(2000, alpha, 0.8, generator=gen(0), dtype=torch.float64).numpy()
    right = scipy.stats.kstest(x, scipy.stats.levy_stable(alpha, 0, scale=0.8).cdf).pvalue
    wrong = scipy.stats.kstest(x, scipy.stats.levy_stable(wrong_alpha, 0, scale=0.8).cdf).pvalue
    assert right > 1e-3, f"alpha={alpha}: KS p-value {right:.2e} against its own law"
    assert wrong < 1e-3, f"alpha={alpha}: KS p-value {wrong:.2e} against alpha={wrong_alpha}"


def test_per_element_alpha_and_scale_follow_their_own_laws():
    alphas, scales = [0.8, 1.0, 2.0], [0.5, 1.0, 2.0]
    x = sample_symmetric_stable((N_ECF, 3), torch.tensor(alphas), torch.tensor(scales), generator=gen(6))
    for j, (a, s) in enumerate(zip(alphas, scales, strict=True)):
        err = ecf_error(x[:, j], a, s)
        assert err < ECF_TOL, f"column {j} (alpha={a}, scale={s}): ECF off by {err:.4f}"
        # Every element consumes the same uniforms whatever its alpha, so a column equals the
        # scalar-alpha draw from the same seed (up to float rounding of (1−α)/α).
        col = sample_symmetric_stable((N_ECF, 3), a, s, generator=gen(6))[:, j]
        torch.testing.assert_close(x[:, j], col, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- finiteness and dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_heavy_tails_stay_finite_in_every_dtype(alpha, dtype):
    x = sample_symmetric_stable(1_000_000, alpha, generator=gen(7), dtype=dtype)
    assert x.dtype == dtype
    assert torch.isfinite(x).all()
    if dtype == torch.float16:  # alpha < 1 overflows float16 in 1e6 draws: the clamp was exercised
        assert x.abs().max().item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extreme_uniforms_give_finite_samples(monkeypatch, dtype):
    # Feed the endpoints of [0, 1) (u = 0 gives V = −π/2 and W = 0) and their neighbours directly.
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    edges = torch.tensor([0.0, eps, 0.5, 1 - eps, 1 - eps / 2], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(edges, edges, indexing="ij")).reshape(2, -1)

    def fake_rand(size, *, generator=None, dtype=None, device=None):
        return grid.to(dtype).clone()

    monkeypatch.setattr(torch, "rand", fake_rand)
    mixed = torch.tensor([0.3, 1.0, 2.0, 1.5, 0.7]).repeat(5)  # every grid point meets each alpha
    for alpha in [0.1, 0.5, 1.0, 1.5, 2.0, mixed]:
        for scale in [0.0, 1.0, 1e30]:
            x = sample_symmetric_stable(grid.shape[1], alpha, scale, dtype=dtype)
            assert torch.isfinite(x).all(), f"alpha={alpha}, scale={scale}: {x}"
            # sign(X) = sign(sin(αV)) = sign(V) since α|V| < π: V must stay inside (−π/2, π/2).
            assert (torch.sign(x.double()) * torch.sign(grid[0] - 0.5) >= 0).all(), f"alpha={alpha}: {x}"


def test_dtype_device_and_shape_are_respected():
    x = sample_symmetric_stable((4, 5), 1.5, generator=gen(), dtype=torch.bfloat16, device="cpu")
    assert (x.shape, x.dtype, x.device.type) == ((4, 5), torch.bfloat16, "cpu")
    assert sample_symmetric_stable(6, 1.5, generator=gen()).shape == (6,)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert sample_symmetric_stable(3, 1.5, generator=gen()).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert sample_symmetric_stable(3, 1.5, generator=gen()).dtype == previous


@pytest.mark.parametrize("alpha", [0, -1, 2.5, 2.0000001, math.nan, math.inf, torch.tensor([1.5, 2.5])])
def test_bad_alpha_raises_naming_it(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 2\]"):
        sample_symmetric_stable(3, alpha, generator=gen())


@pytest.mark.parametrize("scale", [-1.0, math.inf, math.nan, torch.tensor([1.0, -0.5])])
def test_bad_scale_raises_naming_it(scale):
    with pytest.raises(ValueError, match=r"scale must be finite and >= 0"):
        sample_symmetric_stable(3, 1.5, scale, generator=gen())


def test_bad_dtype_shape_and_device_raise():
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        sample_symmetric_stable(3, 1.5, dtype=torch.int64)
    with pytest.raises(ValueError, match="alpha of shape"):
        sample_symmetric_stable((4, 3), torch.tensor([1.5, 1.2]), generator=gen())
    with pytest.raises(ValueError, match="generator's device"):
        sample_symmetric_stable(3, 1.5, generator=gen(), device="meta")


# ---------------------------------------------------------------- estimators
N_EST = 250_000  # block-sum sd of alpha-hat is ~0.03 at alpha = 1.8 here; the tolerance is 0.1


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8])
def test_tail_index_recovers_alpha_of_scipy_samples(alpha):
    x = scipy.stats.levy_stable.rvs(alpha, 0, scale=0.3, size=N_EST, random_state=1)
    assert estimate_tail_index(x) == pytest.approx(alpha, abs=0.1)
    assert estimate_tail_index_log_moments(x) == pytest.approx(alpha, abs=0.1)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8])
def test_tail_index_recovers_alpha_of_our_samples(alpha):
    x = sample_symmetric_stable(N_EST, alpha, 2.0, generator=gen(8), dtype=torch.float64)
    assert estimate_tail_index(x) == pytest.approx(alpha, abs=0.1)


def test_tail_index_of_gaussian_samples_is_about_two():
    x = torch.randn(N_EST, generator=gen(9))
    assert estimate_tail_index(x) == pytest.approx(2.0, abs=0.1)
    assert estimate_tail_index_log_moments(x) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize(
    "estimator", [estimate_tail_index, estimate_tail_index_log_moments, estimate_stable_scale]
)
def test_estimators_reject_too_few_or_non_finite_samples(estimator):
    with pytest.raises(ValueError, match=r"at least 100 samples, got n=99; collect more"):
        estimator(torch.randn(99))
    bad = torch.randn(1000)
    bad[3] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        estimator(bad)


def test_tail_index_is_infinite_when_block_sums_do_not_grow():
    # ±1 alternating: every |X_i| = 1 and every block sum of K1 = 31 (odd) samples is ±1, so
    # mean log|Y| − mean log|X| = 0: no growth at all, which the estimator reports as α̂ = inf.
    samples = (-1.0) ** np.arange(1000)
    assert estimate_tail_index(samples) == math.inf


def test_tail_index_rejects_all_zero_samples():
    with pytest.raises(ValueError, match="all samples are zero"):
        estimate_tail_index(np.zeros(1000))


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8, 2.0])
def test_scale_is_recovered_with_alpha_given_or_estimated(alpha):
    sigma = 0.3
    x = scipy.stats.levy_stable.rvs(alpha, 0, scale=sigma, size=N_EST, random_state=2)
    assert estimate_stable_scale(x, alpha) == pytest.approx(sigma, rel=0.05)
    assert estimate_stable_scale(x) == pytest.approx(sigma, rel=0.10)


def test_scale_rejects_bad_alpha():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 2\], got 3.0"):
        estimate_stable_scale(np.ones(200), alpha=3.0)


# ---------------------------------------------------------------- log-moment formulas against closed forms
def log_moments_by_quadrature(pdf) -> tuple[float, float]:
    """E log|X| and Var log|X| of a symmetric density, by numerical integration over (0, inf)."""
    mean = 2 * scipy.integrate.quad(lambda x: math.log(x) * pdf(x), 0, np.inf, limit=200)[0]
    second = 2 * scipy.integrate.quad(lambda x: math.log(x) ** 2 * pdf(x), 0, np.inf, limit=200)[0]
    return mean, second - mean**2


@pytest.mark.parametrize(
    ("alpha", "law"),
    [(2.0, scipy.stats.norm(scale=math.sqrt(2) * 0.7)), (1.0, scipy.stats.cauchy(scale=0.7))],
    ids=["gaussian", "cauchy"],
)
def test_log_moment_formulas_invert_the_integrated_moments_of_known_laws(alpha, law):
    # SαS(2, 0.7) is N(0, 2·0.7²) and SαS(1, 0.7) is Cauchy(0.7): their log-moments by quadrature, fed to the
    # formulas, must give back alpha and the scale to integration accuracy (Euler's constant 0.5 instead of
    # 0.5772 would be 4% off at alpha = 2).
    mean, var = log_moments_by_quadrature(law.pdf)
    got_alpha = alpha_from_log_moments(torch.tensor(var, dtype=torch.float64)).item()
    got_scale = scale_from_log_moments(torch.tensor(mean, dtype=torch.float64), alpha).item()
    assert got_alpha == pytest.approx(alpha, rel=1e-7)
    assert got_scale == pytest.approx(0.7, rel=1e-7)


def test_scale_and_alpha_estimates_below_alpha_one_are_unbiased_to_a_few_percent():
    # alpha = 0.6 (heavier than Cauchy): the Euler-constant term is largest here, gamma·(1/alpha − 1) = 0.38.
    # n = 250k gives sd 0.5% on the scale and 0.01 on alpha; the tolerances sit at 3 sd.
    x = scipy.stats.levy_stable.rvs(0.6, 0, scale=0.3, size=N_EST, random_state=3)
    assert estimate_stable_scale(x, 0.6) == pytest.approx(0.3, rel=0.015)
    assert estimate_tail_index_log_moments(x) == pytest.approx(0.6, abs=0.03)
    assert estimate_tail_index(x) == pytest.approx(0.6, abs=0.1)


def test_tail_index_accepts_any_sample_count_and_ignores_the_remainder():
    # 250,123 samples are 500 blocks of 500 plus 123 left over (not a perfect square).
    x = sample_symmetric_stable(N_EST + 123, 1.5, generator=gen(10), dtype=torch.float64)
    assert estimate_tail_index(x) == pytest.approx(1.5, abs=0.1)
    assert estimate_tail_index(x) == estimate_tail_index(x[:N_EST])  # the 123 beyond 500 x 500 are dropped


def test_a_few_exact_zeros_among_the_samples_barely_move_the_estimates():
    # Quantized data holds exact zeros; log|0| = -inf must not swamp the means (they are floored at the tiniest
    # float64, about -708, a 1e-4 shift of the mean log|X| for 30 zeros among 250k).
    x = sample_symmetric_stable(N_EST, 1.5, generator=gen(11), dtype=torch.float64)
    zeroed = x.clone()
    zeroed[:30] = 0.0
    assert estimate_tail_index(zeroed) == pytest.approx(estimate_tail_index(x), abs=0.05)
    assert math.isfinite(estimate_tail_index_log_moments(zeroed))
    assert estimate_stable_scale(zeroed, 1.5) == pytest.approx(estimate_stable_scale(x, 1.5), rel=0.1)


def test_estimators_accept_exactly_the_minimum_sample_count():
    x = torch.randn(100, generator=gen(12))
    for estimator in (estimate_tail_index, estimate_tail_index_log_moments, estimate_stable_scale):
        assert math.isfinite(estimator(x))


def textbook_cms(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """Chambers–Mallows–Stuck (1976) as printed, from uniforms u (2, n): V = π(u0 − ½), W = −log(1 − u1)."""
    v, w = math.pi * (u[0] - 0.5), -torch.log1p(-u[1])
    if alpha == 1:
        return torch.tan(v)
    return (
        torch.sin(alpha * v)
        / torch.cos(v) ** (1 / alpha)
        * (torch.cos((1 - alpha) * v) / w) ** ((1 - alpha) / alpha)
    )


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.3, 1.9])
def test_float64_draws_are_the_textbook_formula_of_the_generator_uniforms(alpha):
    u = torch.rand((2, 10_000), generator=gen(13), dtype=torch.float64)
    x = sample_symmetric_stable(10_000, alpha, 0.5, generator=gen(13), dtype=torch.float64)
    torch.testing.assert_close(x, 0.5 * textbook_cms(u, alpha), rtol=1e-9, atol=1e-300)
    gaussian = sample_symmetric_stable(10_000, 2.0, generator=gen(13), dtype=torch.float64)
    box_muller = 2 * torch.sin(math.pi * (u[0] - 0.5)) * torch.sqrt(-torch.log1p(-u[1]))
    torch.testing.assert_close(gaussian, box_muller, rtol=1e-12, atol=1e-300)
