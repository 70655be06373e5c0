"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: LevyTrainer over gloo DDP.

Writes, per rank, the final flat parameters, the sketch eigenvalues/vectors and the log history to
``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer_utils import COMMON, SKETCH, model, token_dataset  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_levy import LevyConfig, LevyTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--levy_scale", type=float, default=0.5)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    fields = {**COMMON, **SKETCH, "per_device_train_batch_size": cli.per_device_train_batch_size}
    if cli.save_steps:
        fields.update(save_strategy="steps", save_steps=cli.save_steps)
    args = LevyConfig(
        output_dir=cli.out,
        max_steps=cli.max_steps,
        levy_scale=cli.levy_scale,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        gradient_accumulation_steps=2,
        **fields,
    )
    trainer = LevyTrainer(
        model=model(), args=args, train_dataset=token_dataset(), data_collator=default_data_collator
    )
    trainer.train(resume_from_checkpoint=cli.resume)
    sketch = trainer.levy_callback.sketch
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
        },
        os.path.join(cli.out, f"rank{trainer.args.process_index}.pt"),
    )


if __name__ == "__main__":
    main()
