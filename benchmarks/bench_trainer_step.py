"""Step time of LevyTrainer against the stock Trainer, side by side in one process.

Command:  OMP_NUM_THREADS=1 python benchmarks/bench_trainer_step.py [--sizes 0.1M,1M,5M] [--part noise,amortized]
Hardware: CPU, one torch thread. Runtime: ~30 min on a shared 2-core machine (the 5M model's steps take 2-5 s):
          noise ~10 min, amortized ~20 min; `--part chvp` ~3 min, `--part profile --sizes 1M` ~5 min.
Outcome:  markdown tables; the default parts are
  1. Noise only: the sketch is cached (`sketch_every_n_steps` beyond the run; the step-0 sketch is cheap and
     excluded), so the steps differ from the Trainer's by the noise alone (‖g‖, K draws, ξ = V·coef, g += ξ).
     One Trainer, one LevyTrainer per K in {4, 8, 16}, and a control: the K = 16 LevyTrainer with
     `levy_scale=0` (its noise skipped), whose ratio shows what machine noise alone does. Target: ratio <= 1.02.
  2. Sketch amortized at the documented defaults (K = 8, `sketch_every_n_steps=50`, `lanczos_num_iters=48`,
     `sketch_batch_size=32`, `lanczos_tol=1e-3`): total LevyTrainer time over whole sketch periods divided by
     the Trainer's over the same steps, with the sketch's seconds, products and share. Target: <= 1.10.
     `--grad-accum G` makes the training batch G x 32 with the same 32-example sketch batch.
  3. `--part chvp`: c_hvp measured side by side, a gradient and an exact product on the same 32 x 128 batch.
  4. `--part profile`: cProfile of one sketch refresh and of add_noise (K = 16) on the last size given.
  5. `--part budget`: the defaults plus `sketch_max_overhead` (default 0.1) on the first size, interleaved
     like the others; LevyCallback's clock is swapped for one that stops while its arm waits for its turn,
     so the budget sees LevyTrainer's own steps. Where the refreshes fell, and the ratio over the whole run
     and per period. Target: <= 1 + budget.

Method. Models are LlamaForCausalLM built from config (eager attention, vocab 256, seed 0); the batch is
32 x 128 random tokens (labels = inputs). Every arm is a real `trainer.train()` on its own deep copy of the
same model and the same dataset, run in its own thread; a callback hands the turn from arm to arm after every
optimizer step (A, B, C, ..., A, B, C, ...), so exactly one arm computes at any time and machine load hits
all arms alike. A step is timed from `on_step_begin` to `on_step_end` (first in the callback list, so the
sketch refresh in LevyCallback.on_step_begin is inside the window; data loading and logging are outside).
`levy.add_noise` is also timed on its own, and the sketch's products are timed by wrapping the callback's
matvec, which gives c_hvp (seconds per product / median Trainer step) for the overhead formula

    overhead ≈ products x c_hvp x T_grad(sketch batch) / (period x T_step)  (+ graph build + Lanczos's own work)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its pool: threads on shared cores thrash
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import copy
import dataclasses
import logging
import statistics
import tempfile
import threading
import time
import types

import torch
import transformers
from _tiny_llama import TOKEN_SIZES, RandomTokens, token_model
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import hf_levy._schedule
from hf_levy import LevyConfig, LevyTrainer
from hf_levy.config import LevyArguments

CONTROL = "K=max, noise off (levy_scale=0)"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(LevyArguments)}


class RoundRobin:
    """Lets one arm run at a time and passes the turn to the next unfinished arm after each of its steps."""

    def __init__(self, names: list[str]):
        self.order, self.active, self.turn = list(names), set(names), names[0]
        self.cond = threading.Condition()
        self.waited = dict.fromkeys(names, 0.0)  # seconds each arm spent waiting for its turn

    def wait(self, name: str) -> None:
        start = time.perf_counter()
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.waited[name] += time.perf_counter() - start

    def pass_turn(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.active.discard(name)
            i = self.order.index(name)
            for j in range(1, len(self.order) + 1):
                nxt = self.order[(i + j) % len(self.order)]
                if nxt in self.active:
                    self.turn = nxt
                    break
            self.cond.notify_all()


class StepClock(TrainerCallback):
    """Times each optimizer step (on_step_begin -> on_step_end) and hands the turn over after it."""

    def __init__(self, name: str, rr: RoundRobin):
        self.name, self.rr, self.seconds = name, rr, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.rr.wait(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)
        last = state.global_step >= state.max_steps
        self.rr.pass_turn(self.name, finished=last)
        if not last:
            self.rr.wait(self.name)


def instrument(trainer: LevyTrainer) -> dict[str, list[float]]:
    """Wrap the callback's noise and products with timers; returns the lists they fill."""
    cb = trainer.levy_callback
    stats: dict[str, list[float]] = {"noise": [], "product": [], "build": []}
    add_noise, matvec = cb.add_noise, cb._matvec

    def timed_noise(step: int) -> None:
        start = time.perf_counter()
        add_noise(step)
        stats["noise"].append(time.perf_counter() - start)

    def timed_matvec(*args):
        start = time.perf_counter()
        hvp = matvec(*args)
        stats["build"].append(time.perf_counter() - start)

        def product(v):
            t0 = time.perf_counter()
            out = hvp(v)
            stats["product"].append(time.perf_counter() - t0)
            return out

        return product

    cb.add_noise, cb._matvec = timed_noise, timed_matvec
    return stats


