"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: LevyTrainer over gloo DDP.

Writes, per rank, the final flat parameters, the sketch eigenvalues/vectors and the log history to
``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer_utils import COMMON, SKETCH, model, token_dataset  # noqa: E402
from transformers import TrainerCallback, default_data_collator  # noqa: E402

import hf_levy.schedule  # noqa: E402
from hf_levy import LevyCallback, LevyConfig, LevyTrainer  # noqa: E402


def main() -> None:
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
    cli = parser.parse_args()
    torch.set_num_threads(1)
    callbacks, refreshed = [], []
    if cli.uneven_fake_clock:
        callbacks.append(_install_uneven_fake_clock(refreshed))
    fields = {**COMMON, **SKETCH, "per_device_train_batch_size": cli.per_device_train_batch_size}
    fields["logging_steps"] = min(
        fields["logging_steps"], cli.max_steps
    )  # a one-step run still logs its sketch
    if cli.save_steps:
        fields.update(save_strategy="steps", save_steps=cli.save_steps)
    args = LevyConfig(
        output_dir=cli.out,
        max_steps=cli.max_steps,
        levy_scale=cli.levy_scale,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        gradient_accumulation_steps=2,
        sketch_max_overhead=0.5 if cli.uneven_fake_clock else None,
        levy_virtual_batch_size=cli.levy_virtual_batch_size,
        calibration_num_microbatches=32,
        **fields,
    )
    trainer = LevyTrainer(
        model=model(),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=cli.resume)
    sketch = trainer.levy_callback.run.sketch
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]),
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
        },
        os.path.join(cli.out, f"rank{trainer.args.process_index}.pt"),
    )


def _install_uneven_fake_clock(refreshed: list[int]) -> TrainerCallback:
    """Rank 0 alone would defer the second refresh by ceil(20 / (0.5 x 1)) = 40 steps, rank 1 by
    ceil(20 / (0.5 x 4)) = 10: only a shared decision keeps the ranks' collectives in step."""
    clock = types.SimpleNamespace(now=0.0)
    hf_levy.schedule.time = types.SimpleNamespace(perf_counter=lambda: clock.now)
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


if __name__ == "__main__":
    main()
    if (
        torch.distributed.is_initialized()
    ):  # a clean exit: gloo's threads are stopped before the interpreter ends
        torch.distributed.destroy_process_group()
