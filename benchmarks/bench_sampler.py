"""Speed of `sample_symmetric_stable` next to `torch.randn` and `scipy.stats.levy_stable.rvs`.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_sampler.py [--n 1000000] [--repeats 15]
Hardware: any CPU (CUDA rows are added when a GPU is visible). Runtime: ~10 s on one core.
          [--cuda-n 1000000 100000000]
Outcome:  a markdown table; the target is `sample_symmetric_stable` within 5x of `torch.randn`
          for the same count (alpha = 1.5, float32). scipy runs on fewer samples (`--scipy-n`)
          and is compared per sample.
Timings alternate between the methods inside each repeat, so machine load hits both alike, and
each row reports the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import scipy.stats
import torch

from hf_levy.stable import sample_symmetric_stable

ALPHA = 1.5


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, kernels, lazy imports
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_torch(device: str, n: int, repeats: int) -> list[tuple[str, str, int, float, float]]:
    gen = torch.Generator(device=device).manual_seed(0)
    t = median_seconds(
        {
            "torch.randn": lambda: torch.randn(n, generator=gen, device=device),
            f"sample_symmetric_stable(alpha={ALPHA})": lambda: sample_symmetric_stable(
                n, ALPHA, generator=gen, dtype=torch.float32
            ),
        },
        repeats,
        torch.cuda.synchronize if device == "cuda" else (lambda: None),
    )
    return [(device, method, n, seconds, t["torch.randn"]) for method, seconds in t.items()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="samples per call for the torch methods")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per method (median reported)")
    parser.add_argument(
        "--cuda-n",
        type=int,
        nargs="+",
        help="sample counts for the CUDA rows (default: --n); near 1e6 both are bound by kernel launches",
    )
    parser.add_argument(
        "--scipy-n", type=int, default=100_000, help="samples per call for scipy (it is slower)"
    )
    parser.add_argument("--scipy-repeats", type=int, default=3, help="timed calls for scipy")
    args = parser.parse_args()

    rows: list[tuple[str, str, int, float, float]] = []  # device, method, n, seconds, randn seconds

    rows += bench_torch("cpu", args.n, args.repeats)
    if torch.cuda.is_available():
        for n in args.cuda_n or [args.n]:
            rows += bench_torch("cuda", n, args.repeats)

    # scipy at its own n; the ratio is per sample against the CPU torch.randn row.
    cpu_randn_per_sample = rows[0][3] / args.n
    t = median_seconds(
        {
            "scipy levy_stable.rvs": lambda: scipy.stats.levy_stable.rvs(
                ALPHA, 0, size=args.scipy_n, random_state=0
            )
        },
        args.scipy_repeats,
        lambda: None,
    )
    rows.append(
        (
            "cpu",
            "scipy levy_stable.rvs",
            args.scipy_n,
            t["scipy levy_stable.rvs"],
            cpu_randn_per_sample * args.scipy_n,
        )
    )

    print(
        f"torch {torch.__version__}, scipy {scipy.__version__}, torch threads {torch.get_num_threads()}, float32\n"
    )
    print("| device | method | n | median ms | ns / sample | x torch.randn (per sample) |")
    print("|---|---|---:|---:|---:|---:|")
    for device, method, n, seconds, randn_seconds in rows:
        print(
            f"| {device} | {method} | {n:,} | {seconds * 1e3:.2f} | {seconds / n * 1e9:.2f} | {seconds / randn_seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