def run_round_robin(arms: dict[str, Trainer], holder: list | None = None) -> dict[str, list[float]]:
    """Train every arm in its own thread, one optimizer step at a time in turn; per-step seconds per arm.
    ``holder``, if given, receives the RoundRobin (its ``waited`` seconds per arm)."""
    rr = RoundRobin(list(arms))
    if holder is not None:
        holder.append(rr)
    clocks = {name: StepClock(name, rr) for name in arms}
    errors: list[BaseException] = []
    for name, trainer in arms.items():
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 feeds the sketch metrics; no printing
        trainer.callback_handler.callbacks.insert(0, clocks[name])  # before LevyCallback: the sketch is timed

    def work(name: str) -> None:
        try:
            arms[name].train()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            rr.pass_turn(name, finished=True)

    threads = [threading.Thread(target=work, args=(name,)) for name in arms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {name: clock.seconds for name, clock in clocks.items()}


def common_args(out: str, steps: int, batch: int, grad_accum: int = 1) -> dict:
    return dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def make_arms(size, seq_len, batch, steps, levy_fields: dict[str, dict], grad_accum=1) -> dict[str, Trainer]:
    model = token_model(size, seq_len)
    data = RandomTokens(max(4 * batch * grad_accum, 256), seq_len)
    tmp = tempfile.mkdtemp(prefix="bench_step_")
    arms: dict[str, Trainer] = {
        "Trainer": Trainer(
            model=copy.deepcopy(model),
            args=TrainingArguments(**common_args(f"{tmp}/stock", steps, batch, grad_accum)),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    }
    for name, fields in levy_fields.items():
        arms[name] = LevyTrainer(
            model=copy.deepcopy(model),
            args=LevyConfig(**common_args(f"{tmp}/{name}", steps, batch, grad_accum), **fields),
            train_dataset=data,
            data_collator=default_data_collator,
        )
    return arms


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def noise_part(sizes, ks, seq_len, batch, steps_for, warmup) -> list[str]:
    rows = [
        "| model | P | K | Trainer step (ms) | LevyTrainer step (ms) | ratio of medians | ratio of minima "
        "| paired ratios q25–q75 | add_noise (ms) | add_noise / Trainer step | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        steps = steps_for[size]
        fields = {
            f"K={k}": dict(
                num_eigenpairs=k,
                sketch_every_n_steps=10 * steps,  # only the step-0 sketch, excluded with the warm-up
                lanczos_num_iters=k,  # cheap: V's shape (P x K) is all the noise depends on
                sketch_batch_size=4,
            )
            for k in ks
        }
        # Control: a LevyTrainer whose noise is off (levy_scale=0 skips add_noise) after the same step-0 sketch.
        # Its distance from 1 is what the machine's noise alone does to a ratio.
        fields[CONTROL] = {**fields[f"K={max(ks)}"], "levy_scale": 0.0}
        arms = make_arms(size, seq_len, batch, steps, fields)
        stats = {name: instrument(t) for name, t in arms.items() if name != "Trainer"}
        p = sum(q.numel() for q in arms["Trainer"].model.parameters())
        times = run_round_robin(arms)
        base = times["Trainer"][warmup:]
        for name in [f"K={k}" for k in ks] + [CONTROL]:
            levy = times[name][warmup:]
            paired = [a / b for a, b in zip(levy, base, strict=True)]
            q1, q3 = quartiles(paired)
            noise = statistics.median(stats[name]["noise"][warmup:]) if name != CONTROL else None
            cost = "– | –" if noise is None else f"{1e3 * noise:.2f} | {noise / statistics.median(base):.4f}"
            rows.append(
                f"| {size} | {p:,} | {name.removeprefix('K=')} | {1e3 * statistics.median(base):.1f} "
                f"| {1e3 * statistics.median(levy):.1f} | {statistics.median(levy) / statistics.median(base):.3f} "
                f"| {min(levy) / min(base):.3f} | {q1:.3f}–{q3:.3f} | {cost} | {len(base)} |"
            )
        print(rows[-1], flush=True)
        del arms
    return rows


def amortized_part(sizes, seq_len, batch, periods_for, period, grad_accum, sketch_batch) -> list[str]:
    defaults = dict(
        num_eigenpairs=DEFAULTS["num_eigenpairs"],
        sketch_every_n_steps=period,
        lanczos_num_iters=DEFAULTS["lanczos_num_iters"],
        sketch_batch_size=sketch_batch,
        lanczos_tol=DEFAULTS["lanczos_tol"],
    )
    rows = [
        "| model | P | B | period (start) | Trainer s / period | LevyTrainer s / period | ratio | sketch s (share) "
        "| products | s / product | c_hvp | graph build s | Lanczos own s | predicted ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        n_periods = periods_for[size]
        arms = make_arms(size, seq_len, batch, n_periods * period, {"LevyTrainer": defaults}, grad_accum)
        stats = instrument(arms["LevyTrainer"])
        p = sum(q.numel() for q in arms["Trainer"].model.parameters())
        times = run_round_robin(arms)
        history = arms["LevyTrainer"].state.log_history
        sketches = [h for h in history if "curvature/sketch_seconds" in h]
        t_step = statistics.median(times["Trainer"])
        used = 0
        for i in range(n_periods):
            window = slice(i * period, (i + 1) * period)
            base, levy = sum(times["Trainer"][window]), sum(times["LevyTrainer"][window])
            n = int(sketches[i]["curvature/hvp_count"])
            products = stats["product"][used : used + n]
            used += n
            build = stats["build"][i]
            sketch_step = times["LevyTrainer"][i * period]
            quiet = statistics.median(times["LevyTrainer"][window][1:])
            sketch_extra = (
                sketch_step - quiet
            )  # the refresh as training sees it: batch, graph, products, Lanczos
            lanczos_own = sketch_extra - build - sum(products)
            # T_grad(sketch batch) from the Trainer's step, taken as linear in the number of examples.
            t_grad_sketch = t_step * sketch_batch / (batch * grad_accum)
            c_hvp = statistics.median(products) / t_grad_sketch
            predicted = 1 + n * c_hvp * t_grad_sketch / (period * t_step)  # the formula's main term
            rows.append(
                f"| {size} | {p:,} | {batch * grad_accum} | {i + 1} ({'cold' if i == 0 else 'warm'}) | {base:.1f} | {levy:.1f} "
                f"| {levy / base:.3f} | {sketch_extra:.1f} ({sketch_extra / levy:.0%}) | {n} "
                f"| {statistics.median(products):.3f} | {c_hvp:.2f} | {build:.2f} | {lanczos_own:.2f} "
                f"| {predicted:.3f} |"
            )
            print(rows[-1], flush=True)
        del arms
    return rows


def budget_part(size, seq_len, batch, steps, budget) -> list[str]:
    fields = {
        name: DEFAULTS[name] for name in ("num_eigenpairs", "sketch_every_n_steps", "sketch_batch_size")
    }
    arms = make_arms(size, seq_len, batch, steps, {"LevyTrainer": {**fields, "sketch_max_overhead": budget}})
    rr_holder: list[RoundRobin] = []

    def own_time() -> float:  # LevyTrainer's wall clock without the other arms' turns
        return time.perf_counter() - rr_holder[0].waited["LevyTrainer"]

    hf_levy._schedule.time = types.SimpleNamespace(perf_counter=own_time)
    try:
        times = run_round_robin(arms, rr_holder)
    finally:  # later parts of the same run time the refresh schedule with the real clock
        hf_levy._schedule.time = time
    history = arms["LevyTrainer"].state.log_history
    refreshes = [h["step"] - 1 for h in history if "curvature/eigenvalue_0" in h]  # logged one step later
    total = history[-1].get("curvature/sketch_seconds_total", float("nan"))
    base, levy = sum(times["Trainer"]), sum(times["LevyTrainer"])
    rows = [
        "| window | steps | Trainer s | LevyTrainer s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    bounds = [*refreshes, steps]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        b, lv = sum(times["Trainer"][start:stop]), sum(times["LevyTrainer"][start:stop])
        rows.append(
            f"| steps {start}–{stop - 1} (refresh at {start}) | {stop - start} | {b:.1f} | {lv:.1f} | {lv / b:.3f} |"
        )
    rows.append(f"| whole run | {steps} | {base:.1f} | {levy:.1f} | {levy / base:.3f} |")
    header = (
        f"{size}, B = {batch}, sketch_max_overhead = {budget}: refreshes at steps {refreshes} "
        f"(sketch_every_n_steps = {fields['sketch_every_n_steps']}); sketch seconds in total {total:.1f} "
        f"({total / levy:.1%} of LevyTrainer's time); median step Trainer {statistics.median(times['Trainer']):.3f} s, "
        f"LevyTrainer {statistics.median(times['LevyTrainer']):.3f} s\n"
    )
    return [header, *rows]


def profile_part(size, seq_len, batch, k, top) -> list[str]:
    """cProfile of one sketch refresh (defaults) and of add_noise (K = k) on a model after one training step."""
    import cProfile
    import pstats

    fields = dict(
        num_eigenpairs=k, lanczos_num_iters=DEFAULTS["lanczos_num_iters"], sketch_every_n_steps=1000
    )
    arms = make_arms(size, seq_len, batch, 1, {"LevyTrainer": fields})
    trainer = arms["LevyTrainer"]
    trainer.remove_callback(PrinterCallback)
    trainer.train()  # one step: sketch at step 0, so V exists; then profile the parts alone
    cb = trainer.levy_callback
    rows = []
    for name, fn, reps in (
        ("sketch refresh", lambda: cb.refresh_sketch(1), 1),
        ("add_noise", lambda: cb.add_noise(1), 20),
    ):
        for p in cb.run.params:  # add_noise needs gradients
            p.grad = torch.randn_like(p)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt / reps
        rows += [f"\n{name} at {size}, K={k}: {total:.3f} s per call; top {top} functions by own time\n"]
        rows += ["| function | own s per call | share |", "|---|---:|---:|"]
        entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
        for (file, line, func), (_, _, tottime, _, _) in entries:
            where = f"{os.path.basename(file)}:{line}({func})" if line else func
            rows.append(f"| `{where}` | {tottime / reps:.4f} | {tottime / stats.total_tt:.1%} |")
    return rows


def chvp_part(sizes, seq_len, batch, repeats) -> list[str]:
    """c_hvp measured side by side: a gradient and an exact product on the same sketch batch, interleaved."""
    rows = [
        "| model | P | gradient s | graph build s | product s | c_hvp = product / gradient "
        "| formula 1 + 48 c_hvp / 50 | repeats |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        p, med = _product_and_gradient(size, seq_len, batch, repeats)
        c = med["product"] / med["gradient"]
        rows.append(
            f"| {size} | {p:,} | {med['gradient']:.3f} | {med['build']:.3f} | {med['product']:.3f} | {c:.2f} "
            f"| {1 + 48 * c / 50:.2f} | {repeats - 1} |"
        )
        print(rows[-1], flush=True)
    return rows


def _product_and_gradient(size, seq_len, batch, repeats) -> tuple[int, dict[str, float]]:
    from hf_levy import make_hvp, trainable_parameters

    model = token_model(size, seq_len).eval()
    params = trainable_parameters(model)
    ids = RandomTokens(batch, seq_len).ids
    inputs = {"input_ids": ids, "labels": ids}
    v = torch.randn(sum(q.numel() for q in params), generator=torch.Generator().manual_seed(0))
    hvp = make_hvp(model, inputs, params)
    fns = {
        "gradient": lambda: torch.autograd.grad(model(**inputs).loss, params),
        "build": lambda: make_hvp(model, inputs, params),
        "product": lambda: hvp(v),
    }
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return len(v), {name: statistics.median(ts[1:]) for name, ts in times.items()}  # first repeat: warm-up


def per_size(text: str, sizes: list[str], cast=int) -> dict[str, int]:
    values = [cast(v) for v in text.split(",")]
    if len(values) == 1:
        values *= len(sizes)
    return dict(zip(sizes, values, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="0.1M,1M,5M", help=f"comma list of {list(TOKEN_SIZES)}")
    parser.add_argument(
        "--part", default="noise,amortized", help="comma list of noise, amortized, chvp, profile, budget"
    )
    parser.add_argument("--ks", default="4,8,16", help="K values of the noise-only part")
    parser.add_argument("--batch", type=int, default=32, help="examples per step (and sketch batch default)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--noise-steps", default="80,40,24", help="steps per arm, per size (noise part)")
    parser.add_argument("--warmup", type=int, default=4, help="first steps of each arm left out (noise part)")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="gradient_accumulation_steps (amortized part)"
    )
    parser.add_argument(
        "--sketch-batch", type=int, default=DEFAULTS["sketch_batch_size"], help="(amortized part)"
    )
    parser.add_argument("--repeats", type=int, default=6, help="interleaved repeats (chvp part)")
    parser.add_argument("--periods", default="2,2,1", help="sketch periods per size (amortized part)")
    parser.add_argument(
        "--period",
        type=int,
        default=DEFAULTS["sketch_every_n_steps"],
        help="sketch_every_n_steps (amortized part)",
    )
    parser.add_argument("--budget", type=float, default=0.1, help="sketch_max_overhead (budget part)")
    parser.add_argument("--budget-steps", type=int, default=1000, help="steps per arm (budget part)")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_levy").setLevel(logging.WARNING)
    sizes = cli.sizes.split(",")
    parts = cli.part.split(",")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads "
        f"{torch.get_num_threads()}, batch {cli.batch} x {cli.seq_len} tokens, eager attention\n"
    )
    if "noise" in parts:
        rows = noise_part(
            sizes,
            [int(k) for k in cli.ks.split(",")],
            cli.seq_len,
            cli.batch,
            per_size(cli.noise_steps, sizes),
            cli.warmup,
        )
        print("\nNoise only (sketch cached), medians over the interleaved steps after the warm-up\n")
        print("\n".join(rows), flush=True)
    if "chvp" in parts:
        rows = chvp_part(sizes, cli.seq_len, cli.batch, cli.repeats)
        print(f"\nCost of one product (batch {cli.batch} x {cli.seq_len}), medians of interleaved repeats\n")
        print("\n".join(rows), flush=True)
    if "profile" in parts:
        print("\n".join(profile_part(sizes[-1], cli.seq_len, cli.batch, 16, 12)), flush=True)
    if "budget" in parts:
        rows = budget_part(sizes[0], cli.seq_len, cli.batch, cli.budget_steps, cli.budget)
        print("\nSketch under a time budget, interleaved\n")
        print("\n".join(rows), flush=True)
    if "amortized" in parts:
        rows = amortized_part(
            sizes,
            cli.seq_len,
            cli.batch,
            per_size(cli.periods, sizes),
            cli.period,
            cli.grad_accum,
            cli.sketch_batch,
        )
        print(
            f"\nSketch amortized at the defaults (K={DEFAULTS['num_eigenpairs']}, period "
            f"{cli.period}, lanczos_num_iters={DEFAULTS['lanczos_num_iters']}, "
            f"sketch_batch_size={cli.sketch_batch}, gradient_accumulation_steps={cli.grad_accum}, tol={DEFAULTS['lanczos_tol']})\n"
        )
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
