"""LevyTrainer inside the stock training loop: one fact per test, tiny Llama on CPU."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from test_callback_wiring import Recorder, plain_trainer
from trainer_utils import COMMON, OVERRIDDEN, SKETCH, flat_params, model, run_levy, run_stock, token_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import hf_levy._run
import hf_levy.calibration
import hf_levy.callback
import hf_levy.noise
from hf_levy import LevyConfig, LevyTrainer
from hf_levy._rng import step_generator
from hf_levy.noise import NoiseDraw
from hf_levy.stable import sample_symmetric_stable


def test_scale_zero_is_bitwise_the_stock_trainer_with_the_sketch_running(tmp_path):
    stock = run_stock(tmp_path)
    levy = run_levy(tmp_path, levy_scale=0.0)
    assert torch.equal(flat_params(stock), flat_params(levy))
    assert [h["loss"] for h in stock.state.log_history if "loss" in h] == [
        h["loss"] for h in levy.state.log_history if "loss" in h
    ]
    sketched = [h for h in levy.state.log_history if "curvature/eigenvalue_0" in h]
    assert [h["step"] for h in sketched] == [0, 3], "the sketch ran at steps 0 and 3, each logged at its step"


def test_same_seed_twice_is_bitwise_equal(tmp_path):
    first = run_levy(tmp_path, name="a", levy_scale=0.5)
    second = run_levy(tmp_path, name="b", levy_scale=0.5)
    assert torch.equal(flat_params(first), flat_params(second))


def test_noise_moves_every_trainable_parameter_and_logs_metrics(tmp_path):
    initial = [p.detach().clone() for p in model().parameters()]
    stock = run_stock(tmp_path)
    levy = run_levy(tmp_path, levy_scale=0.5)
    for (name, p), p0, q in zip(
        levy.model.named_parameters(), initial, stock.model.parameters(), strict=True
    ):
        assert not torch.equal(p.detach(), p0), f"{name} did not move"
        assert not torch.equal(p.detach(), q.detach()), f"{name} is the same as without noise"
    sketch = next(h for h in levy.state.log_history if "curvature/sketch_step" in h)
    first = next(h for h in levy.state.log_history if "loss" in h)
    for entry, key in (
        (sketch, "curvature/eigenvalue_0"),
        (sketch, "curvature/eigenvalue_1"),
        (sketch, "curvature/lanczos_residual"),
        (sketch, "curvature/hvp_count"),
        (sketch, "curvature/sketch_seconds"),
        (first, "levy/noise_norm"),
        (first, "levy/noise_to_grad_ratio"),
    ):
        assert key in entry and math.isfinite(entry[key]), key
    assert sketch["curvature/eigenvalue_0"] >= sketch["curvature/eigenvalue_1"]
    assert 0 < first["levy/noise_to_grad_ratio"] <= 1.0 + 1e-9  # the default cap is ‖ξ‖ <= ‖g‖


def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tmp_path):
    # Sketches at steps 0 and 4, checkpoint at 3: the resumed run must use the saved sketch of step 0
    # on step 3 and warm-start the step-4 sketch from it.
    settings = dict(levy_scale=0.5, sketch_every_n_steps=4, save_strategy="steps", save_steps=3)
    full = run_levy(tmp_path, name="full", **settings)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(str(checkpoint / "levy_state.safetensors"))
    assert int(saved["step"]) == 0 and saved["vectors_KP"].shape[0] == 2
    resumed = run_levy(tmp_path, name="resumed", resume=str(checkpoint), **settings)
    assert torch.equal(flat_params(full), flat_params(resumed))


class StepCounter(TrainerCallback):
    def __init__(self):
        self.optimizer_steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1


def test_noise_is_drawn_once_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    draws = []
    real = hf_levy.noise.noise_coefficients
    monkeypatch.setattr(hf_levy.noise, "noise_coefficients", lambda *a, **k: draws.append(1) or real(*a, **k))
    args = LevyConfig(
        output_dir=str(tmp_path / "ga"),
        max_steps=4,
        gradient_accumulation_steps=3,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        num_eigenpairs=2,
        lanczos_num_iters=6,
        sketch_batch_size=4,
    )
    counter = StepCounter()
    trainer = LevyTrainer(
        model=model(),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        callbacks=[counter],
    )
    trainer.train()
    assert counter.optimizer_steps == 4
    assert len(draws) == 4


def test_heavy_tails_never_give_a_non_finite_loss_or_parameter(tmp_path):
    # Plain SGD passes the noise through unnormalized, so an untruncated draw would blow up the weights.
    trainer = run_levy(tmp_path, max_steps=8, levy_alpha=0.8, levy_scale=1e4, optim="sgd", learning_rate=0.05)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert torch.isfinite(flat_params(trainer)).all()
    ratios = [
        h["levy/noise_to_grad_ratio"] for h in trainer.state.log_history if "levy/noise_to_grad_ratio" in h
    ]
    assert max(ratios) <= trainer.args.levy_max_noise_ratio * (1 + 1e-9)  # the default cap holds


def test_noise_that_overflows_the_gradient_dtype_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(
        hf_levy.noise,
        "noise_coefficients",
        lambda scales, *a, **k: NoiseDraw(torch.full_like(scales, 1e300), 0, False),
    )
    stock = run_stock(tmp_path, max_steps=4)
    levy = run_levy(tmp_path, max_steps=4, levy_clip=None, levy_max_noise_ratio=None)
    assert torch.equal(flat_params(stock), flat_params(levy))
    # counted per logging window of 2 steps
    assert [h.get("levy/skipped_nonfinite_steps") for h in levy.state.log_history if "loss" in h] == [2.0] * 2


def test_lora_frozen_parameters_get_neither_curvature_nor_noise(tmp_path):
    peft = pytest.importorskip("peft")
    base = model()
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    args = LevyConfig(output_dir=str(tmp_path / "lora"), max_steps=4, **_small(levy_scale=0.5))
    trainer = LevyTrainer(
        model=lora, args=args, train_dataset=token_dataset(), data_collator=default_data_collator
    )
    trainer.train()
    assert trainer.levy_callback.run.sketch.vectors_PK.shape == (trainable, 2)
    for n, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen_before[n]), n
            assert p.grad is None, n
    assert trainer.levy_callback.noise_draws == 4


def test_sdpa_model_works_through_auto_with_finite_differences(tmp_path):
    trainer = run_levy(tmp_path, max_steps=3, levy_scale=0.5, model_kwargs={"attn": "sdpa"})
    assert trainer.levy_callback.hvp_method == "finite_difference"
    first = next(h for h in trainer.state.log_history if "curvature/sketch_step" in h)
    assert math.isfinite(first["curvature/eigenvalue_0"]) and first["curvature/eigenvalue_0"] > 0


def test_eager_model_gets_exact_products_through_auto(tmp_path):
    trainer = run_levy(tmp_path, max_steps=1, levy_scale=0.5)
    assert trainer.levy_callback.hvp_method == "autograd"


def test_bf16_autocast_and_non_reentrant_checkpointing(tmp_path):
    trainer = run_levy(tmp_path, max_steps=4, levy_scale=0.5, bf16=True, gradient_checkpointing=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert trainer.levy_callback.noise_draws == 4


def test_trainer_rejects_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="LevyConfig"):
        LevyTrainer(
            model=model(), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=token_dataset()
        )


def _small(**kw):
    from trainer_utils import COMMON, SKETCH

    return {**COMMON, **SKETCH, **kw}


class PoisonGradients(TrainerCallback):
    """Makes one gradient entry infinite right before the optimizer step, as an fp16 overflow would."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        next(model.parameters()).grad.view(-1)[0] = float("inf")


