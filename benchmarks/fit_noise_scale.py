"""Does the gradient noise scale predict the batch gap? Reads a `noise_scale_prediction` run folder.

Command:  python benchmarks/fit_noise_scale.py runs/noise_scale_prediction
Outcome:  the stock steps to target per batch size and seed; the least-squares fit of
          S(B) = S_min (1 + B_noise / B) (linear in 1/B: S = S_min + S_min B_noise / B) over all runs that
          reached the target and per seed; and per seed the B_simple that the levy_scale0_noise_scale arm
          logged (levy/gradient_noise_scale): first value, median and 10-90% over training, last value, and
          the value where the arms part (the first evaluation at which batch 128 leads the full batch by at
          least 0.05 test accuracy).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ARMS = {"stock_batch_64": 64, "stock_batch_128": 128, "stock_batch_256": 256, "stock_batch_512": 512}
PART_BY = 0.05


def read(run: pathlib.Path, arm: str, seed: int, name: str):
    path = run / arm / f"seed{seed}" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fit(pairs: list[tuple[int, int]]) -> tuple[float, float]:
    """(S_min, B_noise) of S = S_min (1 + B_noise / B) by least squares over (B, S) pairs."""
    x = np.array([1.0 / b for b, _ in pairs])
    y = np.array([s for _, s in pairs], dtype=float)
    (s_min, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    return s_min, slope / s_min


def evals(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["eval_accuracy"] for h in history if "eval_accuracy" in h}


def main(run: pathlib.Path) -> None:
    full = read(run, "stock_full_batch", 0, "summary")["global_batch_size"]
    batches = {**ARMS, "stock_full_batch": full}
    steps = {b: [(read(run, arm, s, "summary") or {}).get("steps_to_target") for s in range(3)]
             for arm, b in batches.items()}  # fmt: skip
    print("steps to target (seeds 0, 1, 2):", steps)
    pairs = [(b, s) for b, ss in steps.items() for s in ss if s is not None]
    print("fit over all runs: S_min = {:.0f}, B_noise = {:.0f}".format(*fit(pairs)))
    for seed in range(3):
        own = [(b, ss[seed]) for b, ss in steps.items() if ss[seed] is not None]
        print(f"seed {seed}: S_min = {fit(own)[0]:.0f}, B_noise = {fit(own)[1]:.0f} over {own}")
        history = read(run, "levy_scale0_noise_scale", seed, "log_history")
        if history is None:
            continue
        logged = [
            (h["step"], h["levy/gradient_noise_scale"]) for h in history if "levy/gradient_noise_scale" in h
        ]
        values = np.array([v for _, v in logged])
        big, small = (
            evals(read(run, "stock_full_batch", seed, "log_history")),
            evals(read(run, "stock_batch_128", seed, "log_history")),
        )
        part = next(
            (st for st in sorted(small) if any(k <= st for k in big)
             and small[st] - big[max(k for k in big if k <= st)] >= PART_BY),
            None,
        )  # fmt: skip
        there = min(logged, key=lambda sv: abs(sv[0] - part))[1] if part is not None else float("nan")
        low, mid, high = np.percentile(values, [10, 50, 90])
        print(
            f"seed {seed}: B_simple first {values[0]:.0f} (step {logged[0][0]}), median {mid:.0f} "
            f"(10-90%: {low:.0f}-{high:.0f}), last {values[-1]:.0f}; arms part at step {part}: {there:.0f}"
        )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
