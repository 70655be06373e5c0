"""LevyRun: what one training run holds, built and checked at train begin."""

from __future__ import annotations

import pytest
import torch


def test_examples_per_batch_prefers_the_prepared_loader_and_falls_back_to_the_arguments():
    from types import SimpleNamespace

    from hf_levy._run_setup import examples_per_batch

    args = SimpleNamespace(per_device_train_batch_size=8, world_size=2)
    # Accelerate's loader knows the batch actually used (auto_find_batch_size may have halved it).
    assert examples_per_batch(SimpleNamespace(total_batch_size=4), args) == 4
    assert examples_per_batch(torch.utils.data.DataLoader(range(10), batch_size=3), args) == 16
    assert examples_per_batch(SimpleNamespace(total_batch_size=None), args) == 16


def _loader(n=16, batch=4):
    from types import SimpleNamespace

    dataset = [{"x": torch.tensor([float(i)])} for i in range(n)]
    return SimpleNamespace(dataset=dataset, collate_fn=lambda rows: rows, total_batch_size=batch)


def _args(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(
        seed=3, gradient_accumulation_steps=1, per_device_train_batch_size=4, world_size=1, **kw
    )


def test_start_run_checks_the_setup_with_messages_that_name_the_fix():
    import pytest

    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sketch_batch_size=32 exceeds the 16 training examples"):
        start_run(LevyArguments(), _args(), model, _loader())
    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        start_run(LevyArguments(sketch_batch_size=4), _args(), frozen, _loader())
    with pytest.raises(
        ValueError, match="levy_virtual_batch_size=4 must be smaller than the physical batch size 4"
    ):
        start_run(LevyArguments(sketch_batch_size=4, levy_virtual_batch_size=4), _args(), model, _loader())
    run = start_run(LevyArguments(sketch_batch_size=4, levy_seed=None), _args(), model, _loader())
    assert run.seed == 3 and run.physical_batch_size == 4 and run.space.dim == 8
    assert (
        start_run(LevyArguments(sketch_batch_size=4), _args(), model, _loader(batch=16)).physical_batch_size
        is None
    )


def test_run_state_round_trips_the_sketch_schedule_and_calibration():
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run
    from hf_levy.calibration import DirectionalNoise

    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, lanczos_num_iters=4)
    model = torch.nn.Linear(3, 2)
    run = start_run(levy, _args(), model, _loader())
    A = torch.diag(torch.arange(1.0, 9.0))
    run.sketch.refresh(lambda v: A.to(v) @ v, run.space.dim, step=5)
    with run.schedule.refreshing():
        pass
    run.calibration = DirectionalNoise(torch.tensor([1.5, 2.0]), torch.tensor([0.1, 0.2]))
    restored = start_run(levy, _args(), model, _loader())
    restored.load_state_dict(run.state_dict())
    assert restored.sketch.step == 5 and torch.equal(restored.sketch.values_K, run.sketch.values_K)
    assert torch.equal(restored.sketch.vectors_PK, run.sketch.vectors_PK)
    assert torch.equal(restored.calibration.scale_K, run.calibration.scale_K)
    assert restored.schedule.total_seconds == run.schedule.total_seconds


def _accumulating(steps):
    from types import SimpleNamespace

    return SimpleNamespace(
        seed=3, gradient_accumulation_steps=steps, per_device_train_batch_size=4, world_size=1
    )


def test_physical_batch_counts_gradient_accumulation_and_the_whole_set_is_full_batch():
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run

    model, levy = torch.nn.Linear(3, 2), LevyArguments(sketch_batch_size=16)
    run = start_run(levy, _accumulating(2), model, _loader(n=16, batch=4))
    assert run.physical_batch_size == 8  # 4 per micro-batch x 2 accumulated: B, as the calibration needs it
    assert start_run(levy, _accumulating(4), model, _loader()).physical_batch_size is None