def test_steps_with_non_finite_gradients_get_no_noise(tmp_path):
    args = LevyConfig(output_dir=str(tmp_path / "inf"), max_steps=4, **_small(levy_scale=0.5))
    trainer = LevyTrainer(
        model=model(), args=args, train_dataset=token_dataset(), data_collator=default_data_collator
    )
    trainer.callback_handler.callbacks.insert(0, PoisonGradients())  # runs before the levy callback
    trainer.train()
    assert trainer.levy_callback.noise_draws == 0
    logged = [h.get("levy/skipped_nonfinite_steps") for h in trainer.state.log_history if "loss" in h]
    assert logged == [2.0, 2.0]  # counted per logging window of 2 steps


def test_isotropic_ablation_has_the_same_noise_norms_as_the_hessian_noise(tmp_path):
    # One step: both start from the same gradient, so the norms must agree exactly; only the direction differs.
    one = dict(max_steps=1, logging_steps=1, levy_scale=0.5)
    hessian = run_levy(tmp_path, name="hessian", **one)
    isotropic = run_levy(tmp_path, name="iso", levy_noise_basis="isotropic", **one)
    first = lambda t: next(h["levy/noise_norm"] for h in t.state.log_history if "levy/noise_norm" in h)  # noqa: E731
    assert first(hessian) == pytest.approx(first(isotropic), rel=1e-9)
    assert not torch.equal(flat_params(hessian), flat_params(isotropic))


