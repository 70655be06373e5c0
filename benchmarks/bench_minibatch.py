"""Step time of the real sub-batch noise (levy_noise_basis='minibatch') against the stock Trainer, side by side.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_minibatch.py [--steps 60] [--ddp_steps 15 --ddp_rounds 3]
Hardware: CPU, one torch thread per process. Runtime: ~8 min on a shared 2-core machine.
Outcome:  a markdown table per setup: median seconds per optimizer step, its interquartile range and the ratio
          to the stock Trainer's median, for sub-batches of b examples (b' = b: the batch-b noise; and a
          smaller b with levy_virtual_batch_size = the larger b, the same noise variance at less cost), and
          minibatch_topk (whose sketch refreshes are amortized over whole periods of 50 steps only if --steps
          covers them: the table says how many refreshes fell in the timed steps).

Setups: (1) the noise_sources recipes' task and model: a + b mod 59 (1,044 training pairs), a 1-layer Llama with
hidden size 32, at full batch (B = 1,044), b = 128 and b = 32 with b' = 128; (2) a language-model step as in
bench_trainer_step.py, the 1M-parameter token Llama at batch 32 x 128 tokens, b = 8 and b = 4 with b' = 8;
(3) setup (1) under 2-process DDP (gloo, launched by the script itself with torch.distributed.run): B = 1,044
split 522 per rank, the stock Trainer and minibatch b = 128 (64 per rank) trained in alternating blocks of
--ddp_steps steps, --ddp_rounds times; per step the all-reduces that hf_levy itself calls (counted by wrapping
torch.distributed.all_reduce; DDP's own gradient all-reduce runs in its C++ reducer and is not counted) and
their bytes (numel x element size).

Method: the arms train in turn, one optimizer step each (bench_trainer_step.run_round_robin), so machine load
hits all of them alike; a step is timed from on_step_begin to on_step_end (the extra forward and backward of
the sub-batch run inside on_pre_optimizer_step, so they are inside the window).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time

import transformers
from _tiny_llama import RandomTokens, token_model
from bench_trainer_step import common_args, quartiles, run_round_robin
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_levy import LevyConfig, LevyTrainer
from hf_levy.recipes import models, tasks
from hf_levy.recipes.recipe import load_recipe


def arms_for(model, data, batch: int, steps: int, variants: dict[str, dict]) -> dict[str, Trainer]:
    tmp = tempfile.mkdtemp(prefix="bench_minibatch_")
    arms: dict[str, Trainer] = {
        "Trainer": Trainer(
            model=copy.deepcopy(model),
            args=TrainingArguments(**common_args(f"{tmp}/stock", steps, batch)),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    }
    for name, fields in variants.items():
        arms[name] = LevyTrainer(
            model=copy.deepcopy(model),
            args=LevyConfig(**common_args(f"{tmp}/{name}", steps, batch), **fields),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    return arms


def table(title: str, seconds: dict[str, list[float]], warmup: int, refreshes: dict[str, int]) -> list[str]:
    rows = [
        f"### {title}",
        "",
        "| arm | median s/step | IQR | ratio to Trainer | refreshes timed |",
        "|---|---:|---|---:|---:|",
    ]
    base = statistics.median(seconds["Trainer"][warmup:])
    for name, xs in seconds.items():
        kept = xs[warmup:]
        low, high = quartiles(kept)
        median = statistics.median(kept)
        rows.append(
            f"| {name} | {median:.4f} | {low:.4f}-{high:.4f} | {median / base:.3f} | {refreshes.get(name, 0)} |"
        )
    return [*rows, ""]


def minibatch(b: int, virtual: int | None = None, basis: str = "minibatch") -> dict:
    return dict(
        levy_noise_basis=basis, levy_noise_batch_size=b, levy_virtual_batch_size=virtual, levy_scale=1.0
    )


def modular_setup():
    """The task and model of the noise_sources_modular_addition recipe (seed 0)."""
    recipe = load_recipe("noise_sources_modular_addition")
    task = tasks.modular_addition(**{k: v for k, v in recipe.task.items() if k != "name"})
    spec = dict(recipe.model)
    model = models.build_model(spec.pop("architecture"), seed=0, vocab_size=task.vocab_size, **spec)
    return task, model


class StepTimes(TrainerCallback):
    """Per optimizer step: wall seconds, and the hf_levy all-reduce calls and bytes made inside it."""

    def __init__(self, counter: dict):
        self.counter, self.seconds, self.calls, self.bytes = counter, [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.update(calls=0, bytes=0)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)
        self.calls.append(self.counter["calls"])
        self.bytes.append(self.counter["bytes"])


def ddp_worker(cli) -> None:
    import torch.distributed as dist

    transformers.logging.set_verbosity_error()
    counter = {"calls": 0, "bytes": 0}
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        counter["calls"] += 1
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    task, model = modular_setup()
    per_rank = len(task.train_dataset) // 2
    result: dict[str, dict[str, list]] = {}
    for _ in range(cli.ddp_rounds):
        for name, fields in (("Trainer", None), ("minibatch b=128", minibatch(128))):
            args = {**common_args(tempfile.mkdtemp(), cli.ddp_steps, per_rank), "ddp_backend": "gloo"}
            clock = StepTimes(counter)
            if fields is None:
                trainer = Trainer(
                    model=copy.deepcopy(model),
                    args=TrainingArguments(**args),
                    callbacks=[clock],
                    train_dataset=task.train_dataset,
                    data_collator=task.data_collator,
                )
            else:
                trainer = LevyTrainer(
                    model=copy.deepcopy(model),
                    args=LevyConfig(**args, **fields),
                    callbacks=[clock],
                    train_dataset=task.train_dataset,
                    data_collator=task.data_collator,
                )
            trainer.train()
            kept = result.setdefault(name, {"seconds": [], "calls": [], "bytes": []})
            for key in kept:
                kept[key] += getattr(clock, key)[cli.warmup_ddp :]
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))


def ddp_part(cli) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--ddp_worker",
        "--ddp_steps",
        str(cli.ddp_steps),
        "--ddp_rounds",
        str(cli.ddp_rounds),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    base = statistics.median(result["Trainer"]["seconds"])
    rows = [
        "### a + b mod 59, full batch B = 1,044 under 2-process DDP (522 per rank)",
        "",
        "| arm | median s/step | IQR | ratio to Trainer | hf_levy all-reduces per step | their bytes per step |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, r in result.items():
        low, high = quartiles(r["seconds"])
        median = statistics.median(r["seconds"])
        rows.append(
            f"| {name} | {median:.4f} | {low:.4f}-{high:.4f} | {median / base:.3f} | "
            f"{statistics.median(r['calls']):g} | {statistics.median(r['bytes']):,.0f} |"
        )
    return [*rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ddp_steps", type=int, default=15)
    parser.add_argument("--ddp_rounds", type=int, default=3)
    parser.add_argument("--ddp_only", action="store_true", help="only setup (3)")
    parser.add_argument("--ddp_worker", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    cli.warmup_ddp = 2
    if cli.ddp_worker:
        ddp_worker(cli)
        return
    if cli.ddp_only:
        print("\n".join(ddp_part(cli)))
        return
    transformers.logging.set_verbosity_error()
    lines = [f"steps {cli.steps} (first {cli.warmup} not counted), torch threads 1", ""]

    task, model = modular_setup()
    full = len(task.train_dataset)
    variants = {
        "minibatch b=128": minibatch(128),
        "minibatch b=32, b'=128": minibatch(32, 128),
        "minibatch_topk K=8, b=128": minibatch(128, basis="minibatch_topk"),
    }
    arms = arms_for(model, task.train_dataset, full, cli.steps, variants)
    seconds = run_round_robin(arms)
    refreshes = {"minibatch_topk K=8, b=128": 1 + (cli.steps - 1) // 50}
    lines += table(f"a + b mod 59, full batch B = {full}", seconds, cli.warmup, refreshes)

    lm = token_model("1M", 128)
    data = RandomTokens(256, 128)
    variants = {"minibatch b=8": minibatch(8), "minibatch b=4, b'=8": minibatch(4, 8)}
    seconds = run_round_robin(arms_for(lm, data, 32, cli.steps, variants))
    lines += table("1M-parameter token Llama, batch 32 x 128 tokens", seconds, cli.warmup, {})
    lines += ddp_part(cli)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
