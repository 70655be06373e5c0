"""LevyTrainer through Accelerate's FSDP2 on one GPU (run under torchrun): the Trainer + FSDP path.

Accelerate enables FSDP only on GPUs, so the CPU test suite cannot run this path; this script does,
on a machine with a GPU:  torchrun --standalone --nproc_per_node 1 benchmarks/gpu_fsdp_smoke.py
It trains a tiny Llama for a few steps with noise on and prints what it checked.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator  # noqa: E402

from hf_levy import LevyConfig, LevyTrainer  # noqa: E402
from hf_levy.params import is_sharded  # noqa: E402


class Tokens(Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    args = LevyConfig(
        output_dir="/tmp/fsdp_smoke",
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
    trainer = LevyTrainer(model=model, args=args, train_dataset=Tokens(), data_collator=default_data_collator)
    trainer.train()
    cb = trainer.levy_callback
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "params_sharded": any(is_sharded(p) for p in cb.params),
        "hvp_method": cb.hvp_method,
        "noise_draws": cb.noise_draws,
        "eigenvalues": [h.get("curvature/eigenvalue_0") for h in logs if "curvature/eigenvalue_0" in h],
        "losses_finite": all(math.isfinite(h["loss"]) for h in logs),
        "state_files": sorted(
            f for f in os.listdir("/tmp/fsdp_smoke/checkpoint-3") if f.startswith("levy_state")
        ),
    }
    print("FSDP_SMOKE", json.dumps(result))


if __name__ == "__main__":
    main()