def test_calibration_fits_alpha_and_scales_logs_them_and_resumes_exactly(tmp_path):
    settings = dict(
        levy_scale=1.0,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
        levy_max_noise_ratio=None,
        sketch_every_n_steps=4,
        save_strategy="steps",
        save_steps=3,
    )
    full = run_levy(tmp_path, name="full", **settings)
    calibration = full.levy_callback.run.calibration
    assert calibration.alpha_K.shape == (2,) and calibration.scale_K.shape == (2,)
    assert ((calibration.alpha_K >= 0.5) & (calibration.alpha_K <= 2.0)).all()
    assert (calibration.scale_K > 0).all()
    first = next(h for h in full.state.log_history if "curvature/sketch_step" in h)  # the refresh's entry
    for key in ("levy/fitted_alpha_0", "levy/calibrated_scale_1", "curvature/calibration_gradients"):
        assert key in first, key
    assert 0 < first["levy/noise_variance_share"] < 1  # 2 of ~2,000 directions carry part of the noise
    assert first["curvature/calibration_gradients"] == 32
    saved = load_file(str(tmp_path / "full" / "checkpoint-3" / "levy_state.safetensors"))
    assert "calibrated_alpha" in saved and "calibrated_scale" in saved
    resumed = run_levy(tmp_path, name="resumed", resume=str(tmp_path / "full" / "checkpoint-3"), **settings)
    assert torch.equal(flat_params(full), flat_params(resumed))


@pytest.mark.parametrize(
    ("per_device", "accumulation", "physical"),
    [(64, 1, None), (16, 4, None), (16, 2, 32)],
    ids=["full-batch", "accumulation-covers-the-data", "half-the-data"],
)
def test_calibrated_scale_follows_the_design_formula_and_is_c_b_at_full_batch(
    tmp_path, monkeypatch, per_device, accumulation, physical
):
    # DESIGN.md: c_inj = c_b·(1 − (b/B)^(α−1))^(1/α), and c_b at full batch (a step over all 64 examples has
    # no sampling noise of its own). The fit is recorded as it happens; the formula is evaluated here.
    fits = []
    real_fit = hf_levy.calibration.fit_directional_noise
    monkeypatch.setattr(
        hf_levy.calibration,
        "fit_directional_noise",
        lambda *a, **kw: fits.append(real_fit(*a, **kw)) or fits[-1],
    )
    trainer = run_levy(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
    )
    run = trainer.levy_callback.run
    assert run.physical_batch_size == physical
    c_b, alpha = fits[-1].scale_K, fits[-1].alpha_K
    want = c_b if physical is None else c_b * (1 - (2 / physical) ** (alpha - 1)).clamp_min(0) ** (1 / alpha)
    torch.testing.assert_close(run.calibration.scale_K, want, rtol=1e-12, atol=0)
    if physical is None:
        assert torch.equal(run.calibration.scale_K, c_b)


def test_a_virtual_batch_as_large_as_the_training_set_is_rejected_at_full_batch(tmp_path):
    with pytest.raises(
        ValueError, match="levy_virtual_batch_size=64 must be smaller than the physical batch size 64"
    ):
        run_levy(tmp_path, per_device_train_batch_size=128, levy_virtual_batch_size=64)


def test_calibration_scale_zero_is_still_the_stock_run(tmp_path):
    stock = run_stock(tmp_path)
    levy = run_levy(tmp_path, levy_scale=0.0, levy_virtual_batch_size=2, calibration_num_microbatches=32)
    assert torch.equal(flat_params(stock), flat_params(levy))


