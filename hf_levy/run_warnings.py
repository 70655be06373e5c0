"""The once-per-run warnings of LevyCallback: when what the logs show departs from what the settings ask.

Each is logged by rank 0 only, at most once per training run (the flags live in :class:`LevyRun`).
"""

from __future__ import annotations

import logging

from hf_levy.config import LevyArguments
from hf_levy.params import rank_and_world
from hf_levy.run_state import LevyRun

logger = logging.getLogger("hf_levy.callback")  # the logger users already filter on


def warn_if_unconverged(run: LevyRun, levy: LevyArguments, step: int) -> None:
    """A refresh that hit lanczos_num_iters before lanczos_tol (curvature/lanczos_converged = 0)."""
    if run.warned_unconverged or run.sketch_metrics.get("curvature/lanczos_converged", 1.0) == 1.0:
        return
    run.warned_unconverged = True
    if rank_and_world()[0] == 0:
        logger.warning(
            "hf_levy: the Hessian sketch at step %d used all lanczos_num_iters=%d products and stopped at "
            "relative residual %.2g > lanczos_tol=%g; the noise uses these approximate directions. Raise "
            "lanczos_num_iters (about 4 x num_eigenpairs + 10) or lanczos_tol for certified eigenpairs "
            "(logged as curvature/lanczos_converged; this warning is shown once)",
            step,
            run.sketch.settings.num_iters,
            run.sketch_metrics["curvature/lanczos_residual"],
            levy.lanczos_tol,
        )


def warn_if_mostly_capped(run: LevyRun, levy: LevyArguments) -> None:
    """More than half of the noisy steps so far had their noise norm set by the cap."""
    total = run.noise_total
    if run.warned_capped or total.capped_fraction <= 0.5:
        return
    run.warned_capped = True
    if rank_and_world()[0] == 0:
        logger.warning(
            "hf_levy: the noise norm hit the cap levy_max_noise_ratio=%g x ||g|| on %d of %d steps (%.0f%%): "
            "the noise is then a fixed-norm direction set by the cap, not by levy_alpha or levy_scale. "
            "Lower levy_scale or raise levy_max_noise_ratio (logged as levy/capped_fraction; this "
            "warning is shown once)",
            levy.levy_max_noise_ratio,
            total.capped_steps,
            total.steps,
            100 * total.capped_fraction,
        )


def warn_if_sketch_failed(run: LevyRun, levy: LevyArguments, step: int) -> None:
    """A refresh discarded for non-finite products or eigenpairs (counted in curvature/failed_refreshes)."""
    if run.warned_failed:
        return
    run.warned_failed = True
    if rank_and_world()[0] == 0:
        kept = (
            f"the noise keeps the sketch of step {run.sketch.step}"
            if run.sketch.ready
            else "no noise is added until a sketch succeeds"
        )
        logger.warning(
            "hf_levy: the Hessian sketch at step %d failed (%s) and was discarded: %s. It is retried every "
            "sketch_every_n_steps=%d steps. A non-finite loss of the sketch batch in eval mode (the products "
            "run in eval mode) is the usual cause (logged as curvature/failed_refreshes; this warning is "
            "shown once)",
            step,
            run.sketch.failure,
            kept,
            levy.sketch_every_n_steps,
        )
