"""One optimizer step's noise on a LevyRun, without a Trainer: ξ added to .grad against the documented law.

Truth: ξ = V·coef with coef_i = s·u·w_i·clip(z_i), w = √λ⁺/‖√λ⁺‖, u = ‖g‖ ('relative') or 1 ('absolute'),
z the SαS draws of the noise stream of (seed, step), then ‖coef‖ capped at levy_max_noise_ratio·‖g‖.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_run_setup import _args, _loader

from hf_levy import LevyArguments, _rng
from hf_levy._rng import step_generator
from hf_levy._run_setup import start_run
from hf_levy.calibration import DirectionalNoise
from hf_levy.stable import sample_symmetric_stable

F64 = torch.float64


def sketched_run(levy: LevyArguments, spectrum=(5.0, 3.0, 1.0, 0.5, -0.5, -1.0, -2.0, -4.0)):
    """A run over Linear(3, 2) (P = 8) whose sketch holds the top eigenpairs of Q diag(spectrum) Qᵀ."""
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=F64))
    hessian = (q * torch.tensor(spectrum, dtype=F64)) @ q.T
    with run.schedule.refreshing():
        run.sketch.refresh(lambda v: (hessian @ v.double()).to(v.dtype), 8, step=0)
    for i, p in enumerate(run.params):
        p.grad = torch.linspace(-1.0, 1.0, p.numel()).view(p.shape) * (i + 1)
    return run


def flat_grad(run) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in run.params]).double()


def documented_coefficients(run, levy: LevyArguments, step: int, grad_norm: float) -> torch.Tensor:
    k = run.sketch.values_K.numel()
    root = run.sketch.values_K.clamp(min=0).sqrt()
    weights = root / root.norm()
    z = sample_symmetric_stable(
        (k,), levy.levy_alpha, generator=step_generator(run.seed + _rng.NOISE, step), dtype=F64
    )
    if levy.levy_clip is not None:
        z = z.clamp(-levy.levy_clip, levy.levy_clip)
    unit = grad_norm if levy.levy_scale_mode == "relative" else 1.0
    coef = levy.levy_scale * unit * weights * z
    if levy.levy_max_noise_ratio is not None and coef.norm() > levy.levy_max_noise_ratio * grad_norm:
        coef = coef * (levy.levy_max_noise_ratio * grad_norm / coef.norm())
    return coef


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("step", [3, 4])
def test_the_noise_is_the_eigenvectors_times_the_documented_coefficients_of_its_step(mode, step):
    levy = LevyArguments(
        sketch_batch_size=4,
        num_eigenpairs=3,
        levy_scale=0.4,
        levy_scale_mode=mode,
        levy_alpha=1.3,
        levy_seed=11,
    )
    run = sketched_run(levy)
    before = flat_grad(run)
    assert run.add_noise(step)
    xi = flat_grad(run) - before
    coef = documented_coefficients(run, levy, step, before.norm().item())
    vectors = run.sketch.vectors_PK.double()
    torch.testing.assert_close(xi, vectors @ coef, rtol=1e-5, atol=1e-6)
    # the third eigenvalue of the top 3 is 1.0 > 0; every direction gets noise
    assert (coef != 0).all()
    metrics = run.noise_window.metrics()
    assert metrics["levy/noise_norm"] == pytest.approx(coef.norm().item(), rel=1e-6)  # float32 ‖g‖
    assert metrics["levy/noise_to_grad_ratio"] == pytest.approx(
        coef.norm().item() / before.norm().item(), rel=1e-6
    )
    assert run.noise_total.steps == 1


def test_steps_draw_different_noise_and_negative_curvature_gets_none():
    # Top 2 of a spectrum whose second eigenvalue is negative: that direction gets weight 0.
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_scale=0.4, levy_seed=11)
    spectrum = (5.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0)
    xis = []
    for step in (5, 6):
        run = sketched_run(levy, spectrum)
        before = flat_grad(run)
        run.add_noise(step)
        xi = flat_grad(run) - before
        coef = run.sketch.vectors_PK.double().T @ xi
        assert abs(coef[1].item()) < 1e-6 and abs(coef[0].item()) > 1e-3
        xis.append(xi)
    assert not torch.allclose(xis[0], xis[1])


def test_the_cap_and_the_clip_bound_the_noise_and_are_counted():
    levy = LevyArguments(
        sketch_batch_size=4, num_eigenpairs=3, levy_scale=50.0, levy_alpha=0.8, levy_clip=2.0, levy_seed=3
    )
    run = sketched_run(levy)
    before = flat_grad(run)
    run.add_noise(7)
    xi = flat_grad(run) - before
    assert xi.norm().item() == pytest.approx(levy.levy_max_noise_ratio * before.norm().item(), rel=1e-5)
    assert run.noise_window.capped_steps == 1
    z = sample_symmetric_stable((3,), 0.8, generator=step_generator(run.seed + _rng.NOISE, 7), dtype=F64)
    assert run.noise_window.clipped_draws == int((z.abs() > 2.0).sum())


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_gets_no_noise_and_is_counted(bad, mode):
    # (An fp16 overflow: the optimizer skips the step.) In 'absolute' mode the noise itself would be finite.
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_scale_mode=mode, levy_seed=1)
    run = sketched_run(levy)
    run.params[1].grad[0] = bad
    before = [p.grad.clone() for p in run.params]
    assert not run.add_noise(2)
    for p, b in zip(run.params, before, strict=True):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
    assert run.skipped_nonfinite == 1 and run.noise_total.steps == 0


def test_noise_that_would_overflow_the_gradient_dtype_is_skipped():
    levy = LevyArguments(
        sketch_batch_size=4,
        num_eigenpairs=2,
        levy_scale=1e38,
        levy_clip=None,
        levy_max_noise_ratio=None,
        levy_seed=1,
    )
    run = sketched_run(levy)
    before = [p.grad.clone() for p in run.params]
    assert not run.add_noise(2)
    assert all(torch.equal(p.grad, b) for p, b in zip(run.params, before, strict=True))
    assert run.skipped_nonfinite == 1


def test_without_gradients_nothing_is_added():
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_seed=1)
    run = sketched_run(levy)
    for p in run.params:
        p.grad = None
    assert not run.add_noise(2)
    assert all(p.grad is None for p in run.params) and run.skipped_nonfinite == 0


def test_a_parameter_without_a_gradient_still_gets_its_part_of_the_noise():
    # A parameter the step's loss did not reach has .grad None: ξ still lands on it (in a new gradient),
    # with the scale set by the gradients that exist.
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=3, levy_scale=0.4, levy_seed=11)
    run = sketched_run(levy)
    weight, bias = run.params
    bias.grad = None
    grad_before = weight.grad.detach().double().reshape(-1).clone()
    assert run.add_noise(3)
    coef = documented_coefficients(run, levy, 3, grad_before.norm().item())
    xi = run.sketch.vectors_PK.double() @ coef
    torch.testing.assert_close(weight.grad.double().reshape(-1) - grad_before, xi[:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.grad.double(), xi[6:], rtol=1e-5, atol=1e-6)


def test_the_isotropic_ablation_has_the_hessian_noise_norm_spread_over_all_coordinates():
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_noise_basis="isotropic", levy_seed=5)
    run = sketched_run(levy)
    before = flat_grad(run)
    run.add_noise(9)
    xi = flat_grad(run) - before
    norm = documented_coefficients(run, levy, 9, before.norm().item()).norm().item()
    torch.testing.assert_close(xi, run.isotropic_xi(norm, levy.levy_alpha, levy.levy_clip, 9).double())
    vectors = run.sketch.vectors_PK.double()
    outside = (xi - vectors @ (vectors.T @ xi)).norm().item()
    assert outside > 0.5 * xi.norm().item()  # 6 of 8 coordinates lie outside the 2 eigenvectors


def test_the_isotropic_ablation_clips_its_own_draws_at_levy_clip():
    # Cauchy draws clipped at 0.5: most of the 8 coordinates are cut, so ξ has the direction of the clipped draws
    # of the isotropic stream of (seed, step), at the norm of the step's Hessian noise.
    levy = LevyArguments(
        sketch_batch_size=4,
        num_eigenpairs=2,
        levy_noise_basis="isotropic",
        levy_alpha=1.0,
        levy_clip=0.5,
        levy_max_noise_ratio=None,
        levy_seed=5,
    )
    run = sketched_run(levy)
    before = flat_grad(run)
    assert run.add_noise(9)
    xi = flat_grad(run) - before
    z = sample_symmetric_stable(
        (8,), 1.0, generator=step_generator(run.seed + _rng.ISOTROPIC, 9), dtype=torch.float32
    ).double()
    assert (z.abs() > 0.5).sum() >= 4  # the clip binds on most coordinates
    clipped = z.clamp(-0.5, 0.5)
    norm = documented_coefficients(run, levy, 9, before.norm().item()).norm().item()
    torch.testing.assert_close(xi, clipped * (norm / clipped.norm()), rtol=1e-5, atol=1e-7)


def test_calibrated_noise_uses_its_own_scales_and_alphas_shrunk_by_the_clipping():
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, levy_scale=2.0, levy_seed=4)
    run = sketched_run(levy)
    run.calibration = DirectionalNoise(
        torch.tensor([1.2, 1.9], dtype=F64), torch.tensor([0.05, 0.02], dtype=F64)
    )
    before = flat_grad(run)
    grad_norm = before.norm().item()
    run.add_noise(8, pre_clip_norm=torch.tensor(4 * grad_norm))
    xi = flat_grad(run) - before
    z = sample_symmetric_stable(
        (2,),
        torch.tensor([1.2, 1.9], dtype=F64),
        generator=step_generator(run.seed + _rng.NOISE, 8),
        dtype=F64,
    ).clamp(-levy.levy_clip, levy.levy_clip)
    coef = 2.0 * 0.25 * torch.tensor([0.05, 0.02], dtype=F64) * z  # clipping kept a quarter of ‖g‖
    torch.testing.assert_close(xi, run.sketch.vectors_PK.double() @ coef, rtol=1e-5, atol=1e-7)