def test_virtual_batch_must_be_smaller_than_the_physical_batch(tmp_path):
    with pytest.raises(
        ValueError, match="levy_virtual_batch_size=8 must be smaller than the physical batch size 8"
    ):
        run_levy(tmp_path, levy_virtual_batch_size=8)


def test_bfloat16_sketch_storage_gives_close_eigenvalues_and_finite_training(tmp_path):
    one = dict(max_steps=1, logging_steps=1, levy_scale=0.5, lanczos_num_iters=16)
    exact = run_levy(tmp_path, name="f32", **one)
    half = run_levy(tmp_path, name="bf16", sketch_dtype="bfloat16", **one)
    assert half.levy_callback.run.sketch.vectors_PK.dtype == torch.bfloat16
    eig = lambda t: torch.tensor([t.state.log_history[0][f"curvature/eigenvalue_{i}"] for i in range(2)])  # noqa: E731
    torch.testing.assert_close(eig(half), eig(exact), rtol=2e-2, atol=0)
    assert torch.isfinite(flat_params(half)).all()


@pytest.mark.parametrize("offload", ["basis", "all"])
def test_offloaded_sketch_trains_like_the_resident_one(tmp_path, offload):
    # On this CPU-only machine every device is the host: the placement itself is tested in test_sketch.
    resident = run_levy(tmp_path, name="resident", max_steps=2, levy_scale=0.5)
    offloaded = run_levy(tmp_path, name=offload, max_steps=2, levy_scale=0.5, sketch_offload=offload)
    settings = offloaded.levy_callback.run.sketch.settings
    assert (
        settings.basis_device == torch.device("cpu")
        and resident.levy_callback.run.sketch.settings.basis_device is None
    )
    assert settings.vector_device == torch.device("cpu")  # "all", or the parameters' device for "basis"
    assert offloaded.levy_callback.noise_draws == 2
    torch.testing.assert_close(flat_params(offloaded), flat_params(resident), rtol=0, atol=0)


def test_bf16_finite_difference_sketch_runs_in_float32_and_matches_exact_eigenvalues(tmp_path):
    # SDPA has no double backward, so "auto" takes finite differences; under bf16 autocast those would be
    # wrong by tens of percent, so the sketch must run the model's forward without the autocast wrapper.
    one = dict(max_steps=1, logging_steps=1, lanczos_num_iters=16)
    exact = run_levy(tmp_path, name="exact", bf16=False, **one)
    fd = run_levy(tmp_path, name="fd", bf16=True, model_kwargs={"attn": "sdpa"}, **one)
    assert fd.levy_callback.hvp_method == "finite_difference"
    eig = lambda t: torch.tensor([t.state.log_history[0][f"curvature/eigenvalue_{i}"] for i in range(2)])  # noqa: E731
    torch.testing.assert_close(eig(fd), eig(exact), rtol=1e-2, atol=0)


def test_torch_compiled_model_gets_the_same_sketch_and_noise_on_every_step(tmp_path):
    # The "eager" backend goes through torch.compile's wrapping without minutes of inductor compilation.
    plain = run_levy(tmp_path, name="plain", max_steps=3, levy_scale=0.5)
    compiled = run_levy(
        tmp_path,
        name="compiled",
        max_steps=3,
        levy_scale=0.5,
        torch_compile=True,
        torch_compile_backend="eager",
    )
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    assert compiled.levy_callback.noise_draws == 3
    first = lambda t: t.state.log_history[0]["curvature/eigenvalue_0"]  # noqa: E731
    assert first(compiled) == pytest.approx(first(plain), rel=1e-6)
    assert torch.isfinite(flat_params(compiled)).all()


def test_calibrated_noise_shrinks_with_gradient_clipping(tmp_path):
    # The same run with a tight max_grad_norm: the gradient (and with it the batch's own noise) is scaled by
    # max_grad_norm/‖g_raw‖, and the injected calibrated noise must be scaled by the same factor.
    settings = dict(
        levy_scale=1.0,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
        max_steps=1,
        logging_steps=1,
    )
    free = run_levy(tmp_path, name="free", levy_max_noise_ratio=None, max_grad_norm=0.0, **settings)
    tight = run_levy(tmp_path, name="tight", levy_max_noise_ratio=None, max_grad_norm=0.05, **settings)
    step_log = lambda t: next(h for h in t.state.log_history if "loss" in h)  # noqa: E731
    raw = step_log(free)["grad_norm"]
    noise = lambda t: step_log(t)["levy/noise_norm"]  # noqa: E731
    assert raw > 0.05
    assert noise(tight) == pytest.approx(noise(free) * 0.05 / raw, rel=1e-4)


