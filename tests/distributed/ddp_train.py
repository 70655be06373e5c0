"""Run by tests/test_distributed.py and tests/test_deepspeed.py under `torchrun --nproc_per_node 2`:
LevyTrainer over gloo DDP, or with ``--zero_stage S`` over DeepSpeed ZeRO-S on CPU ranks
(``DS_ACCELERATOR=cpu``), or with ``--stock`` the plain Trainer on the same setup.

Writes, per rank, the final flat parameters, the sketch eigenvalues/vectors and the log history to
``--out/rank{r}.pt``. Several runs in one launch: their arguments separated by ``::``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_llama  # noqa: E402
from trainer_utils import COMMON, SKETCH, model, token_dataset  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import hf_levy._schedule  # noqa: E402
from hf_levy import LevyCallback, LevyConfig, LevyTrainer  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--levy_scale", type=float, default=0.5)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument(
        "--levy_virtual_batch_size", type=int, default=None, help="calibrate (32 micro-batches)"
    )
    parser.add_argument(
        "--uneven_fake_clock",
        action="store_true",
        help="sketch_max_overhead=0.5 on a fake clock: refreshes cost 20 s, steps 1 s on rank 0 and 4 s on rank 1",
    )
    parser.add_argument("--zero_stage", type=int, default=None, help="DeepSpeed ZeRO stage (1, 2, 3)")
    parser.add_argument("--stock", action="store_true", help="transformers.Trainer, no hf_levy")
    parser.add_argument(
        "--offload", action="store_true", help="ZeRO offload of optimizer (and stage-3 params)"
    )
    parser.add_argument(
        "--odd_bias", action="store_true", help="vocabulary 33 and an lm_head bias: a parameter of odd size"
    )
    parser.add_argument("--hvp_method", default="auto")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--lanczos_num_iters", type=int, default=SKETCH["lanczos_num_iters"])
    parser.add_argument("--lanczos_tol", type=float, default=1e-3)
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    callbacks, refreshed = [], []
    if cli.uneven_fake_clock:
        callbacks.append(_install_uneven_fake_clock(refreshed))
    fields = {**COMMON, "per_device_train_batch_size": cli.per_device_train_batch_size}
    fields["logging_steps"] = min(
        fields["logging_steps"], cli.max_steps
    )  # a one-step run still logs its sketch
    if cli.save_steps:
        fields.update(save_strategy="steps", save_steps=cli.save_steps)
    if cli.zero_stage is not None:
        fields["deepspeed"] = zero_config(cli.zero_stage, offload=cli.offload)
    fields.update(
        output_dir=cli.out,
        max_steps=cli.max_steps,
        max_grad_norm=cli.max_grad_norm,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        gradient_accumulation_steps=2,
    )
    if cli.stock:
        args = TrainingArguments(**fields)
    else:
        args = LevyConfig(
            levy_scale=cli.levy_scale,
            hvp_method=cli.hvp_method,
            sketch_max_overhead=0.5 if cli.uneven_fake_clock else None,
            levy_virtual_batch_size=cli.levy_virtual_batch_size,
            calibration_num_microbatches=32,
            lanczos_tol=cli.lanczos_tol,
            **{**SKETCH, "lanczos_num_iters": cli.lanczos_num_iters},
            **fields,
        )
    trainer = (Trainer if cli.stock else LevyTrainer)(
        model=_model_with_odd_bias() if cli.odd_bias else model(),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    if not cli.stock:
        reference_norms = _record_reference_norms(trainer.levy_callback)
    trainer.train(resume_from_checkpoint=cli.resume)
    out = {
        "world_size": trainer.args.world_size,
        "params": _full_params(trainer.model),
        "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
    }
    if not cli.stock:
        out.update(_levy_outputs(trainer, refreshed), reference_norms=reference_norms)
    torch.save(out, os.path.join(cli.out, f"rank{trainer.args.process_index}.pt"))


def zero_config(stage: int, offload: bool = False) -> dict:
    """A DeepSpeed config the Trainer fills in ("auto"); torch's AdamW needs no compiled op."""
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    }


