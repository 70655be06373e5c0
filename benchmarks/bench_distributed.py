"""Sketch time, memory and communication per rank against the number of ranks, on CPU processes (gloo).

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--ranks 1,2] [--modes ddp,fsdp]
Hardware: CPU, one torch thread per process, gloo. Runtime: ~6 min on a shared 2-core machine.
Outcome:  two markdown tables.
  1. Per mode and number of ranks: the sketch refresh's wall seconds (max over ranks), products, seconds per
     product, this rank's peak RSS increase during the refresh, V and the Lanczos basis held per rank.
  2. Communication the refresh adds, per rank: every call to torch.distributed all_reduce / broadcast /
     all_gather_single / reduce_scatter_single / all_gather_into_tensor / reduce_scatter_tensor made while
     the sketch refreshes is counted (bytes = numel x element size of the tensor passed: the whole tensor for
     an all-reduce or broadcast, the gathered output of an all-gather, the input of a reduce-scatter), split
     into per-product traffic and the rest, next to the formula.

The script launches itself with `python -m torch.distributed.run --standalone --nproc_per_node N`:
  * ddp: LevyTrainer (`use_cpu=True, ddp_backend="gloo"`) on a LlamaForCausalLM from config (vocab 256,
    hidden 128, 5 layers, eager attention: 1,055,104 parameters), one optimizer step of 8 x 128 tokens per
    rank with the sketch at step 0 (K = 8, `lanczos_num_iters=48` at tol 1e-12 so that every run does the same
    48 products, sketch batch 16 x 128 split across the ranks). The products are exact double backward on the
    unwrapped model, averaged with one all-reduce each; after the refresh rank 0 broadcasts V.
  * fsdp: the same model under raw FSDP2 (`fully_shard` on each decoder layer and the root, as
    tests/distributed/fsdp_sketch.py), the sketch of hf_levy (ParameterSpace, finite-difference products,
    HessianSketch.refresh with the sharded reduction), same sketch batch and settings. Accelerate enables FSDP
    only on GPUs, so the Trainer path itself cannot run here.
On one rank the collectives are still called (world size 1) and counted; on 2 ranks the two processes share
the 2 cores with other jobs, so times are indicative only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
)


class CommCounter:
    """Wraps torch.distributed collectives; while ``active``, records (op, bytes, phase) per call."""

    def __init__(self):
        self.active, self.phase, self.calls = False, "other", []
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                if name == "reduce_scatter_single":
                    t = kwargs.get("input", args[1] if len(args) > 1 else None)
                elif name in ("all_gather_single", "all_gather_into_tensor"):
                    t = kwargs.get("output_tensor", args[0] if args else None)
                elif name == "reduce_scatter_tensor":
                    t = kwargs.get("input", args[1] if len(args) > 1 else None)
                else:
                    t = kwargs.get("tensor", args[0] if args else None)
                self.calls.append((name, t.numel() * t.element_size(), str(t.dtype), self.phase))
            return fn(*args, **kwargs)

        return counted


class PeakRss:
    def __init__(self):
        self.peak, self.stop = 0, False
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak


def ddp_worker(cli, counter: CommCounter) -> dict:
    from _tiny_llama import RandomTokens, token_model
    from transformers import PrinterCallback, default_data_collator

    from hf_levy import LevyConfig, LevyTrainer

    args = LevyConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_dist_"),
        max_steps=1,
        per_device_train_batch_size=cli.train_batch,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        num_eigenpairs=cli.k,
        lanczos_num_iters=cli.iters,
        lanczos_tol=1e-12,
        sketch_batch_size=cli.sketch_batch,
        sketch_every_n_steps=50,
    )
    trainer = LevyTrainer(
        model=token_model("1M", cli.seq_len),
        args=args,
        train_dataset=RandomTokens(256, cli.seq_len, seed=1),
        data_collator=default_data_collator,
    )
    trainer.remove_callback(PrinterCallback)
    cb = trainer.levy_callback
    out: dict = {"products": 0}
    matvec, on_step_begin = cb._matvec, cb.on_step_begin

    def counted_matvec(*args):
        counter.phase = "setup"
        hvp = matvec(*args)

        def product(v):
            counter.phase = "product"
            out["products"] += 1
            try:
                return hvp(v)
            finally:
                counter.phase = "lanczos"

        counter.phase = "lanczos"
        return product

    def timed_step_begin(args, state, control, **kwargs):
        rss = PeakRss()
        start_rss = rss.reset()
        dist.barrier()
        counter.active, counter.phase = True, "setup"
        start = time.perf_counter()
        on_step_begin(args, state, control, **kwargs)  # the refresh, then rank 0 broadcasts V
        out["seconds"] = time.perf_counter() - start
        counter.active = False
        out["rss_increase"] = rss.peak - start_rss
        rss.stop = True

    cb._matvec, cb.on_step_begin = counted_matvec, timed_step_begin
    trainer.train()
    sketch, dim = cb.run.sketch, cb.run.space.dim
    out.update(
        P=dim,
        vectors=sketch.vectors_PK.nbytes,
        basis=out["products"] * dim * sketch.vectors_PK.element_size(),
        world=dist.get_world_size(),
    )
    return out


def fsdp_worker(cli, counter: CommCounter) -> dict:
    from _tiny_llama import RandomTokens, token_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_levy import make_hvp, trainable_parameters
    from hf_levy.params import ParameterSpace
    from hf_levy.sketch import HessianSketch, SketchSettings

    rank, world = dist.get_rank(), dist.get_world_size()
    model = token_model("1M", cli.seq_len)
    p_global = sum(p.numel() for p in model.parameters())
    # The root group (embeddings, final norm, LM head) stays gathered between forward and backward.
    p_root = p_global - sum(p.numel() for p in model.model.layers.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = RandomTokens(cli.sketch_batch, cli.seq_len, seed=1).ids[rank::world]
    batch = {"input_ids": ids, "labels": ids}
    space = ParameterSpace(trainable_parameters(model))
    settings = SketchSettings(
        num_eigenpairs=cli.k, num_iters=cli.iters, tol=1e-12, seed=0, vector_dtype=torch.float32
    )
    sketch = HessianSketch(settings)
    out: dict = {"products": 0}
    rss = PeakRss()
    start_rss = rss.reset()
    dist.barrier()
    counter.active, counter.phase = True, "setup"
    start = time.perf_counter()
    hvp = make_hvp(model, batch, space.params, method="finite_difference")
    counter.phase = "lanczos"

    def product(v):
        counter.phase = "product"
        out["products"] += 1
        try:
            return space.pad(hvp(space.unpad(v)))
        finally:
            counter.phase = "lanczos"

    sketch.refresh(product, space.dim, step=0, reduce=space.reduce)
    out["seconds"] = time.perf_counter() - start
    counter.active = False
    out["rss_increase"] = rss.peak - start_rss
    rss.stop = True
    out.update(
        P=space.dim,
        P_global=p_global,
        P_root=p_root,
        vectors=sketch.vectors_PK.nbytes,
        basis=out["products"] * space.dim * sketch.vectors_PK.element_size(),
        world=world,
    )
    return out


def worker(cli) -> None:
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    counter = CommCounter()
    if cli.worker == "fsdp":
        dist.init_process_group("gloo")
    result = (ddp_worker if cli.worker == "ddp" else fsdp_worker)(cli, counter)
    calls = defaultdict(lambda: [0, 0])
    for op, nbytes, dtype, phase in counter.calls:
        key = f"{phase}|{op}|{dtype}"
        calls[key][0] += 1
        calls[key][1] += nbytes
    result["calls"] = dict(calls)
    result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = dist.get_rank()
    with open(os.path.join(cli.out, f"{cli.worker}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, nproc: int, cli) -> list[dict]:
    out = tempfile.mkdtemp(prefix=f"bench_dist_{mode}{nproc}_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.path.dirname(HERE)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        __file__,
        "--worker",
        mode,
        "--out",
        out,
        "--k",
        str(cli.k),
        "--iters",
        str(cli.iters),
        "--sketch-batch",
        str(cli.sketch_batch),
        "--train-batch",
        str(cli.train_batch),
        "--seq-len",
        str(cli.seq_len),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-6000:])
    return [json.load(open(os.path.join(out, f"{mode}_rank{r}.json"))) for r in range(nproc)]


def summarize(calls: dict, phase: str) -> tuple[int, int]:
    n = sum(c for key, (c, _) in calls.items() if key.startswith(phase + "|"))
    b = sum(b for key, (_, b) in calls.items() if key.startswith(phase + "|"))
    return n, b


def detail(calls: dict, phase: str) -> str:
    parts = [
        f"{key.split('|')[1]} {key.split('|')[2].replace('torch.', '')} ×{c}"
        for key, (c, _) in sorted(calls.items())
        if key.startswith(phase + "|")
    ]
    return ", ".join(parts) or "–"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--modes", default="ddp,fsdp")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=48)
    parser.add_argument("--sketch-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        worker(cli)
        return
    print(
        f"torch {torch.__version__}, gloo, one thread per process; model 1M (1,055,104 parameters), sketch batch "
        f"{cli.sketch_batch} x {cli.seq_len} split across ranks, K = {cli.k}, {cli.iters} products (tol 1e-12); "
        "MiB = 2^20 bytes\n"
    )
    cost = [
        "| mode | ranks | sketch s (max over ranks) | products | s / product | RSS increase during refresh "
        "(max rank) | V per rank | basis per rank | P per rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    comm = [
        "| mode | ranks | per product: calls | per product: bytes | formula per product "
        "| rest of the refresh: calls, bytes | what (rest) |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for mode in cli.modes.split(","):
        for nproc in [int(n) for n in cli.ranks.split(",")]:
            ranks = launch(mode, nproc, cli)
            r0 = ranks[0]
            n = r0["products"]
            seconds = max(r["seconds"] for r in ranks)
            cost.append(
                f"| {mode} | {nproc} | {seconds:.1f} | {n} | {seconds / n:.3f} "
                f"| {max(r['rss_increase'] for r in ranks) / MiB:,.1f} MiB | {r0['vectors'] / MiB:,.1f} MiB "
                f"| {r0['basis'] / MiB:,.1f} MiB | {r0['P']:,} |"
            )
            pc, pb = summarize(r0["calls"], "product")
            sc, sb = summarize(r0["calls"], "setup")
            lc, lb = summarize(r0["calls"], "lanczos")
            p = r0["P"] if mode == "ddp" else r0["P_global"]
            root = r0.get("P_root", 0)
            if nproc == 1 and mode == "ddp":
                formula = "none on one rank"
            elif nproc == 1:
                formula = "8: one float64 all-reduce (‖v‖²); FSDP skips its collectives on one rank"
            elif mode == "ddp":
                formula = f"4P = {4 * p:,}"
            else:
                formula = (
                    f"2 gradients × (all-gather 4P + all-gather 4(P − P_root) + reduce-scatter 4P) + 8 "
                    f"= {2 * (4 * p + 4 * (p - root) + 4 * p) + 8:,} (P_root = {root:,})"
                )
            what = (
                f"setup: {detail(r0['calls'], 'setup')}; Lanczos and after: {detail(r0['calls'], 'lanczos')}"
            )
            if mode == "ddp" and nproc > 1:
                what += f" (formula: 8 + 4PK + 8K = {8 + 4 * p * cli.k + 8 * cli.k:,})"
            elif mode == "fsdp":
                what += f" ({lc / n:.1f} per Lanczos iteration)"
            comm.append(
                f"| {mode} | {nproc} | {pc / n:.1f} | {pb / n:,.0f} | {formula} | {sc + lc}, {sb + lb:,} | {what} |"
            )
            print(cost[-1], "\n", comm[-1], flush=True)
    print("\nSketch refresh per rank\n")
    print("\n".join(cost))
    print("\nCommunication of one refresh, per rank (bytes of the tensors passed to the collectives)\n")
    print("\n".join(comm))


if __name__ == "__main__":
    main()