def test_a_sketch_that_hits_lanczos_num_iters_warns_once_and_a_certified_one_does_not(tmp_path, caplog):
    message = "used all lanczos_num_iters"
    with caplog.at_level(logging.WARNING, logger="hf_levy._run"):
        capped = run_levy(tmp_path, name="capped", max_steps=8, lanczos_num_iters=2, lanczos_tol=1e-9)
    converged = [
        e["curvature/lanczos_converged"] for e in capped.state.log_history if "curvature/hvp_count" in e
    ]
    assert converged == [0.0, 0.0, 0.0]  # three refreshes (steps 0, 3, 6), none certified
    assert sum(message in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_levy._run"):
        certified = run_levy(tmp_path, name="certified", max_steps=4, lanczos_num_iters=40)
    assert all(
        e["curvature/lanczos_converged"] == 1.0
        for e in certified.state.log_history
        if "curvature/hvp_count" in e
    )
    assert not any(message in r.getMessage() for r in caplog.records)


def test_truncation_fractions_per_logging_window_match_the_draws(tmp_path):
    # Each window's clipped fraction is the share of its steps' K draws with |z| > clip, redrawn here from
    # the step-seeded sampler; the run fraction in the summary counts every step.
    K, every = SKETCH["num_eigenpairs"], 3
    trainer = run_levy(
        tmp_path, max_steps=6, logging_steps=every, levy_alpha=1.0, levy_clip=1.0, levy_max_noise_ratio=None
    )
    seed = trainer.args.levy_seed

    def clipped(step):
        z = sample_symmetric_stable((K,), 1.0, generator=step_generator(seed, step), dtype=torch.float64)
        return int((z.abs() > 1.0).sum())

    windows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in windows] == [3, 6]
    fractions = [h["levy/clipped_fraction"] for h in windows]
    assert fractions == [
        sum(clipped(s) for s in range(h["step"] - every, h["step"])) / (every * K) for h in windows
    ]
    assert len(set(fractions)) == 2 and all(0 < f < 1 for f in fractions)  # Cauchy draws cut half the time
    assert [h["levy/capped_fraction"] for h in windows] == [0.0, 0.0]
    summary = trainer.state.log_history[-1]
    assert summary["levy/run_clipped_fraction"] == sum(clipped(s) for s in range(6)) / (6 * K)
    assert summary["levy/run_capped_fraction"] == 0.0


