"""Grokking on modular addition: optimizer steps, epochs and seconds to a test-accuracy target, per arm.

The default recipe of hf_levy: does full-batch LevyTrainer generalize (reach 95% test accuracy) in fewer
optimizer steps than the full-batch stock Trainer, and how does that compare with a small-batch stock run
in epochs and wall-clock? Task a + b mod 59 at 30% train (1044 / 2437 pairs), 1-layer Llama (hidden 32,
MLP 128, 4 heads, ~20k parameters), AdamW lr 1e-3, betas (0.9, 0.98), weight decay 5, 10 warmup steps
then constant lr. Full batch memorizes by ~500 steps and then sits on a test plateau (grokking).

Command:  OMP_NUM_THREADS=1 python benchmarks/explore_grokking.py [--arms stock_small,stock_full,levy]
          [--seeds 0 1 2] [--modulus 59 --hidden 32 --weight-decay 5 --levy-scale 1.0 ...] [--curves]
Hardware: CPU (one thread). Each arm stops as soon as the test accuracy reaches ``--target`` (or at
          ``--max-steps`` / ``--max-epochs-small``), so the runtime is the sum of the arms' times to target.
          Runtime of the default 7 runs: about 8 min of CPU on an idle core (the iso ablation never reaches
          the target and runs its 3000 steps); wall time grows with the machine's load.
Outcome:  a markdown table, one row per (arm, seed): the first optimizer step, epoch and wall seconds at
          which the test accuracy reached the target (evaluated every ``--eval-steps`` full-batch steps,
          every epoch for the small batch), when train accuracy reached 99%, the mean ‖ξ‖/‖g‖ the noisy arms
          applied, and each run's wall and CPU seconds.

Arms (``--arms``, comma-separated):
  stock_small   stock ``transformers.Trainer``, batch ``--small-batch``
  stock_full    stock Trainer, full batch (every optimizer step sees the whole train set: steps = epochs)
  levy          LevyTrainer, full batch, α = ``--levy-alpha``, noise in the top-K Hessian directions
  iso           ablation: LevyTrainer with levy_noise_basis="isotropic" (i.i.d. α-stable coordinates
                rescaled to the norm the Hessian noise would have had)
  iso_sphere    ablation: the same α-stable noise-norm law, in a uniformly random direction (no sketch)
  gauss         ablation: α = 2 in the same Hessian directions, at the mean noise norm of ``levy``
  alpha=A       LevyTrainer full batch at α = A, at the mean noise norm of ``levy`` (the α sweep)

"Equal noise norm" across α: the noise is ξ = V·(s‖g‖·w⊙clip(z)), capped at ‖ξ‖ ≤ r‖g‖. For each α the
scale s_α is set so that the Monte-Carlo mean of ‖ξ‖/‖g‖ equals that of the reference arm (α =
``--levy-alpha``, s = ``--levy-scale``), with the per-draw clip and the cap applied as in
``hf_levy.noise.noise_coefficients`` and uniform weights (the √λ weights change ‖w⊙clip(z)‖ only
slightly; the logged ratio is reported to check). At the default s = 1 the cap binds on most steps, so the
α arms differ in the direction law of ξ (heavy tails: one eigen-direction dominates), hardly in its norm.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_levy import LevyConfig, LevyTrainer  # noqa: E402
from hf_levy.callback import LevyCallback  # noqa: E402
from hf_levy.noise import noise_coefficients
from hf_levy.rng import step_generator  # noqa: E402
from hf_levy.stable import sample_symmetric_stable  # noqa: E402
from hf_levy.tasks import build_model, modular_addition  # noqa: E402

_ISOTROPIC_STREAM = 0x1507  # seed offset of the isotropic directions (independent of the noise draws)


# ---------------------------------------------------------------------------------------------- callbacks
class TargetCallback(TrainerCallback):
    """Records the eval accuracies; notes the first step at which test accuracy >= target and stops there."""

    def __init__(self, target: float, stop_at_target: bool = True):
        self.target, self.stop_at_target = target, stop_at_target
        self.history: list[dict[str, float]] = []
        self.hit: dict[str, float] | None = None
        self.memorized: dict[str, float] | None = None
        self.eval_seconds = 0.0
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        self.eval_seconds += sum(v for k, v in metrics.items() if k.endswith("_runtime"))
        # With a dict of eval sets the Trainer evaluates (and calls this) once per set, test first.
        now = time.perf_counter() - self.start
        point = dict(
            step=state.global_step, epoch=state.epoch or 0.0, seconds=now, eval_seconds=self.eval_seconds
        )
        train = metrics.get("eval_train_accuracy")
        if train is not None:
            if self.history and self.history[-1]["step"] == state.global_step:
                self.history[-1]["train"] = train
            if self.memorized is None and train >= 0.99:
                self.memorized = point
        test = metrics.get("eval_test_accuracy", metrics.get("eval_accuracy"))
        if test is None:
            return
        self.history.append({**point, "test": test, "train": None})
        if self.hit is None and test >= self.target:
            self.hit = point
            if self.stop_at_target:
                control.should_training_stop = True


class IsotropicLevyCallback(LevyCallback):
    """Ablation: α-stable noise of the LevyTrainer norm law, in a uniformly random direction.

    ‖ξ‖ = min(s·‖g‖·‖w⊙clip(z)‖, cap·‖g‖) with the same draws z (seeded by (levy_seed, step)) but uniform
    weights w = 1/√K (the law the α arms are matched with), and ξ = ‖ξ‖·u, u uniform on the unit sphere of
    the trainable parameters (its own seeded stream). No Hessian sketch runs: the noise needs no directions.
    """

    def on_step_begin(self, args, state, control, **kwargs):
        return

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.levy.levy_scale > 0:
            self.add_noise(state.global_step)

    def add_noise(self, step: int) -> None:
        if all(p.grad is None for p in self.params):
            return
        grad_norm = self.space.grad_norm()
        if not math.isfinite(grad_norm):
            self._skipped_nonfinite += 1
            return
        levy = self.levy
        k = levy.num_eigenpairs
        unit = grad_norm if levy.levy_scale_mode == "relative" else 1.0
        scales_K = torch.full((k,), levy.levy_scale * unit * k**-0.5, dtype=torch.float64)
        max_norm = levy.levy_max_noise_ratio * grad_norm if levy.levy_max_noise_ratio is not None else None
        coef_K = noise_coefficients(
            scales_K, levy.levy_alpha, step_generator(self.seed, step), clip=levy.levy_clip, max_norm=max_norm
        )
        noise_norm = coef_K.norm().item()
        u = torch.randn(
            self.space.dim, generator=step_generator(self.seed + _ISOTROPIC_STREAM, step), dtype=torch.float64
        )
        self.space.add_to_grads((u * (noise_norm / u.norm())).to(self.params[0].dtype))
        self._noise_log.append((noise_norm, noise_norm / grad_norm if grad_norm > 0 else 0.0))
        self.noise_draws += 1


class SketchTotals:
    """Sums the cost of every sketch refresh (the log keeps only the last refresh before each log step)."""

    def __init__(self):
        self.count, self.seconds, self.products, self.top = 0, 0.0, 0, []

    def instrument(self, callback: LevyCallback) -> None:
        refresh = callback.refresh_sketch

        def counted(step: int) -> dict[str, float]:
            metrics = refresh(step)
            self.count += 1
            self.seconds += metrics.get("curvature/sketch_seconds", 0.0)
            self.products += int(metrics.get("curvature/hvp_count", 0))
            if "curvature/eigenvalue_0" in metrics:
                self.top.append(metrics["curvature/eigenvalue_0"])
            return metrics

        callback.refresh_sketch = counted


# ---------------------------------------------------------------------------------------------- noise norms
def mean_noise_ratio(
    alpha: float, scale: float, k: int, clip: float | None, cap: float | None, draws: int = 200_000
) -> float:
    """Monte-Carlo E[‖ξ‖/‖g‖] in relative mode with uniform weights w = 1/√K (as ``noise_coefficients``:
    per-draw clip, then the norm cap). Fixed draws (seed 12345), so the mean is smooth in ``scale``."""
    z = sample_symmetric_stable((draws, k), alpha, generator=torch.Generator().manual_seed(12345))
    z = z.double()
    if clip is not None:
        z = z.clamp(-clip, clip)
    ratio = scale * k**-0.5 * z.norm(dim=1)
    if cap is not None:
        ratio = ratio.clamp(max=cap)
    return float(ratio.mean())


def matched_scale(alpha: float, target_ratio: float, k: int, clip: float | None, cap: float | None) -> float:
    """The levy_scale at which α's mean noise ratio equals ``target_ratio`` (bisection on a log scale)."""
    lo, hi = 1e-4, 1e2
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        if mean_noise_ratio(alpha, mid, k, clip, cap) < target_ratio:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


