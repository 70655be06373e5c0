"""Peak extra memory of LevyTrainer over the stock Trainer, against the formula of docs/concepts.md.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--sizes 1M,5M]
Hardware: CPU, one torch thread. Runtime: ~8 min on a shared 2-core machine (the 5M sketches dominate).
Outcome:  two markdown tables.
  1. Per model and arm (stock Trainer; LevyTrainer with float32 vectors; with `sketch_dtype="bfloat16"` when
     LevyConfig has that field): peak RSS of a fresh process (`ru_maxrss`), the peak during the sketch step and
     during the other steps (a 2 ms RSS sampler reset at every step), the RSS after training, and the tensors
     the sketch holds: V (`vectors_PK.nbytes`) and the Lanczos basis (rows used x P x itemsize, read from the
     `Eigenpairs` it returns; `torch.empty` reserves all `lanczos_num_iters` rows, but on CPU only the rows
     written become resident).
  2. Formula against measurement: kept = itemsize·P·K, refresh = itemsize·P·(K + rows) + the sketch batch's
     product graph (the tensors saved by the first-order graph built with create_graph=True, counted once per
     storage by a saved-tensors hook, parameters excluded), next to the RSS differences.

Each arm runs in its own subprocess (peak RSS is per process and never goes down): 3 optimizer steps on a
LlamaForCausalLM from config (eager attention, vocab 256), batch 8 x 128 random tokens, sketch at step 0 on
8 x 128 tokens with K = 8 and `lanczos_num_iters=48` at tol 1e-12, so the basis fills all 48 rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssSampler:
    """Polls this process's RSS every ``period`` seconds; ``take()`` returns the peak since the last take."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self.stop = period, rss_bytes(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def take(self) -> int:
        peak, self.peak = max(self.peak, rss_bytes()), rss_bytes()
        return peak


def saved_tensor_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total


