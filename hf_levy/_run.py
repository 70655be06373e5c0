"""One training run of LevyCallback: its state, and its steps over the pure noise laws.

The step methods apply :func:`hf_levy.noise.step_noise` and :func:`hf_levy.minibatch.minibatch_noise` to the
gradients as ``torch.optim.SGD.step`` applies ``sgd()``: g ← g + ξ before ``optimizer.step()``, ξ drawn from a
generator seeded by the step (every rank adds the same ξ; a resumed run draws what the uninterrupted one drew).
Each ``train()`` starts a fresh run (:func:`hf_levy._run_setup.start_run`); only a checkpoint carries over.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hf_levy import _rng
from hf_levy._checkpoint import FIX, NOISE_SCALE, NOISE_TOTAL, SMOOTHER_KEYS, saved_state_problem
from hf_levy._noise_tally import NoiseTally
from hf_levy._rng import step_generator
from hf_levy._schedule import STATE_KEYS as SCHEDULE_KEYS
from hf_levy._schedule import RefreshSchedule
from hf_levy.calibration import DirectionalNoise, calibrate_to_virtual_batch
from hf_levy.config import LevyArguments
from hf_levy.hvp import LossFn
from hf_levy.minibatch import batch_length, minibatch_kappa, minibatch_noise, subbatch_gradient, subbatch_rows
from hf_levy.noise import NoiseDraw, isotropic_noise, step_noise
from hf_levy.noise_scale import NoiseScaleSmoother
from hf_levy.params import ParameterSpace, host_float, rank_and_world, sum_over_ranks
from hf_levy.sketch import HessianSketch

logger = logging.getLogger(__name__)

# The noise bases that inject the real noise of a sub-batch of the step's batch (hf_levy.minibatch).
MINIBATCH_BASES = ("minibatch", "minibatch_topk")


class OnceWarnings:
    """Warnings logged at most once per key while their owner lives (a callback, a run), by rank 0 only."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.shown: set[str] = set()

    def warn(self, key: str, message: str, *args: Any) -> None:
        """Log ``message % args`` unless ``key`` was warned about already."""
        if key not in self.shown and rank_and_world()[0] == 0:
            self.log.warning(message, *args)
        self.shown.add(key)


