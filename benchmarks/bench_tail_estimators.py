"""Accuracy of the per-direction α estimators at the sample sizes of a calibration (M = 64..512).

Command: ``OMP_NUM_THREADS=1 python benchmarks/bench_tail_estimators.py`` (CPU, about a minute).
Prints bias/RMSE of α̂ (clipped into [0.5, 2]) over R seeded SαS samples for:
  pairwise  — hf_levy.calibration.fit_directional_noise (log moments of pairwise differences),
  blocksum  — the block-sum estimator of hf_levy.stable.estimate_tail_index, centre known,
  logmom    — log moments of the samples, centre known (estimate_tail_index_log_moments),
  logmom/mean, logmom/median — the same, centred at the sample mean / median,
and the relative bias/RMSE of the pairwise scale. Expected outcome: the table in docs/research/benchmarks.md,
"Tail-index estimators".
"""

import math

import torch

from hf_levy.calibration import fit_directional_noise
from hf_levy.stable import alpha_from_log_moments, estimate_tail_index, sample_symmetric_stable

R = 2000
ALPHAS = (1.2, 1.5, 1.8, 2.0)
SIZES = (64, 128, 256, 512)


def log_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().clamp_min(1e-300).log()


def block_sum(x_MR: torch.Tensor) -> torch.Tensor:
    """estimate_tail_index, vectorized over columns (and allowed below 100 samples)."""
    m = x_MR.shape[0]
    k1 = math.isqrt(m)
    k2 = m // k1
    x = x_MR[: k1 * k2]
    diff = (log_abs(x.view(k2, k1, -1).sum(1)).mean(0) - log_abs(x).mean(0)) / math.log(k1)
    return torch.where(diff > 0, 1 / diff, math.inf)


def log_moments(x_MR: torch.Tensor) -> torch.Tensor:
    return alpha_from_log_moments(log_abs(x_MR).var(0))


def main() -> None:
    torch.set_num_threads(1)
    for alpha in ALPHAS:
        for m in SIZES:
            x = sample_symmetric_stable(
                (m, R), alpha, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            )
            if m >= 100:  # the vectorized copy is the library's estimator
                assert math.isclose(block_sum(x[:, :1]).item(), estimate_tail_index(x[:, 0]), rel_tol=1e-9)
            fit = fit_directional_noise(x)
            estimates = {
                "pairwise": fit.alpha_K,
                "blocksum": block_sum(x),
                "logmom": log_moments(x),
                "logmom/mean": log_moments(x - x.mean(0)),
                # the midpoint median: torch.median takes the lower one, leaving an exact zero (log 0)
                "logmom/median": log_moments(x - x.quantile(0.5, dim=0)),
            }
            cells = []
            for name, a in estimates.items():
                err = a.clamp(0.5, 2.0) - alpha
                cells.append(f"{name} {err.mean():+.3f}/{err.square().mean().sqrt():.3f}")
            rel = fit.scale_K - 1
            cells.append(f"scale {rel.mean():+.3f}/{rel.square().mean().sqrt():.3f}")
            print(f"alpha={alpha} M={m:3d}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
