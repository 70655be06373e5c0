"""Cost and accuracy of `hf_levy.make_hvp` on tiny trained HF Llamas.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_hvp.py [--sizes small,large] [--train-steps 300]
Hardware: CPU, one thread. Runtime: ~70 s on a shared 2-core machine (40 s of it trains the large model).
Outcome:  two markdown tables.
  1. Cost of one product in float32 gradients (forward + backward on the same model and batch): autograd on a
     reused first-order graph (per product, and the one-time graph build), autograd rebuilding the graph
     every product (`reuse_graph=False`), central finite difference. Medians of interleaved repeats, so
     machine load hits every variant alike; only the ratios mean anything on shared cores.
  2. Accuracy ||Hv - H*v|| / ||H*v|| against the exact float64 product H*v at the same weights, along a
     seeded random unit vector and along the top eigenvector: the float32 autograd product (reference
     level), finite differences in float32 at the library's default step and at fixed steps, and the same
     with the model cast to bfloat16 (the weights rounded to bf16; the truth is then taken at those
     rounded weights, so the error is the product's alone).
The float64 truth runs on a copy with dtype-preserving RMSNorm and softmax (`_tiny_llama.float64_copy`;
a plain `.double()` Llama keeps them in float32) and the explicit loss `_tiny_llama.lm_loss`.
The setup (models, data, training) is `_tiny_llama.trained_setup` (see docs/research/benchmarks.md).
"""

from __future__ import annotations

import os

# Before torch and numpy start their thread pools: on cores shared with other jobs, more threads made training
# ~20x and a small product ~180x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import copy

import torch
import transformers
from _tiny_llama import (
    float64_copy,
    interleaved_medians,
    lm_loss,
    top_eigenpairs_float64,
    trained_setup,
)

from hf_levy import make_hvp, trainable_parameters
from hf_levy.hvp import finite_difference_step

FIXED_STEPS = {torch.float32: (1e-2, 1e-3, 1e-4), torch.bfloat16: (1e-1, 1e-2)}


def cost_rows(model, batch, repeats: int) -> dict[str, float]:
    """Median seconds of a gradient, a graph build, and one product of each kind, interleaved."""
    params = trainable_parameters(model)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    reused = make_hvp(model, batch, params)
    fresh = make_hvp(model, batch, params, reuse_graph=False)
    fd = make_hvp(model, batch, params, method="finite_difference")

    def gradient() -> None:
        torch.autograd.grad(model(**batch).loss, params)

    return interleaved_medians(
        {
            "gradient (forward + backward)": gradient,
            "autograd, reused graph: one-time build": lambda: make_hvp(model, batch, params),
            "autograd, reused graph: per product": lambda: reused(v),
            "autograd, fresh graph per product (reuse_graph=False)": lambda: fresh(v),
            "finite difference (2 gradients)": lambda: fd(v),
        },
        repeats,
    )


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.double() - exact).norm() / exact.norm()).item()


def accuracy_rows(model, batch) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Relative error of each product along (random unit v, top eigenvector u1); the default FD steps."""
    params = trainable_parameters(model)
    dim = sum(p.numel() for p in params)
    random_P = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    random_P /= random_P.norm()
    model64 = float64_copy(model)
    exact64 = make_hvp(model64, batch, trainable_parameters(model64), loss_fn=lm_loss)
    _, vectors = top_eigenpairs_float64(exact64, dim, 1)
    directions = (random_P, vectors[:, 0])
    rows: dict[str, tuple[float, float]] = {}

    def score(name: str, hvp, truth) -> None:
        rows[name] = tuple(relative_error(hvp(d.float()), t) for d, t in zip(directions, truth, strict=True))

    truth32 = [exact64(d) for d in directions]
    params = trainable_parameters(model)
    score("float32 autograd (exact)", make_hvp(model, batch, params), truth32)
    steps = {"float32": finite_difference_step(params)}
    score("float32 FD, default step", make_hvp(model, batch, params, method="finite_difference"), truth32)
    for step in FIXED_STEPS[torch.float32]:
        score(
            f"float32 FD, step {step:.0e}",
            make_hvp(model, batch, params, method="finite_difference", fd_step=step),
            truth32,
        )

    model16 = copy.deepcopy(model).to(torch.bfloat16)
    rounded64 = float64_copy(model16)  # the bf16-rounded weights, exactly, in float64
    exact16 = make_hvp(rounded64, batch, trainable_parameters(rounded64), loss_fn=lm_loss)
    truth16 = [exact16(d) for d in directions]
    params16 = trainable_parameters(model16)
    rows["H*(bf16 weights) vs H*(float32 weights)"] = tuple(
        relative_error(a, b) for a, b in zip(truth16, truth32, strict=True)
    )
    score("bf16 autograd (exact)", make_hvp(model16, batch, params16), truth16)
    steps["bf16"] = finite_difference_step(params16)
    score("bf16 FD, default step", make_hvp(model16, batch, params16, method="finite_difference"), truth16)
    for step in FIXED_STEPS[torch.bfloat16]:
        score(
            f"bf16 FD, step {step:.0e}",
            make_hvp(model16, batch, params16, method="finite_difference", fd_step=step),
            truth16,
        )
    return rows, steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="small,large", help="comma-separated: small (7k params), large (1M)"
    )
    parser.add_argument("--train-steps", type=int, default=300, help="AdamW steps before measuring")
    parser.add_argument(
        "--repeats", default="small=30,large=10", help="timed repeats per size (median reported)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    repeats = {k: int(v) for k, v in (item.split("=") for item in args.repeats.split(","))}

    costs, errors, steps = {}, {}, {}
    for size in sizes:
        model, _, _, batch = trained_setup(size, args.train_steps)
        costs[size] = cost_rows(model, batch, repeats[size])
        errors[size], steps[size] = accuracy_rows(model, batch)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads "
        f"{torch.get_num_threads()}, sketch batch 8 x 32 tokens, {args.train_steps} AdamW steps\n"
    )
    print(
        "Cost of one product, in float32 gradients (median of interleaved repeats; gradient ms in brackets)\n"
    )
    print("| variant | " + " | ".join(f"{s} ({repeats[s]} repeats)" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in costs[sizes[0]]:
        cells = []
        for s in sizes:
            grad = costs[s]["gradient (forward + backward)"]
            cell = f"{costs[s][name] / grad:.2f}"
            cells.append(cell + (f" ({grad * 1e3:.1f} ms)" if name.startswith("gradient") else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")

    print(
        "\nAccuracy ||Hv - H*v|| / ||H*v|| against the exact float64 product (random unit v / top eigenvector u1)\n"
    )
    print("| product | " + " | ".join(f"{s}, random v | {s}, u1" for s in sizes) + " |")
    print("|---|" + "---:|---:|" * len(sizes))
    for name in errors[sizes[0]]:
        cells = [f"{e:.1e}" for s in sizes for e in errors[s][name]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for dtype in steps[sizes[0]]:
        print(f"\n{dtype} default step ε (`finite_difference_step`): ", end="")
        print(", ".join(f"{s} {steps[s][dtype]:.1e}" for s in sizes))


if __name__ == "__main__":
    main()
