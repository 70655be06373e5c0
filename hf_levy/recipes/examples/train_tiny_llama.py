"""A tiny Llama trained by LevyTrainer on generated token sequences: the script docs/distributed.md launches.

Every LevyConfig field (hence every TrainingArguments field) is a command-line flag, read by
``HfArgumentParser``; ``--deepspeed ds.json`` hands the Trainer a DeepSpeed config. The defaults set below
suit the tiny model (40 steps of 8 sequences per rank at learning rate 1e-2, a log line every 10 steps, no
checkpoints, output in runs/tiny_llama); flags override them. Nothing is downloaded: the model is built
from a ``LlamaConfig`` and the data is generated. It ships with the ``recipes`` extra (``examples/`` in a
clone); on one CPU:

    hf-levy cp train_tiny_llama.py .
    python train_tiny_llama.py --use_cpu
"""

from __future__ import annotations

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, default_data_collator, set_seed

from hf_levy import LevyConfig, LevyTrainer


def token_sequences(n: int = 512, length: int = 16, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (each token is the previous one + 1 mod ``vocab``) from random starts: a pattern
    the model learns within a few dozen steps, so the logged loss shows that training works."""
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
    ids = (start + torch.arange(length)) % vocab
    return [{"input_ids": row, "labels": row} for row in ids]


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama of about 25k parameters. Eager attention has a second derivative, so the sketch's
    Hessian-vector products can be exact; SDPA's fused kernels have none, and hf_levy would fall back to
    finite differences."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = HfArgumentParser(LevyConfig)
    parser.set_defaults(
        output_dir="runs/tiny_llama",
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="no",
    )
    (args,) = parser.parse_args_into_dataclasses()
    set_seed(args.seed)  # the same initial weights on every rank
    trainer = LevyTrainer(
        model=tiny_llama(), args=args, train_dataset=token_sequences(), data_collator=default_data_collator
    )
    trainer.train()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # stop the process group's threads before the interpreter exits
        torch.distributed.destroy_process_group()