# ---------------------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    name: str
    kind: str  # "stock", "levy" or "iso_sphere"
    full_batch: bool
    levy: dict = field(default_factory=dict)


def build_arms(names: list[str], a: argparse.Namespace) -> list[Arm]:
    ref = dict(
        levy_alpha=a.levy_alpha,
        levy_scale=a.levy_scale,
        levy_max_noise_ratio=a.levy_max_noise_ratio,
        levy_clip=a.levy_clip,
        num_eigenpairs=a.num_eigenpairs,
        lanczos_num_iters=a.lanczos_num_iters,
        sketch_every_n_steps=a.sketch_every,
        sketch_batch_size=a.sketch_batch_size,
    )
    ref_ratio = None
    arms = []
    for name in names:
        if name == "stock_small":
            arms.append(Arm(name, "stock", False))
        elif name == "stock_full":
            arms.append(Arm(name, "stock", True))
        elif name == "levy":
            arms.append(Arm(name, "levy", True, dict(ref)))
        elif name == "iso":
            arms.append(Arm(name, "levy", True, {**ref, "levy_noise_basis": "isotropic"}))
        elif name == "iso_sphere":
            arms.append(Arm(name, "iso_sphere", True, dict(ref)))
        elif name == "gauss" or name.startswith("alpha="):
            alpha = 2.0 if name == "gauss" else float(name.split("=", 1)[1])
            if ref_ratio is None:
                ref_ratio = mean_noise_ratio(
                    a.levy_alpha, a.levy_scale, a.num_eigenpairs, a.levy_clip, a.levy_max_noise_ratio
                )
            scale = matched_scale(alpha, ref_ratio, a.num_eigenpairs, a.levy_clip, a.levy_max_noise_ratio)
            arms.append(Arm(name, "levy", True, {**ref, "levy_alpha": alpha, "levy_scale": scale}))
        else:
            raise SystemExit(f"unknown arm {name!r}: see the module docstring for the arm names")
    return arms