def _model_with_odd_bias() -> torch.nn.Module:
    """The tiny Llama with a 33-token vocabulary (one unused) and a trainable lm_head bias of 33 entries,
    which ZeRO-3 splits 17 / 16 between two ranks: pieces of unequal length."""
    llama = tiny_llama(vocab_size=33, hidden_size=16, layers=2)
    llama.lm_head.bias = torch.nn.Parameter(torch.zeros(33))
    return llama


def _full_params(model: torch.nn.Module) -> torch.Tensor:
    """The flat parameters; under ZeRO-3 gathered from the ranks' pieces first."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _record_reference_norms(callback: LevyCallback) -> list[float]:
    """‖g‖ at each noise draw, just before ξ is added (after clipping): the norm the noise is relative to."""
    norms: list[float] = []
    real = callback.add_noise

    def add_noise(step: int) -> None:
        norms.append(callback.run.space.grad_norm())
        real(step)

    callback.add_noise = add_noise
    return norms


def _levy_outputs(trainer: LevyTrainer, refreshed: list[int]) -> dict:
    sketch = trainer.levy_callback.run.sketch
    space = trainer.levy_callback.run.space
    return {
        "dim": space.dim,
        "local_numel": space.local_numel,
        "full_dim": getattr(space, "full_dim", space.dim),
        "values": sketch.values_K,
        "vectors": sketch.vectors_PK,
        "first_sketch_values": [
            [h[f"curvature/eigenvalue_{i}"] for i in range(2)]
            for h in trainer.state.log_history
            if "curvature/eigenvalue_0" in h
        ][0],
        "noise_draws": trainer.levy_callback.noise_draws,
        "physical_batch_size": trainer.levy_callback.run.physical_batch_size,
        "refreshed": refreshed,
        "first_variance_share": [
            h["levy/noise_variance_share"]
            for h in trainer.state.log_history
            if "levy/noise_variance_share" in h
        ][:1],
        "first_fitted_alpha": [
            [h[key] for key in sorted(h) if key.startswith("levy/fitted_alpha_")]
            for h in trainer.state.log_history
            if "levy/fitted_alpha_0" in h
        ][:1],
    }


def _install_uneven_fake_clock(refreshed: list[int]) -> TrainerCallback:
    """Rank 0 alone would defer the second refresh by ceil(20 / (0.5 x 1)) = 40 steps, rank 1 by
    ceil(20 / (0.5 x 4)) = 10: only a shared decision keeps the ranks' collectives in step."""
    clock = types.SimpleNamespace(now=0.0)
    hf_levy._schedule.time = types.SimpleNamespace(perf_counter=lambda: clock.now)
    real = LevyCallback.refresh_sketch

    def refresh_sketch(self, step):
        refreshed.append(step)
        clock.now += 20.0
        return real(self, step)

    LevyCallback.refresh_sketch = refresh_sketch
    step_seconds = 1.0 + 3.0 * int(os.environ["RANK"])

    class StepCost(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.now += step_seconds

    return StepCost()


def runs(argv: list[str]) -> list[list[str]]:
    """The command line split at ``::`` into the runs it asks for, trained one after the other in these
    processes (each launch costs more than a tiny run: imports, process group, DeepSpeed's setup)."""
    out: list[list[str]] = [[]]
    for arg in argv:
        if arg == "::":
            out.append([])
        else:
            out[-1].append(arg)
    return out


if __name__ == "__main__":
    for run_argv in runs(sys.argv[1:]):
        main(run_argv)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # The results are saved: leave without the interpreter's teardown, where a thread of the process group
    # (or of DeepSpeed's) still joinable aborts the process now and then ("terminate called without an
    # active exception", exit -6), which would fail a run that finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