@dataclass
class LevyRun:
    """What one run holds and does at each optimizer step (see the module docstring)."""

    levy: LevyArguments  # the levy fields: what the noise, the sketch and the calibration do
    model: nn.Module
    space: ParameterSpace
    sketch: HessianSketch
    schedule: RefreshSchedule
    seed: int
    dataset: Any
    collate_fn: Any
    physical_batch_size: int | None  # B, examples per optimizer step; None: the whole training set
    step_examples: int = 0  # B as a count: examples per optimizer step, at most the training set
    step_batches: list[Any] = field(default_factory=list)  # this step's micro-batches ('minibatch' bases)
    calibration: DirectionalNoise | None = None  # the injected α_K and c_inj_K (levy_virtual_batch_size)
    sketch_metrics: dict[str, float] = field(default_factory=dict)  # of the last refresh, until logged
    noise_window: NoiseTally = field(default_factory=NoiseTally)  # the steps since the last log
    noise_total: NoiseTally = field(default_factory=NoiseTally)  # every step of the run
    noise_scale: NoiseScaleSmoother = field(default_factory=NoiseScaleSmoother)  # levy/gradient_noise_scale
    skipped_nonfinite: int = 0  # steps since the last log whose gradient or noise was not finite
    failed_refreshes: int = 0  # refreshes of this run whose sketch was discarded
    warnings: OnceWarnings = field(default_factory=lambda: OnceWarnings(logger))  # once per run

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in the order of the flat vectors."""
        return self.space.params

    def log_metrics(self, *, summary: bool, alpha: float | None) -> dict[str, float]:
        """The ``curvature/`` and ``levy/`` entries of a training log (then the window starts afresh).

        With ``summary``, those of the end-of-training summary: the whole run's sketch seconds and truncation
        shares, and the metrics of a refresh that no training log has shown yet (their
        ``curvature/sketch_step`` says when).
        """
        total = {}
        if self.schedule.refresh_seconds is not None:  # a refresh ran (or a resumed checkpoint's did)
            total["curvature/sketch_seconds_total"] = self.schedule.total_seconds
        if self.failed_refreshes:
            total["curvature/failed_refreshes"] = float(self.failed_refreshes)
        if summary:  # with the last refresh's metrics when no training log came after it
            shares = self.noise_total.metrics("levy/run_")
            last_sketch, self.sketch_metrics = self.sketch_metrics, {}
            return {**last_sketch, **total, **{k: v for k, v in shares.items() if k.endswith("_fraction")}}
        metrics = {**self.sketch_metrics, **total, **self.noise_window.metrics()}
        b_simple = self.noise_scale.value  # None while the averaged ‖G‖² is not positive: nothing logged
        if b_simple is not None:
            metrics["levy/gradient_noise_scale"] = b_simple
        if self.noise_window.steps and self.calibration is None and alpha is not None:
            metrics["levy/alpha"] = float(alpha)
        if self.skipped_nonfinite:
            metrics["levy/skipped_nonfinite_steps"] = float(self.skipped_nonfinite)
        self.sketch_metrics, self.noise_window, self.skipped_nonfinite = {}, NoiseTally(), 0
        return metrics

    def calibrate(self, step: int, loss_fn: LossFn | None = None) -> dict[str, float]:
        """Fit the noise of batch size b along the current eigenvectors; returns the metrics.

        The injected α_K and scales c_inj_K (:func:`calibrate_to_virtual_batch`) are kept for the noise.
        """
        start = time.perf_counter()
        self.calibration, variance_share = calibrate_to_virtual_batch(
            self.model,
            self.dataset,
            self.collate_fn,
            self.space,
            self.sketch.vectors_PK,
            virtual_batch_size=self.levy.levy_virtual_batch_size,
            num_microbatches=self.levy.calibration_num_microbatches,
            physical_batch_size=self.physical_batch_size,
            seed=self.seed,
            step=step,
            alpha=None if self.levy.calibration_fit_alpha else self.levy.levy_alpha,
            loss_fn=loss_fn,
        )
        metrics = {f"levy/fitted_alpha_{i}": float(a) for i, a in enumerate(self.calibration.alpha_K)}
        metrics.update(
            {f"levy/calibrated_scale_{i}": float(c) for i, c in enumerate(self.calibration.scale_K)}
        )
        metrics["levy/noise_variance_share"] = variance_share  # of the batch-b noise, in the top-K span
        metrics["curvature/calibration_gradients"] = float(self.levy.calibration_num_microbatches)
        metrics["curvature/calibration_seconds"] = time.perf_counter() - start
        return metrics

    def isotropic_xi(self, norm: float, alpha: float, clip: float | None, step: int) -> Tensor:
        """The isotropic ablation's ξ of ``step`` (this rank's padded piece): SαS draws rescaled to ``norm``.

        :func:`hf_levy.noise.isotropic_noise` on this run's generator of the step and its ranks.
        """
        space = self.space
        # Replicated ranks draw the same coordinates; FSDP ranks each draw their own piece.
        stream = rank_and_world()[0] + 1 if space.sharded else 0
        generator = step_generator(self.seed + _rng.ISOTROPIC + stream, step)
        xi = isotropic_noise(space.local_numel, norm, alpha, generator, clip=clip, reduce=space.reduce)
        return space.pad(xi.to(space.device, self.sketch.vectors_PK.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps: the sketch (once there is one), its schedule, the calibration, the tallies.

        The whole run's noise tally is kept, so the summary's run fractions cover the steps before a resume too.
        """
        state = {
            **self.sketch.state_dict(),
            **self.schedule.state_dict(),
            NOISE_TOTAL: self.noise_total.state_tensor(),
            NOISE_SCALE: torch.tensor(
                [float(self.noise_scale.state_dict()[k]) for k in SMOOTHER_KEYS], dtype=torch.float64
            ),
        }
        if self.calibration is not None:
            state.update(calibrated_alpha=self.calibration.alpha_K, calibrated_scale=self.calibration.scale_K)
        return state

    def load_state_dict(self, saved: dict[str, Tensor], *, source: str = "the saved sketch state") -> None:
        """Install a checkpoint's state after checking that it fits this run.

        Raises:
            ValueError: naming ``source`` (the file) and the fix, when a key is missing, a shape does not
                match this run's parameters or ``num_eigenpairs``, or a value is not finite.
        """
        problem = saved_state_problem(saved, self.space.dim, self.sketch.settings.num_eigenpairs)
        if problem is not None:
            raise ValueError(f"{source} {problem}; {FIX}")
        saved = dict(saved)
        if NOISE_TOTAL in saved:  # files written before it was kept lack it: the run's tally starts afresh
            self.noise_total = NoiseTally.from_state_tensor(saved.pop(NOISE_TOTAL))
        if NOISE_SCALE in saved:  # likewise: the noise scale's averages start afresh without it
            values = saved.pop(NOISE_SCALE).tolist()
            self.noise_scale = NoiseScaleSmoother(values[0])
            self.noise_scale.load_state_dict(dict(zip(SMOOTHER_KEYS, values, strict=True)))
        if "calibrated_scale" in saved:
            self.calibration = DirectionalNoise(saved.pop("calibrated_alpha"), saved.pop("calibrated_scale"))
        self.schedule.load_state_dict({key: saved.pop(key) for key in SCHEDULE_KEYS})
        if "vectors_KP" not in saved:  # saved before any sketch (the 'minibatch' basis needs none)
            return
        settings = self.sketch.settings
        saved["vectors_KP"] = saved["vectors_KP"].to(settings.vector_device, settings.vector_dtype)
        self.sketch.load_state_dict(saved)

    def add_noise(self, step: int, pre_clip_norm: Any = None) -> bool:
        """Add this step's ξ (Hessian or isotropic basis) to ``.grad``; returns whether noise was added.

        Skipped (and counted in ``skipped_nonfinite``) when ‖g‖ is not finite (an fp16 overflow: the
        optimizer skips the step too) or the draw would overflow the gradient dtype. ``pre_clip_norm``, the
        gradient norm before ``max_grad_norm`` clipping, scales the calibrated noise with the clipping.
        """
        if not self.space.has_grads():
            return False
        # The only host sync of the step: the noise scale and its cap are relative to ‖g‖.
        grad_norm = self.space.grad_norm()
        if not math.isfinite(grad_norm):
            self.skipped_nonfinite += 1
            return False
        calibration = self.calibration
        draw = step_noise(
            grad_norm,
            self.sketch.values_K,
            step_generator(self.seed + _rng.NOISE, step),
            levy_scale=self.levy.levy_scale,
            scale_mode=self.levy.levy_scale_mode,
            alpha=self.levy.levy_alpha,
            clip=self.levy.levy_clip,
            max_noise_ratio=self.levy.levy_max_noise_ratio,
            calibrated_scale_K=calibration.scale_K if calibration is not None else None,
            calibrated_alpha_K=calibration.alpha_K if calibration is not None else None,
            pre_clip_norm=host_float(pre_clip_norm),
        )
        # Orthonormal columns give |ξ_j| <= ‖ξ‖ = ‖coef‖, so checking the K coefficients on the host rules
        # out an overflow anywhere in ξ. Only reachable with truncation off: such a draw is dropped.
        noise_norm = draw.coef_K.norm().item()
        if not noise_norm < min(torch.finfo(p.dtype).max for p in self.params) / 2:
            logger.warning("hf_levy: step %d: the noise overflows the gradient dtype and is skipped", step)
            self.skipped_nonfinite += 1
            return False
        if self.levy.levy_noise_basis == "hessian":
            self.space.add_combination_to_grads(self.sketch.vectors_PK, draw.coef_K)
        else:
            self.space.add_to_grads(
                self.isotropic_xi(noise_norm, self.levy.levy_alpha, self.levy.levy_clip, step)
            )
        self.noise_window.add(draw, noise_norm, grad_norm)
        self.noise_total.add(draw, noise_norm, grad_norm)
        return True

    def add_minibatch_noise(
        self, step: int, pre_clip_norm: Any = None, loss_fn: LossFn | None = None
    ) -> bool:
        """Add this step's real sub-batch noise ξ = κ·(r·g_b − g) (or its top-K projection) to ``.grad``.

        g_b is the gradient of ``levy_noise_batch_size`` examples drawn from the step's own micro-batches
        (``step_batches``) by the step's generator, each rank its equal share, averaged over the ranks; g the
        clipped gradient in ``.grad`` and r = ‖g‖/``pre_clip_norm`` the clipping factor (1 without clipping),
        so that at κ = 1 the optimizer sees the batch-b gradient clipped by the full batch's factor. The
        α-stable truncations (``levy_clip``, ``levy_max_noise_ratio``) do not apply: this noise has no heavy
        tail to cut, and near a minimum, where ‖g‖ → 0 while the sampling noise stays, a cap relative to ‖g‖
        would replace it on most steps. Skipped like :meth:`add_noise` when ‖g‖ or ξ is not finite; returns
        whether noise was added. Unless ``gradient_noise_scale_every_n_steps`` is 0, the same g_b and ‖g‖
        before clipping also feed ``noise_scale`` (free: no other gradient is taken).
        """
        batches, self.step_batches = self.step_batches, []
        if not batches or not self.space.has_grads():
            return False
        grad_norm = self.space.grad_norm()
        if not math.isfinite(grad_norm):
            self.skipped_nonfinite += 1
            return False
        space = self.space
        sub_P = self._subbatch_gradient(batches, step, loss_fn)
        pre_clip = host_float(pre_clip_norm)
        shrink = min(1.0, grad_norm / pre_clip) if pre_clip else 1.0
        if self.levy.gradient_noise_scale_every_n_steps != 0:  # free: g_b and ‖g‖ are at hand
            self._update_noise_scale(sub_P, pre_clip if pre_clip is not None else grad_norm, batches)
        topk = self.levy.levy_noise_basis == "minibatch_topk"
        kappa = minibatch_kappa(
            self.levy.levy_scale,
            self.levy.levy_noise_batch_size,
            self.levy.levy_virtual_batch_size,
            self.step_examples,
        )
        noise = minibatch_noise(
            space.flat_grads(),
            sub_P,
            kappa,
            shrink=shrink,
            vectors_PK=space.unpad(self.sketch.vectors_PK) if topk else None,
            reduce=space.reduce,
        )
        if not math.isfinite(noise.norm):
            logger.warning("hf_levy: step %d: the sub-batch noise is not finite and is skipped", step)
            self.skipped_nonfinite += 1
            return False
        space.add_to_grads(space.pad(noise.xi_P))
        record = NoiseDraw(noise.xi_P.new_zeros(0, dtype=torch.float64), num_clipped=0, capped=False)
        for tally in (self.noise_window, self.noise_total):
            tally.add(record, noise.norm, grad_norm)
            if noise.topk_share is not None:
                tally.add_topk_share(noise.topk_share)
        return True

    def measure_noise_scale(
        self, step: int, pre_clip_norm: Any = None, loss_fn: LossFn | None = None
    ) -> bool:
        """Fold this step's pair of batches into ``noise_scale``, at the cost of one sub-batch gradient.

        For the bases that compute no g_b (and levy_scale 0): the gradient of the ``levy_noise_batch_size``
        examples the 'minibatch' noise would draw at this step, and ‖g‖ before clipping (``pre_clip_norm``,
        else of ``.grad``). Call it before ξ is added; ``.grad`` and ``step_batches`` are left as they are.

        Returns:
            Whether the smoother took the pair (not when the step has no batches or gradients, nor a
            non-finite norm).
        """
        batches = self.step_batches
        if not batches or not self.space.has_grads():
            return False
        pre_clip = host_float(pre_clip_norm)
        full_norm = pre_clip if pre_clip is not None else self.space.grad_norm()
        sub_P = self._subbatch_gradient(batches, step, loss_fn)
        return self._update_noise_scale(sub_P, full_norm, batches)

    def _subbatch_gradient(self, batches: list[Any], step: int, loss_fn: LossFn | None) -> Tensor:
        """g_b, this rank's flat piece, of the step's sub-batch.

        ``levy_noise_batch_size`` examples of the step's micro-batches drawn by the step's generator
        (``_rng.MINIBATCH``), each rank its equal share, averaged over the ranks.
        """
        world = rank_and_world()[1]
        rows = subbatch_rows(
            [batch_length(b) for b in batches],
            self.levy.levy_noise_batch_size // world,
            step_generator(self.seed + _rng.MINIBATCH, step),
        )
        sub_P, _ = subbatch_gradient(self.model, batches, rows, self.params, loss_fn=loss_fn)
        if world > 1 and not self.space.sharded:  # FSDP's backward already averaged the ranks' equal shares
            sub_P = sum_over_ranks(sub_P).div_(world)
        return sub_P

    def _update_noise_scale(self, sub_P: Tensor, full_norm: float, batches: list[Any]) -> bool:
        """Fold ‖g_b‖² (b = levy_noise_batch_size) and ‖g_B‖² = ``full_norm``² into ``noise_scale``.

        B counts the step's examples, this rank's micro-batches times the ranks (an epoch's short last step
        included), at most the N training examples. Both batches are drawn without replacement from those
        N, so the estimates carry the finite-population correction (at full batch the step's gradient has no
        noise).
        """
        small = float(self.space.reduce(sub_P.double().square().sum()))
        b, population = self.levy.levy_noise_batch_size, len(self.dataset)
        big = min(sum(batch_length(batch) for batch in batches) * rank_and_world()[1], population)
        if big <= b:  # a short last step: no larger batch to pair with
            return False
        return self.noise_scale.update(small, b, full_norm**2, big, population=population)

    def warn_if_unconverged(self, step: int) -> None:
        """A refresh that hit lanczos_num_iters before lanczos_tol (curvature/lanczos_converged = 0)."""
        if self.sketch_metrics.get("curvature/lanczos_converged", 1.0) == 1.0:
            return
        self.warnings.warn(
            "unconverged",
            "hf_levy: the Hessian sketch at step %d used all lanczos_num_iters=%d products and stopped at "
            "relative residual %.2g > lanczos_tol=%g; the noise uses these approximate directions. Raise "
            "lanczos_num_iters (about 4 x num_eigenpairs + 10) or lanczos_tol for certified eigenpairs "
            "(logged as curvature/lanczos_converged; this warning is shown once)",
            step,
            self.sketch.settings.num_iters,
            self.sketch_metrics["curvature/lanczos_residual"],
            self.levy.lanczos_tol,
        )

    def warn_if_mostly_capped(self) -> None:
        """More than half of the noisy steps so far had their noise norm set by the cap."""
        total = self.noise_total
        if total.capped_fraction <= 0.5:
            return
        self.warnings.warn(
            "capped",
            "hf_levy: the noise norm hit the cap levy_max_noise_ratio=%g x ||g|| on %d of %d steps (%.0f%%): "
            "the noise is then a fixed-norm direction set by the cap, not by levy_alpha or levy_scale. "
            "Lower levy_scale or raise levy_max_noise_ratio (logged as levy/capped_fraction; this "
            "warning is shown once)",
            self.levy.levy_max_noise_ratio,
            total.capped_steps,
            total.steps,
            100 * total.capped_fraction,
        )

    def warn_sketch_failed(self, step: int) -> None:
        """A refresh discarded for non-finite products or eigenpairs (counted in curvature/failed_refreshes)."""
        kept = (
            f"the noise keeps the sketch of step {self.sketch.step}"
            if self.sketch.ready
            else "no noise is added until a sketch succeeds"
        )
        self.warnings.warn(
            "failed",
            "hf_levy: the Hessian sketch at step %d failed (%s) and was discarded: %s. It is retried every "
            "sketch_every_n_steps=%d steps. A non-finite loss of the sketch batch in eval mode (the products "
            "run in eval mode) is the usual cause (logged as curvature/failed_refreshes; this warning is "
            "shown once)",
            step,
            self.sketch.failure,
            kept,
            self.levy.sketch_every_n_steps,
        )