def child(spec: dict) -> dict:
    """One arm in this process; returns its measurements."""
    import transformers
    from _tiny_llama import RandomTokens, token_model
    from bench_trainer_step import common_args
    from transformers import (
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    import hf_levy.sketch
    from hf_levy import LevyConfig, LevyTrainer, make_hvp, trainable_parameters
    from hf_levy._run_hvp import sketch_batch

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    baseline = rss_bytes()
    model = token_model(spec["size"], spec["seq_len"])
    params = trainable_parameters(model)
    p = sum(q.numel() for q in params)
    data = RandomTokens(256, spec["seq_len"])
    # The step benchmark's arguments (its learning rate too: memory does not depend on it).
    common = common_args(tempfile.mkdtemp(prefix="bench_mem_"), spec["steps"], spec["batch"])
    if spec["arm"] == "Trainer":
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    else:
        levy = dict(
            num_eigenpairs=spec["k"],
            lanczos_num_iters=spec["iters"],
            lanczos_tol=1e-12,
            sketch_batch_size=spec["sketch_batch"],
            sketch_every_n_steps=10 * spec["steps"],
            **spec.get("levy", {}),
        )
        trainer = LevyTrainer(
            model=model,
            args=LevyConfig(**common, **levy),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    trainer.remove_callback(PrinterCallback)

    basis: dict[str, int] = {}
    lanczos = hf_levy.sketch.lanczos

    def recording_lanczos(matvec, dim, k, **kwargs):
        pairs = lanczos(matvec, dim, k, **kwargs)
        itemsize = pairs.vectors.element_size()
        basis.update(rows=pairs.num_matvecs, reserved_rows=kwargs["num_iters"], itemsize=itemsize, dim=dim)
        return pairs

    hf_levy.sketch.lanczos = recording_lanczos
    sampler = RssSampler()
    steps: list[dict[str, int]] = []

    class StepBegin(TrainerCallback):  # first in the list: before LevyCallback refreshes the sketch
        def on_step_begin(self, args, state, control, **kwargs):
            sampler.take()  # the gap between steps (logging, the next batch) belongs to no phase
            steps.append({"begin": rss_bytes()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["train_peak"] = sampler.take()

    class SketchDone(TrainerCallback):  # last in the list: after LevyCallback.on_step_begin
        def on_step_begin(self, args, state, control, **kwargs):
            steps[-1]["sketch_peak"] = sampler.take()

    trainer.callback_handler.callbacks.insert(0, StepBegin())
    trainer.add_callback(SketchDone())
    before_train = rss_bytes()
    trainer.train()
    result = {
        "P": p,
        "baseline": baseline,
        "before_train": before_train,
        "steps": steps,
        "after_train": rss_bytes(),
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    sampler.stop = True
    if spec["arm"] != "Trainer":
        run = trainer.levy_callback.run
        sketch = run.sketch
        result.update(vectors=sketch.vectors_PK.nbytes, vectors_dtype=str(sketch.vectors_PK.dtype), **basis)
        batch = sketch_batch(run.dataset, run.collate_fn, spec["sketch_batch"], run.seed, 0)
        result["product_graph"] = saved_tensor_bytes(lambda: make_hvp(model, batch, params), params)
    train_batch = default_data_collator([data[i] for i in range(spec["batch"])])
    result["train_graph"] = saved_tensor_bytes(lambda: model(**train_batch).loss, params)
    return result


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / MiB:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1M,5M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sketch-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        print(json.dumps(child(json.loads(cli.child))))
        return

    from hf_levy.config import LevyArguments

    fields = {f.name for f in dataclasses.fields(LevyArguments)}
    arms = {"Trainer": {}, "LevyTrainer float32": {}}
    if "sketch_dtype" in fields:
        arms["LevyTrainer bfloat16"] = {"sketch_dtype": "bfloat16"}
    print(
        f"torch {torch.__version__}, one thread; batch {cli.batch} x {cli.seq_len}, sketch batch {cli.sketch_batch} "
        f"x {cli.seq_len}, K = {cli.k}, lanczos_num_iters = {cli.iters} (tol 1e-12: all rows used), "
        f"{cli.steps} steps, sketch at step 0; MiB = 2^20 bytes\n"
    )
    measured = [
        "| model | P | arm | peak RSS (ru_maxrss) | Δ vs Trainer | step 0: RSS at begin | sketch phase peak "
        "| training phase peak | later steps' peak | RSS after training | Δ vs Trainer | V | basis (rows) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    formula = [
        "| model | arm | kept: V = itemsize·P·K | Δ RSS after training | refresh: itemsize·P·(K + rows) "
        "| product graph | predicted sketch phase | measured sketch phase | training step's saved activations |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in cli.sizes.split(","):
        results = {}
        for arm, levy in arms.items():
            spec = dict(
                size=size,
                arm=arm,
                levy=levy,
                batch=cli.batch,
                sketch_batch=cli.sketch_batch,
                seq_len=cli.seq_len,
                k=cli.k,
                iters=cli.iters,
                steps=cli.steps,
            )
            results[arm] = r = run_child(spec)
            stock = results["Trainer"]
            first = r["steps"][0]
            later = max(max(s["sketch_peak"], s["train_peak"]) for s in r["steps"][1:])
            row = (
                f"| {size} | {r['P']:,} | {arm} | {mib(r['maxrss'])} | {mib(r['maxrss'] - stock['maxrss'])} "
                f"| {mib(first['begin'])} | {mib(first['sketch_peak'])} | {mib(first['train_peak'])} "
                f"| {mib(later)} | {mib(r['after_train'])} | {mib(r['after_train'] - stock['after_train'])} |"
            )
            if arm == "Trainer":
                row += " – | – |"
            else:
                basis = r["rows"] * r["dim"] * r["itemsize"]
                row += f" {mib(r['vectors'])} | {mib(basis)} ({r['rows']}/{r['reserved_rows']}) |"
                refresh = r["vectors"] + basis
                formula.append(
                    f"| {size} | {arm} | {mib(r['vectors'])} | {mib(r['after_train'] - stock['after_train'])} "
                    f"| {mib(refresh)} | {mib(r['product_graph'])} | {mib(refresh + r['product_graph'])} "
                    f"| {mib(first['sketch_peak'] - first['begin'])} | {mib(r['train_graph'])} |"
                )
            measured.append(row)
            print(row, flush=True)
    print("\nMeasured (MiB)\n")
    print("\n".join(measured))
    print("\nFormula against measurement (MiB)\n")
    print("\n".join(formula))


if __name__ == "__main__":
    main()
