"""The noise model: exact coupling first, then the geometry of ξ = V·coef."""

from __future__ import annotations

import pytest
import torch

from hf_levy import sample_symmetric_stable
from hf_levy._rng import step_generator
from hf_levy.noise import (
    curvature_weights,
    isotropic_noise,
    noise_coefficients,
    step_noise,
)


def test_coefficients_couple_exactly_across_scales():
    scales = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    unit = noise_coefficients(
        torch.ones(3, dtype=torch.float64), 1.5, step_generator(0, 5), clip=None, max_norm=None
    ).coef_K
    scaled = noise_coefficients(scales, 1.5, step_generator(0, 5), clip=None, max_norm=None).coef_K
    torch.testing.assert_close(scaled, scales * unit, rtol=1e-12, atol=0)


def test_coefficients_are_the_sampler_draws_times_the_scales():
    scales = torch.tensor([2.0, 0.25], dtype=torch.float64)
    coef = noise_coefficients(scales, 1.2, step_generator(3, 9), clip=None, max_norm=None).coef_K
    z = sample_symmetric_stable((2,), 1.2, generator=step_generator(3, 9), dtype=torch.float64)
    torch.testing.assert_close(coef, scales * z, rtol=1e-12, atol=0)


def test_step_generator_depends_only_on_seed_and_step():
    draw = lambda seed, step: torch.rand(4, generator=step_generator(seed, step))  # noqa: E731
    assert torch.equal(draw(1, 2), draw(1, 2))
    assert not torch.equal(draw(1, 2), draw(1, 3))
    assert not torch.equal(draw(1, 2), draw(2, 2))
    assert not torch.equal(draw(1, 2), draw(2, 1))


def test_clip_bounds_each_draw_and_cap_bounds_the_norm():
    scales = torch.full((64,), 2.0, dtype=torch.float64)
    clipped = noise_coefficients(scales, 0.5, step_generator(0, 0), clip=3.0, max_norm=None).coef_K
    assert (clipped.abs() <= 6.0 + 1e-12).all() and (clipped.abs() == 6.0).any()
    capped = noise_coefficients(scales, 0.5, step_generator(0, 0), clip=None, max_norm=1.0).coef_K
    torch.testing.assert_close(capped.norm(), torch.tensor(1.0, dtype=torch.float64))
    free = noise_coefficients(scales, 0.5, step_generator(0, 0), clip=None, max_norm=None).coef_K
    torch.testing.assert_close(
        capped, free / free.norm(), rtol=1e-12, atol=0
    )  # the cap rescales, keeps direction


