"""Top-K Hessian eigenpairs of a tiny trained HF Llama: `hf_levy.lanczos` next to scipy eigsh and PyHessian.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_eigensolvers.py --size small --k 1,4,8,16 --warm-steps 0,5,20
          OMP_NUM_THREADS=1 python benchmarks/bench_eigensolvers.py --size large --k 8 --repeats 3 --warm-steps 0,5,20
Hardware: CPU, one thread. Runtime on a shared 2-core machine: ~4 min (small, 4 values of K) and
          ~6 min at 3 repeats (large, K = 8; training ~40 s, each float64 truth ~20 s, PyHessian at tol/100
          ~40 s per repeat). Large K = 16 adds ~500 PyHessian products per repeat: `--pyhessian-max-k 8` skips them.
Outcome:  a markdown table, one row per (K, method):
  - products: Hessian-vector products the method made (counted by wrapping its product; deterministic,
    every start vector is seeded); wall s and t/grad (wall time over one float32 gradient, both medians of
    interleaved repeats), each including the method's one first-order graph build;
  - max rel err: max_i |λ̂_i − λ_i| / |λ_i| over the K largest algebraic eigenvalues, both sorted
    descending; min |align|: min_i |<v̂_i, u_i>| with the true unit eigenvectors; ≤ tol: max rel err ≤ tol;
    certified: the method's own claim (`Eigenpairs.converged`; eigsh returned without ArpackNoConvergence;
    PyHessian makes no such claim).
  Targets: hf_levy uses no more products than eigsh and at least 4x fewer than PyHessian, and a warm start
  from the previous eigenvectors after 20 more training steps uses at most 50% of a cold start's.

Methods, all at tol = `--tol` (1e-3) on the same float32 model and batch:
  - hf_levy lanczos, cold: `lanczos(make_hvp(...), P, K, tol=tol, generator=seeded)`;
  - scipy eigsh: `eigsh(LinearOperator(float32 product), k=K, which='LA', tol=tol, v0=seeded)` (ARPACK,
    single precision);
  - PyHessian: `hessian(model wrapper, CrossEntropyLoss(), data=(ids, targets), cuda=False)
    .eigenvalues(top_n=K, maxIter=100, tol=tol)` with the global RNG seeded; it returns the largest
    MAGNITUDE eigenvalues, scored against the largest algebraic truth like every method;
  - PyHessian, tol/100 (`--pyhessian-tight`, default 100): the same call with tol = tol/100. PyHessian's tol
    bounds the change of an eigenvalue between two power steps, not its error, and at tol it stops with
    errors above tol; this row is what it costs when asked tightly enough to land within tol (its
    "≤ tol" column says whether it did), the fair count for the 4x target;
  - hf_levy lanczos, finite-difference product (informative; not part of the targets): the product of
    `make_hvp(method="finite_difference")` at its default step;
  - after N more AdamW steps (`--warm-steps`, default 0 and 20; same optimizer and data stream, at
    `--warm-lr` if given, e.g. a fine-tuning learning rate 10x below the training one): hf_levy
    lanczos cold on the new Hessian vs warm-started with `init` = the first cold run's eigenvectors (N = 0:
    the same Hessian restarted from its own converged vectors, the best a warm start can do).
Ground truth: ARPACK `eigsh(k=max K + 4, which='LA', tol=1e-10)` on the exact float64 product of a copy of the
model that is float64 throughout (`_tiny_llama.float64_copy`: HF keeps RMSNorm and softmax in float32).
The setup (models, data, training, sketch batch) is `_tiny_llama.trained_setup` (see
docs/research/benchmarks.md).
"""

from __future__ import annotations

import os

# Before torch and numpy start their thread pools: on cores shared with other jobs, more threads made training
# ~20x and a small product ~180x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy
import torch
import transformers
from _tiny_llama import float64_copy, lm_loss, top_eigenpairs_float64, trained_setup
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor, nn

from hf_levy import lanczos, make_hvp, trainable_parameters

SEED = 0


@dataclass
class Result:
    values_K: Tensor  # float64, descending
    vectors_PK: Tensor  # float64, unit columns paired with values_K
    products: int
    certified: bool | None  # None: the method makes no claim


