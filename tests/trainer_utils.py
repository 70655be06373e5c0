"""Tiny Trainer runs shared by the trainer tests (tiny Llama from config, generated tokens)."""

from __future__ import annotations

import torch
from conftest import tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_levy import LevyConfig, LevyTrainer

COMMON = dict(
    use_cpu=True,
    report_to="none",
    per_device_train_batch_size=8,
    learning_rate=1e-2,
    logging_steps=2,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
    dataloader_num_workers=0,
)
# The Trainer methods LevyTrainer (and a trainer LevyCallback.attach was given) overrides.
OVERRIDDEN = {
    "_save_checkpoint",
    "_load_optimizer_and_scheduler",
    "_clip_grad_norm",
    "get_batch_samples",
    "log",
}
SKETCH = dict(num_eigenpairs=2, lanczos_num_iters=8, sketch_every_n_steps=3, sketch_batch_size=8)


def token_dataset(n: int = 64, length: int = 12, vocab: int = 32, seed: int = 0) -> Dataset:
    """Sequences with a learnable pattern (each token = previous + 1 mod vocab, random start)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(length)) % vocab
    flip = torch.rand(n, length, generator=g) < 0.1
    ids = torch.where(flip, torch.randint(0, vocab, (n, length), generator=g), ids)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def model(**kw):
    return tiny_llama(vocab_size=32, hidden_size=16, layers=2, **kw)


def run_stock(tmp_path, max_steps=6, **overrides):
    args = TrainingArguments(
        output_dir=str(tmp_path / "stock"), max_steps=max_steps, **{**COMMON, **overrides}
    )
    trainer = Trainer(
        model=model(), args=args, train_dataset=token_dataset(), data_collator=default_data_collator
    )
    trainer.train()
    return trainer


def run_levy(tmp_path, max_steps=6, name="levy", model_kwargs=None, resume=None, callbacks=None, **overrides):
    fields = {**COMMON, **SKETCH, **overrides}
    args = LevyConfig(output_dir=str(tmp_path / name), max_steps=max_steps, **fields)
    trainer = LevyTrainer(
        model=model(**(model_kwargs or {})),
        args=args,
        train_dataset=token_dataset(),
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def flat_params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
