"""Run by tests/test_gpu_fsdp_smoke.py under `torchrun --nproc_per_node 2` on two GPUs: LevyTrainer through
Accelerate's FSDP2 (bf16, noise on, a checkpoint at step 3). Rank 0 writes what it saw to ``--out/result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trainer_utils import model, token_dataset  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_levy import LevyConfig, LevyTrainer  # noqa: E402
from hf_levy.params import is_sharded  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    args = LevyConfig(
        output_dir=cli.out,
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        bf16=True,
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        levy_scale=0.5,
        num_eigenpairs=4,
        lanczos_num_iters=12,
        sketch_every_n_steps=3,
        sketch_batch_size=8,
    )
    trainer = LevyTrainer(
        model=model(attn="sdpa"),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
    )
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "params_sharded": any(is_sharded(p) for p in trainer.model.parameters()),
        "hvp_method": trainer.levy_callback.hvp_method,
        "noise_draws": trainer.levy_callback.noise_draws,
        "eigenvalues": [h["curvature/eigenvalue_0"] for h in logs if "curvature/eigenvalue_0" in h],
        "losses_finite": all(math.isfinite(h["loss"]) for h in logs),
        "state_files": sorted(
            f for f in os.listdir(os.path.join(cli.out, "checkpoint-3")) if f.startswith("levy_state")
        ),
    }
    with open(os.path.join(cli.out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