def test_curvature_weights_follow_root_curvature():
    w = curvature_weights(torch.tensor([9.0, 4.0, 0.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=torch.float64) / 13**0.5)
    uniform = curvature_weights(torch.tensor([-1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(uniform, torch.full((2,), 2**-0.5, dtype=torch.float64))


def test_isotropic_noise_has_the_requested_norm_and_is_spread_over_all_coordinates():
    xi = isotropic_noise(10_000, 3.0, 1.5, step_generator(0, 1), clip=10.0)
    torch.testing.assert_close(xi.double().norm(), torch.tensor(3.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert (xi != 0).float().mean() > 0.99
    # the same stream draws the same vector, and its coordinates are the sampler's draws up to one factor
    z = sample_symmetric_stable((10_000,), 1.5, generator=step_generator(0, 1), dtype=torch.float32).clamp(
        -10, 10
    )
    torch.testing.assert_close(xi, z * (3.0 / z.double().norm()).float(), rtol=1e-6, atol=1e-9)


def test_draw_reports_the_clipped_draws_and_whether_the_cap_bound():
    scales = torch.tensor([2.0, 1.0, 0.5, 0.25, 1.0, 3.0], dtype=torch.float64)
    for seed in range(20):
        z = sample_symmetric_stable((6,), 0.9, generator=step_generator(seed, 4), dtype=torch.float64)
        clipped = z.clamp(-2.0, 2.0)
        free_norm = float((scales * clipped).norm())
        draw = noise_coefficients(scales, 0.9, step_generator(seed, 4), clip=2.0, max_norm=3.0)
        assert draw.num_clipped == int((z.abs() > 2.0).sum()) and draw.num_draws == 6
        assert draw.capped == (free_norm > 3.0)
        expected = scales * clipped * (min(1.0, 3.0 / free_norm))
        torch.testing.assert_close(draw.coef_K, expected, rtol=1e-12, atol=0)
    off = noise_coefficients(scales, 0.9, step_generator(0, 4), clip=None, max_norm=None)
    assert off.num_clipped == 0 and not off.capped


def test_step_noise_is_a_pure_function_of_its_inputs():
    values = torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64)
    settings = dict(levy_scale=0.5, scale_mode="relative", alpha=1.3, clip=10.0, max_noise_ratio=2.0)
    first = step_noise(3.0, values, step_generator(1, 7), **settings)
    again = step_noise(3.0, values.clone(), step_generator(1, 7), **settings)
    assert torch.equal(first.coef_K, again.coef_K) and (first.num_clipped, first.capped) == (
        again.num_clipped,
        again.capped,
    )


def test_step_noise_scales_follow_the_formula_in_each_mode():
    values = torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64)
    z = sample_symmetric_stable((3,), 1.3, generator=step_generator(1, 7), dtype=torch.float64).clamp(-10, 10)
    weights = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) / 5**0.5  # √λ⁺ / ‖√λ⁺‖
    common = dict(alpha=1.3, clip=10.0, max_noise_ratio=None)
    relative = step_noise(3.0, values, step_generator(1, 7), levy_scale=0.5, scale_mode="relative", **common)
    torch.testing.assert_close(relative.coef_K, 0.5 * 3.0 * weights * z, rtol=1e-12, atol=0)
    absolute = step_noise(3.0, values, step_generator(1, 7), levy_scale=0.5, scale_mode="absolute", **common)
    torch.testing.assert_close(absolute.coef_K, 0.5 * weights * z, rtol=1e-12, atol=0)
    # calibrated: its own scales and α per direction, shrunk by what clipping kept of the gradient (3 of 4);
    # without a pre-clip norm (no clipping, max_grad_norm=0) nothing shrinks them
    scales, alphas = (
        torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64),
        torch.full((3,), 1.3, dtype=torch.float64),
    )
    for pre_clip_norm, shrink in ((4.0, 0.75), (None, 1.0)):
        calibrated = step_noise(
            3.0,
            values,
            step_generator(1, 7),
            levy_scale=2.0,
            scale_mode="relative",
            calibrated_scale_K=scales,
            calibrated_alpha_K=alphas,
            pre_clip_norm=pre_clip_norm,
            **common,
        )
        torch.testing.assert_close(calibrated.coef_K, 2.0 * shrink * scales * z, rtol=1e-12, atol=0)
    capped = step_noise(
        3.0,
        values,
        step_generator(1, 7),
        levy_scale=50.0,
        scale_mode="relative",
        **{**common, "max_noise_ratio": 0.1},
    )
    assert capped.capped and abs(float(capped.coef_K.norm()) - 0.3) < 1e-12


def test_isotropic_noise_of_heavy_tails_without_clip_keeps_its_norm_where_float32_squares_overflow():
    # alpha = 0.3 unclipped over 1e6 coordinates: the largest draws square far beyond float32's 3.4e38, so the
    # norm must be summed in float64 (a float32 sum is inf and turns the noise into zeros).
    n = 1_000_000
    xi = isotropic_noise(n, 3.0, 0.3, step_generator(0, 2), clip=None)
    z = sample_symmetric_stable((n,), 0.3, generator=step_generator(0, 2), dtype=torch.float32).double()
    assert z.square().max() > torch.finfo(torch.float32).max  # the case is real: float32 squares overflow
    assert xi.dtype == torch.float32 and torch.isfinite(xi).all()
    assert xi.double().norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(xi.double(), z * (3.0 / z.norm()), rtol=1e-5, atol=1e-30)


def test_isotropic_noise_sums_its_squared_norm_through_reduce():
    # Under FSDP each rank holds a piece: the norm is over all pieces, the sum of squares passing through reduce.
    calls = []

    def reduce(t):
        calls.append(t.dtype)
        return t * 4  # as if three more ranks held pieces of the same size

    xi = isotropic_noise(1000, 2.0, 1.5, step_generator(1, 1), clip=10.0, reduce=reduce)
    assert calls == [torch.float64]
    assert xi.double().norm().item() == pytest.approx(2.0 / 2, rel=1e-6)
