"""Tests of hf_levy.calibration against closed forms.

Ground truth: the least squares of tests/least_squares.py at its minimizer, residuals drawn i.i.d.
SαS(α, σ) by scipy.stats.levy_stable (whose default S1 parametrization is ours, see test_stable.py):
the projection of a micro-batch gradient on q_k is −(s_k/b) Σ_j ε_jk, exactly SαS(α, σ·s_k·b^{1/α−1}).
"""

import functools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from least_squares import LeastSquares, features, optimum, orthonormal_directions
from torch import nn

from hf_levy import _rng
from hf_levy._rng import step_generator
from hf_levy.calibration import (
    DirectionalNoise,
    calibrate_to_virtual_batch,
    fit_directional_noise,
    injected_scale,
    microbatch_projections,
    variance_share,
)
from hf_levy.params import ParameterSpace
from hf_levy.stable import sample_symmetric_stable

P, K, SIGMA = 6, 3, 0.8
S_K = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)


def problem(alpha: float, num_batches: int, batch_size: int, seed: int = 0):
    """The model at w*, the micro-batches and their residuals ε (M, b, K)."""
    q = orthonormal_directions(P, K)
    w_star = optimum(P)
    rng = np.random.default_rng(seed)
    eps = torch.from_numpy(
        scipy.stats.levy_stable.rvs(
            alpha, 0.0, scale=SIGMA, size=(num_batches, batch_size, K), random_state=rng
        )
    )
    x = features(S_K, q).expand(batch_size, K, P)
    batches = [{"features": x, "targets": x @ w_star + e} for e in eps]
    return LeastSquares(w_star), batches, q, eps


def batch_scale(alpha: float, batch_size: int) -> torch.Tensor:
    """The closed-form SαS scale of the projections: σ·s_k·b^{1/α−1}."""
    return SIGMA * S_K * batch_size ** (1 / alpha - 1)


# ---------------------------------------------------------------- microbatch_projections
def test_projections_equal_the_closed_form_gradient_exactly():
    model, batches, q, eps = problem(1.5, num_batches=40, batch_size=4)
    proj = microbatch_projections(model, batches, [model.w], q)
    expected = -(S_K / 4) * eps.sum(1)  # −(s_k/b) Σ_j ε_jk
    assert proj.num_gradients == 40
    assert proj.values_MK.dtype == torch.float64 and proj.values_MK.shape == (40, K)
    torch.testing.assert_close(proj.values_MK, expected, rtol=1e-9, atol=1e-9)