def test_run_settings_follow_the_levy_fields_and_fit_a_small_model():
    from hf_levy import LevyArguments
    from hf_levy._run_setup import sketch_settings, start_run

    model = torch.nn.Linear(3, 2)  # 8 parameters
    levy = LevyArguments(sketch_batch_size=16, levy_seed=7, num_eigenpairs=10, lanczos_num_iters=48)
    run = start_run(levy, _args(), model, _loader())
    assert run.seed == 7  # levy_seed wins over the Trainer's seed
    settings = run.sketch.settings
    assert (settings.num_eigenpairs, settings.num_iters) == (8, 8)  # capped at P
    assert settings.vector_dtype == torch.float32 and settings.basis_device is None
    space = run.space
    bf16 = sketch_settings(LevyArguments(sketch_dtype="bfloat16", sketch_offload="basis"), space, 0)
    assert bf16.vector_dtype == torch.bfloat16
    assert bf16.basis_device == torch.device("cpu") and bf16.vector_device == space.device
    offload_all = sketch_settings(LevyArguments(sketch_offload="all"), space, 0)
    assert offload_all.basis_device == torch.device("cpu") == offload_all.vector_device
    float64 = start_run(levy, _args(), torch.nn.Linear(3, 2).double(), _loader())
    assert float64.sketch.settings.vector_dtype == torch.float64  # whatever sketch_dtype says


def test_a_sketch_batch_of_the_whole_training_set_is_allowed():
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run

    run = start_run(LevyArguments(sketch_batch_size=16), _args(), torch.nn.Linear(3, 2), _loader(n=16))
    assert run.sketch.settings.num_eigenpairs == 8


def test_examples_per_batch_ignores_a_loader_that_reports_zero():
    from types import SimpleNamespace

    from hf_levy._run_setup import examples_per_batch

    args = SimpleNamespace(per_device_train_batch_size=8, world_size=2)
    assert examples_per_batch(SimpleNamespace(total_batch_size=0), args) == 16


def test_log_metrics_report_the_window_then_start_afresh_and_the_summary_keeps_only_run_shares():
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run
    from hf_levy.calibration import DirectionalNoise
    from hf_levy.noise import NoiseDraw

    run = start_run(
        LevyArguments(sketch_batch_size=4, num_eigenpairs=2), _args(), torch.nn.Linear(3, 2), _loader()
    )
    with run.schedule.refreshing():
        run.sketch.refresh(lambda v: torch.arange(1.0, 9.0).to(v) * v, run.space.dim, step=0)
    draw = NoiseDraw(torch.zeros(2, dtype=torch.float64), num_clipped=1, capped=True)
    for tally in (run.noise_window, run.noise_total):
        tally.add(draw, 2.0, 4.0)
    first = run.log_metrics(summary=False, alpha=1.5)
    assert first["levy/alpha"] == 1.5 and first["levy/noise_to_grad_ratio"] == 0.5
    assert first["levy/capped_fraction"] == 1.0 and first["levy/clipped_fraction"] == 0.5
    assert not any(k.startswith("levy/") for k in run.log_metrics(summary=False, alpha=1.5))  # window emptied
    run.noise_window.add(draw, 2.0, 4.0)
    run.calibration = DirectionalNoise(torch.tensor([1.5, 2.0]), torch.tensor([0.1, 0.2]))
    assert "levy/alpha" not in run.log_metrics(
        summary=False, alpha=1.5
    )  # calibrated: α per direction instead
    summary = run.log_metrics(summary=True, alpha=1.5)
    assert set(summary) == {
        "curvature/sketch_seconds_total",
        "levy/run_capped_fraction",
        "levy/run_clipped_fraction",
    }


def test_isotropic_noise_is_the_isotropic_stream_of_the_step_rescaled_to_the_norm():
    from hf_levy import LevyArguments, _rng
    from hf_levy._rng import step_generator
    from hf_levy._run_setup import start_run
    from hf_levy.noise import isotropic_noise

    run = start_run(
        LevyArguments(sketch_batch_size=4, num_eigenpairs=2), _args(), torch.nn.Linear(3, 2), _loader()
    )
    run.sketch.refresh(lambda v: torch.arange(1.0, 9.0).to(v) * v, run.space.dim, step=0)
    xi = run.isotropic_xi(2.5, 1.5, 10.0, step=6)
    want = isotropic_noise(8, 2.5, 1.5, step_generator(run.seed + _rng.ISOTROPIC, 6), clip=10.0)
    assert torch.equal(xi, want.to(run.sketch.vectors_PK.dtype))
    assert xi.double().norm().item() == pytest.approx(2.5, rel=1e-6)


