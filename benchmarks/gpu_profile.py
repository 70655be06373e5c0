"""GPU profile at real model size: Trainer vs LevyTrainer throughput, one sketch's cost, sampler speed.

One prepared script for a machine with one H100/H200 and no network (nothing downloads: the model is
built from its config, the data is random tokens). Writes ``gpu_profile.json`` and ``gpu_profile.md``
into ``--out``. On a CPU-only machine ``--tiny`` runs the same code at toy size as a smoke test.

    python benchmarks/gpu_profile.py --out $OUT                # ~0.8B Llama, bf16 autocast, < 8 minutes
    python benchmarks/gpu_profile.py --tiny --out /tmp/profile  # smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import transformers  # noqa: E402
from _tiny_llama import RandomTokens, build_llama  # noqa: E402
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, default_data_collator  # noqa: E402

import hf_levy  # noqa: E402
from hf_levy import LevyConfig, LevyTrainer, lanczos, make_hvp, sample_symmetric_stable, trainable_parameters  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._t)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(cli, attn: str) -> LlamaForCausalLM:
    return build_llama(
        cli.vocab,
        cli.hidden,
        cli.intermediate,
        cli.layers,
        cli.heads,
        max_positions=cli.seq,
        attn=attn,
        device=cli.device,
    )


def train_steps(cli, trainer_class, data, **levy) -> tuple[list[float], dict]:
    model = build_model(cli, "sdpa")
    common = dict(
        output_dir=os.path.join(cli.out, "trainer"),
        per_device_train_batch_size=cli.batch,
        max_steps=cli.steps,
        learning_rate=1e-5,
        bf16=cli.device == "cuda",
        use_cpu=cli.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args = LevyConfig(**common, **levy)
    timer = StepTimer()
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.callback_handler.callbacks.insert(0, timer)  # first, so a step's time includes its sketch
    trainer.train()
    extra = {}
    if isinstance(trainer, LevyTrainer):
        extra = {"hvp_method": trainer.levy_callback.hvp_method}
    del trainer, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return timer.times, extra


def one_sketch(
    cli, attn: str, method: str, basis_device: str | None = None, iters: int | None = None
) -> dict:
    """One lanczos run as LevyTrainer's refresh does it; ``basis_device="cpu"`` is ``sketch_offload="basis"``."""
    model = build_model(cli, attn)
    params = trainable_parameters(model)
    ids = RandomTokens(cli.sketch_batch, cli.seq, vocab_size=cli.vocab, seed=1).ids
    batch = {"input_ids": ids, "labels": ids}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync()
    start = time.perf_counter()
    # As in LevyTrainer with bf16=True: exact products under bf16 autocast, finite differences in float32
    # (bf16 rounding divided by the FD step swamps the product).
    autocast = torch.autocast(
        cli.device, dtype=torch.bfloat16, enabled=cli.device == "cuda" and method == "autograd"
    )
    with autocast:
        hvp = make_hvp(model, batch, params, method=method)
        pairs = lanczos(
            hvp,
            sum(p.numel() for p in params),
            cli.k,
            num_iters=iters or cli.iters,
            tol=1e-3,
            device=basis_device or cli.device,
        )
        vectors_PK = pairs.vectors.T.to(cli.device).T  # V back on the accelerator, as the trainer keeps it
    _sync()
    seconds = time.perf_counter() - start
    result = {
        "attention": attn,
        "method": method,
        "basis": basis_device or cli.device,
        "seconds": seconds,
        "products": pairs.num_matvecs,
        "seconds_per_product": seconds / pairs.num_matvecs,
        "top_eigenvalues": [round(float(v), 4) for v in pairs.values[:4]],
        "converged": pairs.converged,
    }
    if torch.cuda.is_available():
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    del hvp, model, vectors_PK
    return result


def sampler(cli) -> list[dict]:
    rows = []
    for n in (10**6, 10**8 if cli.device == "cuda" else 10**6):
        g = torch.Generator(device=cli.device).manual_seed(0)
        for name, fn in (
            ("torch.randn", lambda n=n, g=g: torch.randn(n, generator=g, device=cli.device)),
            (
                "sample_symmetric_stable(1.5)",
                lambda n=n, g=g: sample_symmetric_stable((n,), 1.5, generator=g, device=cli.device),
            ),
        ):
            fn()
            _sync()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                fn()
                _sync()
                times.append(time.perf_counter() - start)
            rows.append({"n": n, "method": name, "ms": 1e3 * statistics.median(times)})
    return rows


# Most wanted first: once --budget is spent, the remaining sections are skipped.
SECTIONS = (
    "throughput",
    "throughput_accum8",
    "sketch_fd",
    "sketch_fd_offload_basis",
    "sketch_exact",
    "sampler",
)
# throughput_accum8: 8 micro-batches per optimizer step, the large-batch regime hf_levy is for
ACCUMULATION = 8