def test_projections_leave_mode_grad_and_global_rng_untouched_and_turn_dropout_off():
    model, batches, q, eps = problem(2.0, num_batches=4, batch_size=4)
    model = LeastSquares(model.w.detach(), dropout=0.5).train()
    model.w.grad = torch.full_like(model.w, 7.0)
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    proj = microbatch_projections(model, batches, [model.w], q)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training and model.dropout.training
    assert torch.equal(model.w.grad, torch.full_like(model.w, 7.0))
    # with dropout active the projections would not be the closed form
    torch.testing.assert_close(proj.values_MK, -(S_K / 4) * eps.sum(1), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- fit_directional_noise
# M = 2048 keeps the worst error across these seeds at half the tolerances (α: 0.075 of 0.15; scale:
# 6 % of 15 %); at M = 1024 the scale error reached 10 %.
FIT_M, FIT_B = 2048, 8


@functools.cache
def fitted(alpha: float) -> DirectionalNoise:
    model, batches, q, _ = problem(alpha, num_batches=FIT_M, batch_size=FIT_B, seed=int(alpha * 10))
    return fit_directional_noise(microbatch_projections(model, batches, [model.w], q).values_MK)


@pytest.mark.parametrize("alpha", [1.3, 1.7, 2.0])
def test_fit_recovers_alpha_and_batch_scale_along_known_directions(alpha):
    fit = fitted(alpha)
    expected = batch_scale(alpha, FIT_B)
    alpha_err = (fit.alpha_K - alpha).abs()
    scale_err = (fit.scale_K / expected - 1).abs()
    assert (alpha_err < 0.15).all(), (
        f"alpha {alpha}: fitted {fit.alpha_K.tolist()}, errors {alpha_err.tolist()}"
    )
    assert (scale_err < 0.15).all(), (
        f"alpha {alpha}: scale fitted {fit.scale_K.tolist()}, closed form {expected.tolist()}, "
        f"relative errors {scale_err.tolist()}"
    )


def test_gaussian_batch_scaling_would_miss_the_scale_tolerance():
    # The fit is within 15 % of σ s_k b^{1/α−1} (previous test); the Gaussian rule σ s_k b^{-1/2}
    # is 1.75× smaller at α = 1.3, b = 8, so the tolerance tells the two rules apart.
    fit = fitted(1.3)
    gaussian_rule = SIGMA * S_K * FIT_B**-0.5
    assert ((fit.scale_K / gaussian_rule - 1).abs() > 0.15).all(), fit.scale_K / gaussian_rule


def test_fit_with_alpha_given_fits_only_the_scale():
    x = sample_symmetric_stable(
        (1024, 4), 1.4, 2.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    fit = fit_directional_noise(x, alpha=1.4)
    assert torch.equal(fit.alpha_K, torch.full((4,), 1.4, dtype=torch.float64))
    assert ((fit.scale_K / 2.0 - 1).abs() < 0.1).all(), fit.scale_K


def test_fit_is_location_invariant_and_scale_equivariant():
    x = sample_symmetric_stable((64, 5), 1.6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = fit_directional_noise(x)
    moved = fit_directional_noise(-3.0 * x + torch.arange(5.0, dtype=torch.float64) * 1e3)
    torch.testing.assert_close(moved.alpha_K, base.alpha_K, rtol=1e-6, atol=0)
    torch.testing.assert_close(moved.scale_K, 3.0 * base.scale_K, rtol=1e-6, atol=0)


def test_fit_with_alpha_two_given_takes_the_gaussian_scale():
    # N(0, σ²) is SαS(2, σ/√2): α = 2 is a valid value to fix, and the scale is fitted at it.
    x = 0.3 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fit = fit_directional_noise(x, alpha=2.0)
    assert torch.equal(fit.alpha_K, torch.full((2,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(
        fit.scale_K, torch.full((2,), 0.3 / 2**0.5, dtype=torch.float64), rtol=0.05, atol=0
    )


def test_fit_clips_alpha_into_range_unless_asked_for_raw():
    x = sample_symmetric_stable(
        (256, 2), 2.0, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    heavy = sample_symmetric_stable(
        (256, 1), 0.3, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    fit = fit_directional_noise(torch.cat([x, heavy], 1))
    assert ((fit.alpha_K >= 0.5) & (fit.alpha_K <= 2.0)).all()
    assert fit.alpha_K[2] == 0.5
    raw = fit_directional_noise(torch.cat([x, heavy], 1), clip_alpha=False)
    assert raw.alpha_K[2] < 0.5 and raw.alpha_K[:2].max() > 2.0  # a Gaussian sample may exceed 2


def test_constant_column_gets_zero_scale():
    x = torch.ones(40, 2, dtype=torch.float64)
    x[:, 1] = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_directional_noise(x)
    assert isinstance(fit, DirectionalNoise)
    assert fit.scale_K[0] == 0 and fit.alpha_K[0] == 2.0 and fit.scale_K[1] > 0


# ---------------------------------------------------------------- injected_scale
TS = (0.3, 0.7, 1.0, 1.5)  # in units of 1/c_b
N_ECF, ECF_TOL = 200_000, 0.01  # ECF sd <= 1/sqrt(2n) = 0.0016; 0.01 is 6 sd


def composed_ecf_error(alpha: float, c_inj: float, c_b: float, b: int, big_b: int, seed: int) -> float:
    """max_t |ECF(batch-B noise + injected) − exp(−|c_b t|^α)|, the batch-B noise drawn as the mean of
    B/b independent batch-b draws (so no scaling rule is assumed for it)."""
    g = torch.Generator().manual_seed(seed)
    batch_b = sample_symmetric_stable((N_ECF, big_b // b), alpha, c_b, generator=g, dtype=torch.float64)
    total = batch_b.mean(1) + sample_symmetric_stable(N_ECF, alpha, c_inj, generator=g, dtype=torch.float64)
    return max(abs(torch.cos(t / c_b * total).mean().item() - math.exp(-(t**alpha))) for t in TS)


@pytest.mark.parametrize("alpha", [1.3, 1.7, 2.0])
def test_batch_b_scale_is_restored_by_composing_batch_big_b_noise_with_the_injection(alpha):
    c_b, b, big_b = 0.7, 4, 64
    c_inj = injected_scale(torch.tensor([c_b]), alpha, b, big_b).item()
    err = composed_ecf_error(alpha, c_inj, c_b, b, big_b, seed=int(alpha * 10))
    assert err < ECF_TOL, f"alpha {alpha}: ECF off by {err:.4f} (c_inj={c_inj:.4f})"


def test_gaussian_composition_rule_would_miss_the_ecf_tolerance():
    c_b, b, big_b, alpha = 0.7, 4, 64, 1.3
    gaussian_c_inj = c_b * math.sqrt(1 - b / big_b)
    assert composed_ecf_error(alpha, gaussian_c_inj, c_b, b, big_b, seed=1) > 5 * ECF_TOL


def test_injected_scale_special_cases():
    c = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # full batch: the gradient has no noise of its own, inject all of it
    torch.testing.assert_close(injected_scale(c, torch.tensor([1.5, 1.0]), 8, None), c)
    # ... in the broadcast shape of the scales and the alphas
    torch.testing.assert_close(
        injected_scale(0.5, torch.tensor([1.5, 1.0]), 8, None), torch.full((2,), 0.5, dtype=torch.float64)
    )
    # α = 1: a mean of Cauchy draws does not shrink, α < 1 it grows: nothing to add
    assert torch.equal(injected_scale(c, 1.0, 8, 64), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(injected_scale(c, 0.7, 8, 64), torch.zeros(2, dtype=torch.float64))
    # α = 2: variances add, c_inj² = c_b² (1 − b/B)
    torch.testing.assert_close(injected_scale(c, 2.0, 8, 64), c * math.sqrt(1 - 8 / 64))
    # per-direction alphas broadcast against per-direction scales
    both = injected_scale(c, torch.tensor([2.0, 1.0]), 8, 64)
    torch.testing.assert_close(both, torch.tensor([0.5 * math.sqrt(7 / 8), 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- bad inputs
def test_virtual_batch_not_smaller_than_physical_is_rejected_naming_both():
    with pytest.raises(ValueError, match=r"virtual_batch_size=64 .*physical_batch_size=64"):
        injected_scale(torch.ones(2), 1.5, 64, 64)


@pytest.mark.parametrize(
    "args, name",
    [
        ((torch.tensor([-1.0]), 1.5, 4, 8), "scale_b_K"),
        ((torch.tensor([float("nan")]), 1.5, 4, 8), "scale_b_K"),
        ((torch.tensor([math.inf]), 1.5, 4, 8), "scale_b_K"),
        ((torch.ones(1), 2.5, 4, 8), "alpha_K"),
        ((torch.ones(1), 0.0, 4, 8), "alpha_K"),
        ((torch.ones(1), 1.5, 0, 8), "virtual_batch_size"),
        ((torch.ones(1), 1.5, 4, 8.0), "physical_batch_size"),
    ],
)
def test_injected_scale_rejects_bad_inputs_naming_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        injected_scale(*args)


def test_fit_rejects_bad_inputs_naming_the_argument():
    x = torch.randn(64, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="projections_MK must be a 2-D"):
        fit_directional_noise(x[:, 0])
    with pytest.raises(ValueError, match="projections_MK has M=31"):
        fit_directional_noise(x[:31])
    with pytest.raises(ValueError, match="projections_MK has 1 non-finite"):
        fit_directional_noise(torch.cat([x, torch.tensor([[math.inf, 0.0]])]))
    with pytest.raises(ValueError, match="alpha must be in"):
        fit_directional_noise(x, alpha=2.5)


def test_projections_reject_bad_inputs_naming_the_argument():
    model, batches, q, _ = problem(2.0, num_batches=2, batch_size=4)
    with pytest.raises(ValueError, match="vectors_PK must have shape"):
        microbatch_projections(model, batches, [model.w], q[:-1])
    with pytest.raises(ValueError, match="batches is empty"):
        microbatch_projections(model, [], [model.w], q)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        microbatch_projections(model, batches, [frozen], q)
    with pytest.raises(ValueError, match="params is empty"):
        microbatch_projections(model, batches, [], q)


def test_a_micro_batch_drawn_twice_ties_whether_or_not_rounding_separates_the_copies():
    # Row 31 repeats row 7: exactly (a tie, dropped), or off by float32 rounding as when the same examples come
    # in another order. Both must fit alike; a log|D| of -19 from the rounding used to move α̂ by ~0.4.
    x = sample_symmetric_stable((32, 3), 1.6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact, rounded = x.clone(), x.clone()
    exact[31] = x[7]
    rounded[31] = x[7] * (1 + 3 * torch.finfo(torch.float32).eps)
    want, got = fit_directional_noise(exact), fit_directional_noise(rounded)
    # The copy's pairs with the other rows move by its 4e-7 relative offset: equal far below the outlier's 0.1-0.4.
    torch.testing.assert_close(got.alpha_K, want.alpha_K, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.scale_K, want.scale_K, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- variance_share
def test_variance_share_equals_the_explicit_ratio_of_centred_sums():
    g = torch.Generator().manual_seed(3)
    grads_MP = torch.randn(50, 20, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 20) + 5.0
    V, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    centred = grads_MP - grads_MP.mean(dim=0)
    want = float((centred @ V).square().sum() / centred.square().sum())
    got = variance_share(grads_MP @ V, float(grads_MP.square().sum()), grads_MP.sum(dim=0))
    assert got == pytest.approx(want, rel=1e-10)
    assert 0 < got < 1


def test_variance_share_is_undefined_when_the_gradients_do_not_vary():
    grads_MP = torch.ones(40, 5, dtype=torch.float64) * torch.arange(5.0, dtype=torch.float64)
    V = torch.eye(5, 2, dtype=torch.float64)
    share = variance_share(grads_MP @ V, float(grads_MP.square().sum()), grads_MP.sum(dim=0))
    assert math.isnan(share)  # 0 / 0: no variance to share, not "none of it in the K directions"


def test_projections_carry_the_variance_share_of_their_directions():
    # Every gradient of this problem lies in span(q): all of its variance is in the 3 directions, and the
    # first two carry the closed-form share of the projections' variances.
    model, batches, q, eps = problem(2.0, num_batches=40, batch_size=4)
    proj = microbatch_projections(model, batches, [model.w], q)
    assert variance_share(proj.values_MK, proj.square_norm_sum, proj.gradient_sum_P) == pytest.approx(
        1.0, rel=1e-9
    )
    expected = -(S_K / 4) * eps.sum(1)  # (M, K) closed-form projections
    per_direction = (expected - expected.mean(dim=0)).square().sum(dim=0)
    two = microbatch_projections(model, batches, [model.w], q[:, :2])
    share = variance_share(two.values_MK, two.square_norm_sum, two.gradient_sum_P)
    assert share == pytest.approx(float(per_direction[:2].sum() / per_direction.sum()), rel=1e-9)


# ---------------------------------------------------------------- the estimator against its explicit formula
def explicit_fit(column: np.ndarray, alpha: float | None = None) -> tuple[float, float]:
    """The documented estimator written out pair by pair: log|x_i − x_j| over the pairs i < j that are not ties
    (|x_i − x_j| > 1e-5 x the column's median absolute deviation), α̂ = (6 Var/π² − 1/2)^(−1/2) clipped into
    [0.5, 2], c = exp(E − γ(1/α − 1)) / 2^(1/α)."""
    tie = 1e-5 * np.median(np.abs(column - np.median(column)))
    logs = [math.log(abs(a - b)) for i, a in enumerate(column) for b in column[i + 1 :] if abs(a - b) > tie]
    mean, var = float(np.mean(logs)), float(np.var(logs, ddof=1))
    if alpha is None:
        bracket = 6 * var / math.pi**2 - 0.5
        alpha = min(max(bracket**-0.5 if bracket > 0 else math.inf, 0.5), 2.0)
    return alpha, math.exp(mean - np.euler_gamma * (1 / alpha - 1)) / 2 ** (1 / alpha)


def test_fit_equals_the_explicit_pairwise_formula():
    x = sample_symmetric_stable(
        (48, 3), 1.4, 0.3, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    fit = fit_directional_noise(x)
    given = fit_directional_noise(x, alpha=1.1)
    for k in range(3):
        alpha, scale = explicit_fit(x[:, k].numpy())
        assert fit.alpha_K[k].item() == pytest.approx(alpha, rel=1e-10)
        assert fit.scale_K[k].item() == pytest.approx(scale, rel=1e-10)
        assert given.scale_K[k].item() == pytest.approx(
            explicit_fit(x[:, k].numpy(), alpha=1.1)[1], rel=1e-10
        )


def test_a_column_mostly_of_one_bf16_value_keeps_its_distinct_pairs():
    # bf16-quantized projections where 40 of 64 micro-batches give the same value: the median absolute deviation
    # is 0, so the tie threshold is 0. Only exactly equal pairs are ties; the 24 other values still fit a scale
    # (dropping nothing, or everything, would give scale 0 and inject no noise along this direction).
    draws = sample_symmetric_stable(
        (64,), 1.5, 0.2, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    column = draws.to(torch.bfloat16).double()
    column[:40] = column[0]
    x = torch.stack([column, draws], dim=1)
    fit = fit_directional_noise(x)
    alpha, scale = explicit_fit(column.numpy())
    assert fit.scale_K[0].item() > 0 and math.isfinite(fit.scale_K[0].item())
    assert fit.alpha_K[0].item() == pytest.approx(alpha, rel=1e-10)
    assert fit.scale_K[0].item() == pytest.approx(scale, rel=1e-10)


def test_scale_below_alpha_one_is_recovered_to_a_few_percent():
    # α = 0.6 puts the most weight on Euler's constant (γ(1/α − 1) = 0.38) and on 2^(1/α) = 3.2: the mean over
    # 32 columns of 512 draws is within 1.6% of the truth on this seed (sd ~1%); γ = 0.5 would give +6.9%.
    x = sample_symmetric_stable(
        (512, 32), 0.6, 2.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    ratio = (fit_directional_noise(x, alpha=0.6).scale_K / 2.0).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.035)


def test_raw_fit_gives_a_flat_column_alpha_two_and_takes_gaussian_scales_at_alpha_two():
    # clip_alpha=False returns α̂ as estimated, but a constant column still gets α = 2 (not inf) and scale 0, and
    # the scale of a column whose α̂ exceeds 2 is taken at α = 2.
    g = torch.Generator().manual_seed(0)
    gaussian = sample_symmetric_stable((256, 2), 2.0, 0.5, generator=g, dtype=torch.float64)[:, 1]
    x = torch.stack([torch.full((256,), 4.0, dtype=torch.float64), gaussian], dim=1)
    raw = fit_directional_noise(x, clip_alpha=False)
    clipped = fit_directional_noise(x)
    assert raw.alpha_K[0].item() == 2.0 and raw.scale_K[0].item() == 0.0
    assert raw.alpha_K[1].item() > 2.0  # this Gaussian sample spreads log|D| a little less than π²/8
    assert clipped.alpha_K[1].item() == 2.0
    assert raw.scale_K[1].item() == pytest.approx(explicit_fit(gaussian.numpy(), alpha=2.0)[1], rel=1e-10)
    assert clipped.scale_K[1].item() == raw.scale_K[1].item()


def test_fit_accepts_exactly_the_minimum_number_of_micro_batches():
    x = sample_symmetric_stable((32, 2), 1.5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fit = fit_directional_noise(x)
    assert torch.isfinite(fit.scale_K).all() and (fit.scale_K > 0).all()


def test_clipped_alpha_is_floored_at_one_half():
    # A column of α = 0.3 draws estimates α̂ < 0.5: the fit floors it there (and takes the scale at 0.5).
    x = sample_symmetric_stable(
        (256, 1), 0.3, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    raw, fit = fit_directional_noise(x, clip_alpha=False), fit_directional_noise(x)
    assert raw.alpha_K.item() < 0.5 and fit.alpha_K.item() == 0.5
    assert fit.scale_K.item() == pytest.approx(explicit_fit(x[:, 0].numpy(), alpha=0.5)[1], rel=1e-10)


# ---------------------------------------------------------------- calibrate_to_virtual_batch (no Trainer)
def test_calibration_draws_its_micro_batches_from_its_stream_and_injects_the_composed_scale():
    # N examples with residuals ε_j (K,): the gradient of micro-batch m at w* projects on q_k as
    # −(s_k/b) Σ_{j in m} ε_jk, so the fitted law is that of the closed-form table of the drawn indices,
    # and the injected scale tops batch B's noise up to batch b's (injected_scale).
    n, b, m, big_b = 200, 4, 40, 64
    q, w_star = orthonormal_directions(P, K), optimum(P)
    eps = torch.from_numpy(
        scipy.stats.levy_stable.rvs(1.5, 0.0, scale=SIGMA, size=(n, K), random_state=np.random.default_rng(3))
    )
    x = features(S_K, q)
    dataset = [{"features": x, "targets": x @ w_star + e} for e in eps]
    collate = lambda rows: {key: torch.stack([r[key] for r in rows]) for key in rows[0]}  # noqa: E731
    model = LeastSquares(w_star)
    space = ParameterSpace([model.w])
    calibrate = lambda **kw: calibrate_to_virtual_batch(  # noqa: E731
        model, dataset, collate, space, q, virtual_batch_size=b, num_microbatches=m, seed=9, step=12, **kw
    )
    noise, share = calibrate(physical_batch_size=big_b)
    indices = torch.randint(n, (m, b), generator=step_generator(9 + _rng.CALIBRATION, 12))
    table = -(S_K / b) * eps[indices].sum(1)  # (M, K)
    fit = fit_directional_noise(table)
    torch.testing.assert_close(noise.alpha_K, fit.alpha_K, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        noise.scale_K, injected_scale(fit.scale_K, fit.alpha_K, b, big_b), rtol=1e-9, atol=0
    )
    assert share == pytest.approx(1.0, rel=1e-9)  # every gradient lies in span(q)
    fixed, _ = calibrate(physical_batch_size=None, alpha=1.2)  # full batch: c_inj = c_b
    assert torch.equal(fixed.alpha_K, torch.full((K,), 1.2, dtype=torch.float64))
    torch.testing.assert_close(
        fixed.scale_K, fit_directional_noise(table, alpha=1.2).scale_K, rtol=1e-9, atol=0
    )