def run_arm(arm: Arm, a: argparse.Namespace, seed: int, task) -> dict:
    n_train = len(task.train_dataset)
    batch = n_train if arm.full_batch else a.small_batch
    steps_per_epoch = math.ceil(n_train / batch)
    max_steps = a.max_steps if arm.full_batch else a.max_epochs_small * steps_per_epoch
    eval_steps = a.eval_steps if arm.full_batch else max(1, round(a.eval_epochs_small * steps_per_epoch))
    common = dict(
        output_dir=os.path.join(a.output_dir, f"{arm.name}-{seed}"),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=4096,
        learning_rate=a.lr,
        weight_decay=a.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.98,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=a.warmup_steps,
        max_grad_norm=a.max_grad_norm,
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_steps=eval_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    model = build_model(
        vocab_size=task.vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate or 4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        seed=seed,
    )
    eval_sets = {"test": task.eval_dataset}
    if a.train_accuracy:
        eval_sets["train"] = task.train_dataset
    target = TargetCallback(a.target)
    kwargs = dict(
        model=model,
        train_dataset=task.train_dataset,
        eval_dataset=eval_sets,
        data_collator=task.data_collator,
        compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        callbacks=[target],
    )
    sketches = SketchTotals()
    if arm.kind == "stock":
        trainer = Trainer(args=TrainingArguments(**common), **kwargs)
    elif arm.kind == "levy":
        trainer = LevyTrainer(args=LevyConfig(**common, **arm.levy), **kwargs)
        sketches.instrument(trainer.levy_callback)
    else:
        args = LevyConfig(**common, **arm.levy)
        trainer = Trainer(args=args, **kwargs)
        sketches.instrument(IsotropicLevyCallback(args).attach(trainer))
    trainer.remove_callback(PrinterCallback)  # the per-log dict prints; the table says what matters
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ratios = [
        h["levy/noise_to_grad_ratio"] for h in trainer.state.log_history if "levy/noise_to_grad_ratio" in h
    ]
    sketch_seconds, products, top = sketches.seconds, sketches.products, sketches.top
    hit, mem = target.hit, target.memorized
    last = target.history[-1] if target.history else {}
    return dict(
        arm=arm.name,
        seed=seed,
        batch=batch,
        steps_per_epoch=steps_per_epoch,
        step=hit["step"] if hit else None,
        epoch=hit["epoch"] if hit else None,
        seconds=hit["seconds"] if hit else None,
        train_seconds=hit["seconds"] - hit["eval_seconds"] if hit else None,
        mem_step=mem["step"] if mem else None,
        final_step=trainer.state.global_step,
        final_test=last.get("test"),
        total_seconds=total,
        cpu_seconds=cpu,
        sketch_seconds=sketch_seconds,
        products=products,
        sketches=sketches.count,
        top_eigenvalues=(top[0], top[-1]) if top else None,
        eval_seconds=target.eval_seconds,
        ratio=statistics.mean(ratios) if ratios else None,
        scale=arm.levy.get("levy_scale"),
        alpha=arm.levy.get("levy_alpha"),
        curve=[
            (p["step"], round(p["test"], 3)) + ((round(p["train"], 3),) if p["train"] is not None else ())
            for p in target.history
        ],
    )


def fmt(x, spec="") -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="stock_small,stock_full,levy,iso,gauss,alpha=1.2,alpha=1.8")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test split")
    # task and model
    p.add_argument("--modulus", type=int, default=59)
    p.add_argument("--train-fraction", type=float, default=0.3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    # optimization
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--small-batch", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=3000, help="full-batch arms (= epochs)")
    p.add_argument("--max-epochs-small", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=25, help="full-batch arms")
    p.add_argument("--eval-epochs-small", type=float, default=1.0)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument(
        "--train-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the train accuracy (the memorization step; about 1%% more time)",
    )
    # noise
    p.add_argument("--levy-alpha", type=float, default=1.5)
    p.add_argument("--levy-scale", type=float, default=1.0)
    p.add_argument("--levy-max-noise-ratio", type=lambda s: None if s == "None" else float(s), default=1.0)
    p.add_argument("--levy-clip", type=lambda s: None if s == "None" else float(s), default=10.0)
    p.add_argument("--num-eigenpairs", type=int, default=4)
    p.add_argument("--lanczos-num-iters", type=int, default=20)
    p.add_argument("--sketch-every", type=int, default=50)
    p.add_argument("--sketch-batch-size", type=int, default=256)
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "hf_levy_grokking"))
    p.add_argument(
        "--curves", action="store_true", help="print each arm's (step, test accuracy[, train accuracy]) curve"
    )
    a = p.parse_args()

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    task = modular_addition(a.modulus, a.train_fraction, seed=a.data_seed)
    print(task.description)
    print(
        f"model: Llama 1x{a.layers} hidden {a.hidden}, mlp {a.intermediate or 4 * a.hidden}, heads {a.heads}; "
        f"AdamW lr {a.lr}, wd {a.weight_decay}, betas (0.9, 0.98), warmup {a.warmup_steps}; target {a.target}"
    )
    arms = build_arms(a.arms.split(","), a)
    rows = []
    for arm in arms:
        for seed in a.seeds:
            row = run_arm(arm, a, seed, task)
            rows.append(row)
            print(
                f"  {row['arm']:<12} seed {seed}: step {fmt(row['step'])} epoch {fmt(row['epoch'], '.1f')} "
                f"{fmt(row['seconds'], '.1f')} s ({fmt(row['train_seconds'], '.1f')} s without evals) (ran {row['final_step']} steps, {row['total_seconds']:.1f} s, "
                f"cpu {row['cpu_seconds']:.1f} s, "
                f"final test {fmt(row['final_test'], '.3f')})",
                flush=True,
            )
            if a.curves:
                print("    curve:", row["curve"])
            if row["products"]:
                print(
                    f"    sketch: {row['sketches']} refreshes, {row['products']} Hessian-vector products, "
                    f"{row['sketch_seconds']:.1f} s; "
                    f"top eigenvalue first/last {row['top_eigenvalues'][0]:.3g} / {row['top_eigenvalues'][1]:.3g}"
                )
    print()
    print(
        "| arm | seed | batch | α | levy_scale | mean ‖ξ‖/‖g‖ | train ≥ 99% at step | target at step | epoch "
        "| seconds (without evals) | steps run | run seconds | run CPU seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['seed']} | {r['batch']} | {fmt(r['alpha'])} | {fmt(r['scale'], '.3g')} "
            f"| {fmt(r['ratio'], '.3f')} | {fmt(r['mem_step'])} | {fmt(r['step'])} | {fmt(r['epoch'], '.1f')} "
            f"| {fmt(r['seconds'], '.1f')} ({fmt(r['train_seconds'], '.1f')}) | {r['final_step']} | {r['total_seconds']:.1f} | {r['cpu_seconds']:.1f} |"
        )
    print(
        f"\ntotal wall seconds: {sum(r['total_seconds'] for r in rows):.1f}, "
        f"CPU seconds: {sum(r['cpu_seconds'] for r in rows):.1f}"
    )


if __name__ == "__main__":
    main()