def noise_only(cli) -> dict:
    """LevyConfig fields of a noise-only arm: one sketch at step 0, none after."""
    return dict(
        num_eigenpairs=cli.k,
        lanczos_num_iters=cli.train_iters,
        sketch_every_n_steps=10**6,
        sketch_batch_size=cli.sketch_batch,
        levy_scale=0.1,
    )


def run_section(cli, name: str) -> object:
    """One section's measurements (each section runs in its own process; see main)."""
    if name == "throughput":
        data = RandomTokens(cli.batch * (cli.steps + 2), cli.seq, vocab_size=cli.vocab)
        stock, _ = train_steps(cli, Trainer, data)
        levy = noise_only(cli)
        noise, info = train_steps(cli, LevyTrainer, data, **levy)
        noise_bf16, _ = train_steps(cli, LevyTrainer, data, **levy, sketch_dtype="bfloat16")
        skip = 2  # warm-up; the LevyTrainer's first step also holds its first sketch
        t_stock, t_noise = statistics.median(stock[skip:]), statistics.median(noise[skip:])
        t_noise_bf16 = statistics.median(noise_bf16[skip:])
        sketch_seconds = noise[0] - t_noise
        tokens = cli.batch * cli.seq
        return {
            "stock_tokens_per_s": tokens / t_stock,
            "levy_noise_only_tokens_per_s": tokens / t_noise,
            "noise_only_ratio": t_noise / t_stock,
            "noise_only_ratio_bf16_vectors": t_noise_bf16 / t_stock,
            "first_sketch_seconds_in_training": sketch_seconds,
            "amortized_ratio_every_50": (50 * t_noise + sketch_seconds) / (50 * t_stock),
            "hvp_method_auto": info.get("hvp_method"),
            "step_seconds": {"stock": t_stock, "levy_noise_only": t_noise, "levy_bf16_vectors": t_noise_bf16},
        }
    if name == "throughput_accum8":
        # The noise costs the same per optimizer step whatever the batch: its share falls as tokens per step grow.
        steps = max(cli.steps // 2, 4)
        cli.steps = steps
        data = RandomTokens(cli.batch * ACCUMULATION * (steps + 2), cli.seq, vocab_size=cli.vocab)
        stock, _ = train_steps(cli, Trainer, data, gradient_accumulation_steps=ACCUMULATION)
        levy = noise_only(cli)
        noise, _ = train_steps(cli, LevyTrainer, data, gradient_accumulation_steps=ACCUMULATION, **levy)
        t_stock, t_noise = statistics.median(stock[2:]), statistics.median(noise[2:])
        return {
            "tokens_per_step": cli.batch * ACCUMULATION * cli.seq,
            "stock_tokens_per_s": cli.batch * ACCUMULATION * cli.seq / t_stock,
            "noise_only_ratio": t_noise / t_stock,
            "step_seconds": {"stock": t_stock, "levy_noise_only": t_noise},
        }
    if name == "sketch_fd":
        return one_sketch(cli, "sdpa", "finite_difference")
    if name == "sketch_exact":
        return one_sketch(cli, "eager", "autograd")
    if name == "sketch_fd_offload_basis":
        # Capped at half the iterations: the host passes over the basis grow with its rows (~2.3 GB each at
        # 0.57B) and the whole script must stay under 8 minutes; compare its seconds per product.
        return one_sketch(cli, "sdpa", "finite_difference", basis_device="cpu", iters=cli.iters // 2)
    return sampler(cli)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_profile"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--section-timeout", type=float, default=200.0)
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds for all sections; later ones are skipped past it"
    )
    cli = parser.parse_args()
    # ~0.57B parameters. The sketch's Lanczos basis holds `iters` float32 copies of P (2.3 GB each), so 24
    # iterations fit an H200 (139 GB) beside the model: see docs/concepts.md#memory for what shrinks it.
    big = dict(vocab=32000, hidden=1280, intermediate=3584, layers=24, heads=10, seq=1024, batch=8,
               sketch_batch=4, k=8, iters=24, train_iters=16)  # fmt: skip
    tiny = dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, seq=64, batch=4, sketch_batch=2, k=4,
                iters=12, train_iters=8)  # fmt: skip
    for key, value in (tiny if cli.tiny else big).items():
        setattr(cli, key, value)
    cli.device = "cuda" if torch.cuda.is_available() and not cli.tiny else "cpu"
    if cli.tiny:
        cli.steps = min(cli.steps, 8)
    os.makedirs(cli.out, exist_ok=True)
    if cli.section:
        result = run_section(cli, cli.section)
        pathlib.Path(cli.out, f"section_{cli.section}.json").write_text(json.dumps(result))
        return

    import subprocess

    t0 = time.perf_counter()
    shape = build_llama(cli.vocab, cli.hidden, cli.intermediate, cli.layers, cli.heads, device="meta")
    parameters = sum(p.numel() for p in shape.parameters())
    report = {
        "device": torch.cuda.get_device_name(0) if cli.device == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_levy": hf_levy.__version__,
        },
        "sizes": {k: getattr(cli, k) for k in big},
        "parameters": parameters,
    }
    print(json.dumps(report), flush=True)
    for name in SECTIONS:
        # Each section in its own process, so the memory one leaves behind cannot starve the next.
        command = [sys.executable, __file__, "--out", cli.out, "--section", name, "--steps", str(cli.steps)]
        command += ["--tiny"] if cli.tiny else []
        timeout = min(cli.section_timeout, cli.budget - (time.perf_counter() - t0))
        if timeout < 30:
            report[name] = {"error": f"skipped: the {cli.budget:.0f} s budget was spent"}
        else:
            try:
                done = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
                path = pathlib.Path(cli.out, f"section_{name}.json")
                report[name] = (
                    json.loads(path.read_text()) if path.is_file() else {"error": done.stderr[-1500:]}
                )
            except subprocess.TimeoutExpired:
                report[name] = {"error": f"timed out after {timeout:.0f} s"}
        print(name, json.dumps(report[name])[:1500], flush=True)
        # Written after every section: a run cut off from outside still leaves what it measured.
        report["total_seconds"] = time.perf_counter() - t0
        pathlib.Path(cli.out, "gpu_profile.json").write_text(json.dumps(report, indent=1))
        pathlib.Path(cli.out, "gpu_profile.md").write_text(markdown(cli, report))
    print(markdown(cli, report))