def test_a_cap_that_sets_the_noise_norm_is_logged_and_warned_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_levy._run"):
        trainer = run_levy(tmp_path, max_steps=4, logging_steps=2, levy_max_noise_ratio=1e-6)
    windows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["levy/capped_fraction"] for h in windows] == [1.0, 1.0]
    assert all(h["levy/noise_to_grad_ratio"] <= 1e-6 * (1 + 1e-9) for h in windows)
    assert trainer.state.log_history[-1]["levy/run_capped_fraction"] == 1.0
    warnings = [r for r in caplog.records if "levy_max_noise_ratio=1e-06" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2 steps" in warnings[0].getMessage()


def test_a_cap_that_rarely_binds_gives_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_levy._run"):
        trainer = run_levy(tmp_path, max_steps=4, logging_steps=2, levy_scale=0.01, levy_max_noise_ratio=1.0)
    assert [h["levy/capped_fraction"] for h in trainer.state.log_history if "loss" in h] == [0.0, 0.0]
    assert not [r for r in caplog.records if "levy_max_noise_ratio" in r.getMessage()]


def test_noise_to_grad_ratio_is_the_mean_over_each_logging_window(tmp_path):
    # With one eigenpair the relative-mode ratio of a step is levy_scale·|clip(z)| whatever the eigenvalue, so
    # each window's mean is known from the step-seeded draws (a last-value or max aggregation would differ).
    every, scale = 3, 0.5
    trainer = run_levy(
        tmp_path,
        max_steps=6,
        logging_steps=every,
        num_eigenpairs=1,
        levy_scale=scale,
        levy_max_noise_ratio=None,
    )
    seed = trainer.args.levy_seed

    def ratio(step):
        z = sample_symmetric_stable((1,), 1.5, generator=step_generator(seed, step), dtype=torch.float64)
        return scale * float(z.clamp(-10, 10).abs())

    windows = [h for h in trainer.state.log_history if "loss" in h]
    for h in windows:
        want = sum(ratio(s) for s in range(h["step"] - every, h["step"])) / every
        assert h["levy/noise_to_grad_ratio"] == pytest.approx(want, rel=1e-6), h["step"]
    per_step = [ratio(s) for s in range(6)]
    assert max(per_step) > 1.5 * min(per_step)  # the draws differ enough for the mean to be told apart


def test_levy_trainer_puts_its_callback_ahead_of_the_users_reporting_callbacks(tmp_path):
    recorder = Recorder()  # a reporting callback (TensorBoard, W&B) passed in callbacks=[...]
    trainer = run_levy(tmp_path, max_steps=2, levy_scale=0.5, callbacks=[recorder])
    assert trainer.callback_handler.callbacks[0] is trainer.levy_callback
    assert "curvature/eigenvalue_0" in recorder.logs[0]  # the refresh at step 0, its own entry
    assert "levy/noise_norm" in next(log for log in recorder.logs if "loss" in log)


def test_levy_trainer_overrides_as_methods_and_patches_nothing_on_the_instance(tmp_path):
    trainer = run_levy(tmp_path, max_steps=2, levy_scale=0.5)
    patched = OVERRIDDEN
    assert not patched & vars(trainer).keys()
    assert all(getattr(LevyTrainer, name) is not getattr(Trainer, name) for name in patched)


def test_with_levy_scale_zero_no_noise_is_drawn_or_logged(tmp_path):
    trainer = run_levy(tmp_path, max_steps=2, levy_scale=0.0)
    assert trainer.levy_callback.noise_draws == 0
    history = trainer.state.log_history
    assert any("curvature/eigenvalue_0" in h for h in history)  # the sketch runs and is logged
    assert not any(k.startswith("levy/noise") for h in history for k in h)


def test_calibration_keeps_levy_alpha_when_told_not_to_fit_it(tmp_path):
    trainer = run_levy(
        tmp_path,
        max_steps=1,
        levy_alpha=1.7,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
        calibration_fit_alpha=False,
    )
    alpha = trainer.levy_callback.run.calibration.alpha_K
    assert torch.equal(alpha, torch.full_like(alpha, 1.7))


def test_a_discarded_refresh_is_not_calibrated_and_the_last_calibration_stays(tmp_path, monkeypatch):
    # The refresh at step 3 fails (NaN products): its calibration must not run on the kept step-0 vectors.
    calls = []
    real_calibrate = hf_levy._run.calibrate_to_virtual_batch
    monkeypatch.setattr(
        hf_levy._run,
        "calibrate_to_virtual_batch",
        lambda *a, **k: calls.append(k["step"]) or real_calibrate(*a, **k),
    )
    real_matvec = hf_levy.callback.sketch_matvec
    refreshes = []

    def failing_second_refresh(*args, **kwargs):
        refreshes.append(1)
        hvp = real_matvec(*args, **kwargs)
        return (lambda v: hvp(v) * float("nan")) if len(refreshes) == 2 else hvp

    monkeypatch.setattr(hf_levy.callback, "sketch_matvec", failing_second_refresh)
    trainer = run_levy(tmp_path, max_steps=5, levy_virtual_batch_size=2, calibration_num_microbatches=32)
    run = trainer.levy_callback.run
    assert run.failed_refreshes == 1 and run.sketch.step == 0
    assert calls == [0]


def test_a_compute_loss_func_is_the_loss_the_sketch_differentiates(tmp_path):
    # The Trainer's compute_loss_func (the model's own loss, tripled) defines the curvature: H triples, and so
    # does every Ritz value of the same Lanczos run (same start, same sketch batch at step 0).
    def tripled(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return 3 * torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    settings = dict(max_steps=1, logging_steps=1, levy_scale=0.0)
    plain = run_levy(tmp_path, name="plain", **settings)
    args = LevyConfig(output_dir=str(tmp_path / "custom"), **{**COMMON, **SKETCH, **settings})
    custom = LevyTrainer(
        model=model(),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        compute_loss_func=tripled,
    )
    custom.train()
    for i in range(SKETCH["num_eigenpairs"]):
        key = f"curvature/eigenvalue_{i}"
        expected = 3 * plain.state.log_history[0][key]
        assert custom.state.log_history[0][key] == pytest.approx(expected, rel=1e-4), key


def test_each_refresh_differentiates_the_sketch_batch_drawn_for_its_step(tmp_path):
    # The documented draw: examples randperm(n)[:sketch_batch_size] of the generator of (seed + SKETCH_BATCH, step).
    from test_callback_wiring import plain_trainer

    from hf_levy import LevyArguments, LevyCallback, _rng

    seen = {}

    def recording_loss(model, batch):
        seen.setdefault(trainer.state.global_step, batch["input_ids"].clone())
        return model(**batch).loss

    levy = LevyCallback(LevyArguments(**SKETCH, levy_scale=0.5, levy_seed=4), loss_fn=recording_loss)
    trainer, _ = plain_trainer(tmp_path / "batches", levy=levy, max_steps=4)
    trainer.train()
    ids = torch.tensor(token_dataset()["input_ids"])
    assert sorted(seen) == [0, 3]  # refreshes every 3 steps
    for step, batch in seen.items():
        generator = step_generator(4 + _rng.SKETCH_BATCH, step)
        drawn = torch.randperm(len(ids), generator=generator)[: SKETCH["sketch_batch_size"]]
        assert torch.equal(batch, ids[drawn]), step


def test_the_run_fractions_of_a_resumed_run_count_the_steps_before_the_checkpoint(tmp_path):
    """The summary's run fractions are over all 6 steps (redrawn here) after a resume from step 3, and the
    run's tally holds 6 steps, not the 3 after the resume."""
    K = SKETCH["num_eigenpairs"]
    settings = dict(
        max_steps=6,
        logging_steps=3,
        levy_alpha=1.0,
        levy_clip=1.0,
        levy_max_noise_ratio=None,
        save_strategy="steps",
        save_steps=3,
    )
    full = run_levy(tmp_path, name="full", **settings)
    resumed = run_levy(tmp_path, name="resumed", resume=str(tmp_path / "full" / "checkpoint-3"), **settings)
    seed = full.args.levy_seed

    def clipped(step):
        z = sample_symmetric_stable((K,), 1.0, generator=step_generator(seed, step), dtype=torch.float64)
        return int((z.abs() > 1.0).sum())

    expected = sum(clipped(s) for s in range(6)) / (6 * K)
    assert resumed.state.log_history[-1]["levy/run_clipped_fraction"] == expected
    assert sum(clipped(s) for s in range(3, 6)) / (3 * K) != expected  # the resumed part alone differs
    assert resumed.levy_callback.run.noise_total.steps == 6


def test_a_refresh_after_the_last_training_log_is_logged_or_in_the_summary(tmp_path):
    """Refreshes at steps 0, 3 and 6, logs at steps 2, 4 and 6: the refresh at the start of the seventh step
    comes after the last training log. LevyTrainer logs it at its step; with callbacks=[...] (no trainer to
    log through) the end-of-training summary carries it with its sketch step."""
    trainer = run_levy(tmp_path, max_steps=7, logging_steps=2, sketch_every_n_steps=3)
    logged = [
        (h["step"], h["curvature/sketch_step"])
        for h in trainer.state.log_history
        if "curvature/sketch_step" in h
    ]
    assert logged == [(0, 0.0), (3, 3.0), (6, 6.0)]
    listed, _ = plain_trainer(tmp_path / "listed", max_steps=7, logging_steps=2)
    listed.train()
    logged = [h["curvature/sketch_step"] for h in listed.state.log_history if "curvature/sketch_step" in h]
    assert logged == [0.0, 3.0, 6.0]
    assert "train_runtime" in listed.state.log_history[-1]
    assert listed.state.log_history[-1]["curvature/sketch_step"] == 6.0