def test_a_saved_calibration_with_a_zero_scale_is_restored_and_a_negative_one_refused():
    # A direction whose micro-batch projections do not vary calibrates to scale 0: a valid state to resume from.
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run
    from hf_levy.calibration import DirectionalNoise

    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, lanczos_num_iters=4)
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    with run.schedule.refreshing():
        run.sketch.refresh(lambda v: torch.arange(1.0, 9.0).to(v) * v, run.space.dim, step=2)
    run.calibration = DirectionalNoise(torch.tensor([2.0, 1.4]), torch.tensor([0.0, 0.3]))
    restored = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    restored.load_state_dict(run.state_dict())
    assert restored.calibration.scale_K.tolist() == [0.0, pytest.approx(0.3)]
    state = {**run.state_dict(), "calibrated_scale": torch.tensor([-0.1, 0.3])}
    with pytest.raises(ValueError, match="negative calibrated scale"):
        restored.load_state_dict(state, source="ckpt/levy_state.safetensors")


def test_a_refresh_calibrates_on_the_micro_batches_of_its_step_and_logs_alpha_and_scale_by_direction():
    # Least squares at w*: a micro-batch's gradient along v is −(1/b) Σ_j Σ_k ε_jk s_k (q_k·v) (tests/least_squares.py),
    # its indices the calibration stream's draw at (seed, step); the fit of that table is what the run injects.
    from types import SimpleNamespace

    from least_squares import LeastSquares, features, optimum, orthonormal_directions

    from hf_levy import LevyArguments, _rng
    from hf_levy._rng import step_generator
    from hf_levy._run_setup import start_run
    from hf_levy.calibration import fit_directional_noise, injected_scale

    n, dim, b, m, big_b = 200, 4, 4, 40, 64
    q, s_k = orthonormal_directions(dim, 2), torch.tensor([1.0, 3.0], dtype=torch.float64)
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = features(s_k, q)
    dataset = [{"features": x, "targets": x @ optimum(dim) + e} for e in eps]
    collate = lambda rows: {key: torch.stack([r[key] for r in rows]) for key in rows[0]}  # noqa: E731
    loader = SimpleNamespace(dataset=dataset, collate_fn=collate, total_batch_size=big_b)
    levy = LevyArguments(
        sketch_batch_size=4,
        num_eigenpairs=2,
        lanczos_num_iters=4,
        levy_virtual_batch_size=b,
        calibration_num_microbatches=m,
        levy_seed=9,
    )
    run = start_run(levy, _args(), LeastSquares(optimum(dim)), loader)
    hessian = (q * s_k**2) @ q.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    run.sketch.refresh(lambda v: hessian.to(v) @ v, dim, step=3)
    metrics = run.calibrate(step=3)
    indices = torch.randint(n, (m, b), generator=step_generator(9 + _rng.CALIBRATION, 3))
    table = -((eps[indices] * s_k).sum(1) / b) @ (q.T @ run.sketch.vectors_PK.double())  # (M, K)
    fit = fit_directional_noise(table)
    scale = injected_scale(fit.scale_K, fit.alpha_K, b, big_b)
    torch.testing.assert_close(run.calibration.alpha_K, fit.alpha_K, rtol=1e-9, atol=0)
    torch.testing.assert_close(run.calibration.scale_K, scale, rtol=1e-9, atol=0)
    for i in range(2):
        assert metrics[f"levy/fitted_alpha_{i}"] == pytest.approx(fit.alpha_K[i].item(), rel=1e-9)
        assert metrics[f"levy/calibrated_scale_{i}"] == pytest.approx(scale[i].item(), rel=1e-9)


def test_loading_a_state_leaves_the_given_dict_as_it_was():
    # No hidden side effects: the same saved state can be installed into two runs.
    from hf_levy import LevyArguments
    from hf_levy._run_setup import start_run
    from hf_levy.calibration import DirectionalNoise

    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, lanczos_num_iters=4)
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    with run.schedule.refreshing():
        run.sketch.refresh(lambda v: torch.arange(1.0, 9.0).to(v) * v, run.space.dim, step=2)
    run.calibration = DirectionalNoise(torch.tensor([1.5, 1.4]), torch.tensor([0.2, 0.3]))
    state = run.state_dict()
    keys = sorted(state)
    for _ in range(2):
        restored = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
        restored.load_state_dict(state)
        assert sorted(state) == keys and torch.equal(restored.calibration.scale_K, run.calibration.scale_K)
