"""Adding the directional noise to the gradients: forming ξ = V·coef then g += ξ, against the per-parameter addmv.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_noise_add.py [--sizes 1M,5M] [--ks 8,16] [--repeats 30]
Hardware: CPU, one torch thread. Runtime: ~1 min.
Outcome:  a markdown table of median milliseconds per step (interleaved repeats) for
          `directional_noise` + `ParameterSpace.add_to_grads` (what LevyCallback did before) and
          `ParameterSpace.add_combination_to_grads` (what it does now), on the parameters of the Llamas of
          bench_trainer_step.py, vectors in the K-row layout lanczos returns; and the largest difference
          between the two results (they must agree to float32 rounding).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import statistics
import time

import torch
from bench_trainer_step import build_model

from hf_levy.noise import directional_noise
from hf_levy.params import ParameterSpace


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1M,5M")
    parser.add_argument("--ks", default="8,16")
    parser.add_argument("--repeats", type=int, default=30)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| model | P | K | form ξ, then add: ms | addmv per parameter: ms | ratio | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in cli.sizes.split(","):
        params = list(build_model(size, 128).parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        space = ParameterSpace(params)
        for k in (int(x) for x in cli.ks.split(",")):
            q, _ = torch.linalg.qr(torch.randn(space.dim, k))
            vectors_PK = q.T.contiguous().T  # the K-row layout of lanczos
            coef = torch.randn(k, dtype=torch.float64)
            seconds = {"old": [], "new": []}
            for _ in range(cli.repeats):
                start = time.perf_counter()
                space.add_to_grads(directional_noise(vectors_PK, coef))
                seconds["old"].append(time.perf_counter() - start)
                start = time.perf_counter()
                space.add_combination_to_grads(vectors_PK, coef)
                seconds["new"].append(time.perf_counter() - start)
            for p in params:
                p.grad.zero_()
            space.add_to_grads(directional_noise(vectors_PK, coef))
            old = torch.cat([p.grad.reshape(-1).clone() for p in params])
            for p in params:
                p.grad.zero_()
            space.add_combination_to_grads(vectors_PK, coef)
            new = torch.cat([p.grad.reshape(-1) for p in params])
            t_old, t_new = (statistics.median(seconds[name]) * 1e3 for name in ("old", "new"))
            print(
                f"| {size} | {space.dim:,} | {k} | {t_old:.2f} | {t_new:.2f} | {t_new / t_old:.2f} "
                f"| {(old - new).abs().max().item():.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