class Counted:
    """Wraps a product and counts its calls."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(v)


def sorted_pairs(values: Tensor, vectors_PK: Tensor, products: int, certified: bool | None) -> Result:
    order = values.double().argsort(descending=True)
    vectors_PK = vectors_PK.double()[:, order]
    return Result(values.double()[order], vectors_PK / vectors_PK.norm(dim=0), products, certified)


def run_lanczos(
    model, batch, k: int, tol: float, init: Tensor | None = None, method: str = "autograd", seed: int = SEED
) -> Result:
    params = trainable_parameters(model)
    hvp = Counted(make_hvp(model, batch, params, method=method))
    dim = sum(p.numel() for p in params)
    pairs = lanczos(hvp, dim, k, tol=tol, init=init, generator=torch.Generator().manual_seed(seed))
    return sorted_pairs(pairs.values, pairs.vectors, hvp.calls, pairs.converged)


def run_eigsh(model, batch, k: int, tol: float, seed: int = SEED) -> Result:
    params = trainable_parameters(model)
    hvp = Counted(make_hvp(model, batch, params))
    dim = sum(p.numel() for p in params)
    op = LinearOperator(
        (dim, dim),
        matvec=lambda x: hvp(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))).numpy(),
        dtype=np.float32,
    )
    v0 = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    try:
        values, vectors = eigsh(op, k=k, which="LA", tol=tol, v0=v0)
        certified = True
    except ArpackNoConvergence as err:
        values, vectors, certified = err.eigenvalues, err.eigenvectors, False
    return sorted_pairs(torch.from_numpy(values), torch.from_numpy(vectors), hvp.calls, certified)


class ShiftedLogits(nn.Module):
    """PyHessian's model: ids -> next-token logits (B*(T-1), V), scored by CrossEntropyLoss on ids[:, 1:]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits[:, :-1].flatten(0, 1)