def markdown(cli, report: dict) -> str:
    lines = [
        f"Device: {report['device']}; {report['parameters'] / 1e6:.0f}M-parameter Llama from config, "
        f"batch {cli.batch}×{cli.seq} tokens, bf16 autocast; torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}.",
        "",
        "| measure | value |",
        "|---|---:|",
    ]
    th = report.get("throughput", {})
    if "stock_tokens_per_s" in th:
        lines += [
            f"| stock Trainer tokens/s | {th['stock_tokens_per_s']:.0f} |",
            f"| LevyTrainer tokens/s, noise only | {th['levy_noise_only_tokens_per_s']:.0f} |",
            f"| step-time ratio, noise only | {th['noise_only_ratio']:.3f} |",
            f"| step-time ratio, noise only, sketch_dtype='bfloat16' | {th['noise_only_ratio_bf16_vectors']:.3f} |",
            f"| first sketch inside training (K={cli.k}, {cli.train_iters} iterations) | {th['first_sketch_seconds_in_training']:.1f} s |",
            f"| step-time ratio with that sketch every 50 steps | {th['amortized_ratio_every_50']:.3f} |",
            f"| hvp_method='auto' chose | {th['hvp_method_auto']} |",
        ]
    acc = report.get("throughput_accum8", {})
    if "noise_only_ratio" in acc:
        lines += [
            f"| stock Trainer tokens/s, {ACCUMULATION} accumulated micro-batches ({acc['tokens_per_step']} tokens/step) "
            f"| {acc['stock_tokens_per_s']:.0f} |",
            f"| step-time ratio, noise only, {acc['tokens_per_step']} tokens/step | {acc['noise_only_ratio']:.3f} |",
        ]
    for name in ("sketch_fd", "sketch_exact", "sketch_fd_offload_basis"):
        sk = report.get(name, {})
        if "seconds" in sk:
            mem = f", peak extra {sk['peak_extra_gib']:.1f} GiB" if "peak_extra_gib" in sk else ""
            where = ", basis in host memory" if sk["basis"] == "cpu" and cli.device != "cpu" else ""
            lines.append(
                f"| one sketch, {sk['method']} ({sk['attention']} attention{where}), K={cli.k}, sketch batch "
                f"{cli.sketch_batch}×{cli.seq} | {sk['seconds']:.1f} s, {sk['products']} products, "
                f"{sk['seconds_per_product']:.3f} s/product{mem} |"
            )
    rows = report.get("sampler")
    for row in rows if isinstance(rows, list) else []:
        lines.append(f"| sampler {row['method']}, n={row['n']:.0e} | {row['ms']:.3f} ms |")
    for name in SECTIONS:
        if isinstance(report.get(name), dict) and "error" in report[name]:
            lines.append(f"| {name} | failed: {report[name]['error'][-200:]!r} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