def run_pyhessian(model, batch, k: int, tol: float) -> Result:
    # The attribute pyhessian.hessian is the class; the module holds the product it calls.
    module = importlib.import_module("pyhessian.hessian")
    original, calls = module.hessian_vector_product, 0

    def counted(*args):
        nonlocal calls
        calls += 1
        return original(*args)

    module.hessian_vector_product = counted
    ids = batch["input_ids"]
    was_training = model.training
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():  # it draws start vectors from the global RNG
            warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")
            torch.manual_seed(SEED)
            solver = module.hessian(
                ShiftedLogits(model), nn.CrossEntropyLoss(), data=(ids, ids[:, 1:].flatten()), cuda=False
            )
            values, vectors = solver.eigenvalues(maxIter=100, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product = original
        model.train(was_training)  # its constructor calls model.eval()
        for p in model.parameters():
            p.grad = None  # it leaves create_graph gradients in .grad
    flat_PK = torch.stack([torch.cat([t.detach().reshape(-1) for t in v]) for v in vectors], dim=1)
    return sorted_pairs(torch.tensor(values), flat_PK, calls, None)


def time_interleaved(runs: dict[str, Callable[[], Result]], repeats: int, gradient: Callable[[], None]):
    """Each run `repeats` times in turn (with a gradient timing between), so load hits all alike.

    Returns the last Result of each run, its median seconds, and the median seconds of one gradient.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    grad_seconds: list[float] = []
    results: dict[str, Result] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            gradient()
            grad_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in seconds.items()}
    return results, medians, statistics.median(grad_seconds)


def score(result: Result, values_T: Tensor, vectors_PT: Tensor) -> tuple[float, float]:
    k = len(result.values_K)
    rel_err = ((result.values_K - values_T[:k]).abs() / values_T[:k].abs()).max().item()
    align = (result.vectors_PK * vectors_PT[:, :k]).sum(dim=0).abs().min().item()
    return rel_err, align


def ground_truth(model, batch, k: int) -> tuple[Tensor, Tensor, int, float]:
    model64 = float64_copy(model)
    params64 = trainable_parameters(model64)
    hvp64 = Counted(make_hvp(model64, batch, params64, loss_fn=lm_loss))
    start = time.perf_counter()
    values, vectors = top_eigenpairs_float64(hvp64, sum(p.numel() for p in params64), k)
    return values, vectors, hvp64.calls, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", choices=["small", "large"], default="small", help="small: 7k params, large: 1M"
    )
    parser.add_argument("--k", default="1,4,8,16", help="comma-separated numbers of eigenpairs")
    parser.add_argument("--tol", type=float, default=1e-3, help="tolerance given to every method")
    parser.add_argument("--train-steps", type=int, default=300, help="AdamW steps before the first Hessian")
    parser.add_argument(
        "--warm-steps", default="0,20", help="comma-separated further AdamW steps before each warm start"
    )
    parser.add_argument(
        "--warm-lr",
        type=float,
        default=None,
        help="learning rate of the further steps (default: the training one; e.g. 10x lower for fine-tuning)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (median reported)")
    parser.add_argument("--pyhessian-max-k", type=int, default=16, help="skip PyHessian above this K (slow)")
    parser.add_argument(
        "--pyhessian-tight", type=float, default=100.0, help="add a PyHessian row at tol / this (0: none)"
    )
    parser.add_argument(
        "--start-seeds",
        type=int,
        default=1,
        help="also count cold lanczos and eigsh products from this many start vectors (seeds 0..N-1)",
    )
    parser.add_argument("--no-fd", action="store_true", help="skip the finite-difference Lanczos row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    tol = args.tol
    warm_steps = sorted(int(n) for n in args.warm_steps.split(","))

    start = time.perf_counter()
    model, _, trainer, batch = trained_setup(args.size, args.train_steps)
    train_seconds = time.perf_counter() - start
    params = trainable_parameters(model)
    dim = sum(p.numel() for p in params)

    def gradient() -> None:
        torch.autograd.grad(model(**batch).loss, params)

    values_T, vectors_PT, truth_products, truth_seconds = ground_truth(model, batch, max(ks) + 4)
    truths = {0: (values_T, vectors_PT)}
    rows: list[tuple] = []  # K, method, Result, seconds, grad seconds, rel err, align
    previous: dict[int, Tensor] = {}
    for k in ks:
        runs: dict[str, Callable[[], Result]] = {
            "hf_levy lanczos, cold": lambda k=k: run_lanczos(model, batch, k, tol),
            "scipy eigsh": lambda k=k: run_eigsh(model, batch, k, tol),
        }
        if k <= args.pyhessian_max_k:
            runs["PyHessian"] = lambda k=k: run_pyhessian(model, batch, k, tol)
            if args.pyhessian_tight:
                runs[f"PyHessian, tol/{args.pyhessian_tight:g}"] = lambda k=k: run_pyhessian(
                    model, batch, k, tol / args.pyhessian_tight
                )
        if not args.no_fd:
            runs["hf_levy lanczos, cold, FD product"] = lambda k=k: run_lanczos(
                model, batch, k, tol, method="finite_difference"
            )
        results, seconds, grad = time_interleaved(runs, args.repeats, gradient)
        previous[k] = results["hf_levy lanczos, cold"].vectors_PK.float()
        for name, result in results.items():
            rows.append((k, name, result, seconds[name], grad, *score(result, values_T, vectors_PT)))

    # Product counts depend on the start vector: the same cold runs from other seeded start vectors.
    spread = {
        (k, name): [run(model, batch, k, tol, seed=seed).products for seed in range(args.start_seeds)]
        for k in ks
        for name, run in (("hf_levy lanczos", run_lanczos), ("scipy eigsh", run_eigsh))
        if args.start_seeds > 1
    }

    # Warm starts: train on (same optimizer, same data stream), then start from the vectors of the first cold run.
    # +0 steps is the floor of the mechanism: the same Hessian, restarted from its own converged vectors.
    if args.warm_lr is not None:
        for group in trainer.optimizer.param_groups:
            group["lr"] = args.warm_lr
    trained = 0
    for n in warm_steps:
        trainer.steps(n - trained)
        trained = n
        if n > 0:
            truths[n] = ground_truth(model, batch, max(ks) + 4)[:2]
        for k in ks:
            runs = {f"hf_levy lanczos, cold, +{n} steps": lambda k=k: run_lanczos(model, batch, k, tol)}
            if n == 0:
                runs = {}
            runs[f"hf_levy lanczos, warm, +{n} steps"] = lambda k=k: run_lanczos(
                model, batch, k, tol, init=previous[k]
            )
            results, seconds, grad = time_interleaved(runs, args.repeats, gradient)
            for name, result in results.items():
                rows.append((k, name, result, seconds[name], grad, *score(result, *truths[n])))
    rows.sort(key=lambda row: row[0])  # stable: methods keep their order within each K

    print(
        f"- size {args.size}: P = {dim:,} parameters, loss {lm_loss(model, batch).item():.3f} on the sketch batch "
        f"(8 x 32 tokens) after {args.train_steps}+{trained} AdamW steps ({train_seconds:.0f} s for the "
        f"first {args.train_steps}); tol {tol:g}; median of {args.repeats} interleaved repeats"
        + (f"; further steps at lr {args.warm_lr:g}" if args.warm_lr is not None else "")
        + ".\n"
        f"- Truth: ARPACK float64, k = {max(ks) + 4}, {truth_products} products, {truth_seconds:.0f} s."
    )
    for n, (values, _) in truths.items():
        print(
            f"- Top eigenvalues after +{n} steps: "
            + ", ".join(f"{v:.2f}" for v in values[: max(ks) + 1].tolist())
        )
    print(
        f"- torch {torch.__version__}, transformers {transformers.__version__}, scipy {scipy.__version__}, "
        f"torch threads {torch.get_num_threads()}.\n"
    )
    print(
        f"Top-{','.join(map(str, ks))} eigenpairs, size {args.size}. Targets (products): hf_levy lanczos cold ≤ "
        f"scipy eigsh, PyHessian ≥ 4x hf_levy, warm ≤ 50% of cold after +{max(warm_steps)} steps.\n"
    )
    print("| K | method | products | wall s | t/grad | max rel err | min \\|align\\| | ≤ tol | certified |")
    print("|---:|---|---:|---:|---:|---:|---:|:-:|:-:|")
    for k, name, result, secs, grad, rel_err, align in rows:
        certified = {True: "yes", False: "no", None: "–"}[result.certified]
        print(
            f"| {k} | {name} | {result.products} | {secs:.2f} | {secs / grad:.0f} | {rel_err:.1e} | {align:.3f} | "
            f"{'yes' if rel_err <= tol else 'no'} | {certified} |"
        )

    print(
        "\nretained: ||U_oldᵀ U_new||_F² / K, the share of the true top-K subspace that survived the steps.\n"
    )
    products = {(k, name): result.products for k, name, result, *_ in rows}
    for k in ks:
        ours = products[(k, "hf_levy lanczos, cold")]
        line = f"- K={k}: hf_levy {ours} vs eigsh {products[(k, 'scipy eigsh')]}"
        for name in ("PyHessian", f"PyHessian, tol/{args.pyhessian_tight:g}"):
            if (k, name) in products:
                line += f"; {name} / hf_levy = {products[(k, name)] / ours:.1f}x"
        for n in warm_steps:
            cold = products.get((k, f"hf_levy lanczos, cold, +{n} steps"), ours)
            warm = products[(k, f"hf_levy lanczos, warm, +{n} steps")]
            retained = (vectors_PT[:, :k].T @ truths[n][1][:, :k]).pow(2).sum().item() / k
            line += (
                f"; +{n} steps: warm / cold = {warm} / {cold} = {warm / cold:.0%} (retained {retained:.2f})"
            )
        print(line)
    if spread:
        print(
            f"\nProducts from {args.start_seeds} start vectors (seeds 0..{args.start_seeds - 1}), cold, before the further steps:\n"
        )
        for (k, name), counts in spread.items():
            print(f"- K={k}, {name}: {counts}, mean {sum(counts) / len(counts):.1f}")


if __name__ == "__main__":
    main()
