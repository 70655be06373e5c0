"""LevyCallback on another Trainer subclass: TRL's SFTTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset

from hf_levy import LevyArguments, LevyCallback

trl = pytest.importorskip("trl")


def char_tokenizer():
    """A character-level fast tokenizer built in memory (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def sft_trainer(tmp_path, name):
    texts = ["the quick brown fox jumps", "hello world again", "abc abc abc abc", "levy flights"] * 8
    config = trl.SFTConfig(
        output_dir=str(tmp_path / name),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
        bf16=False,
        seed=0,
    )
    model = tiny_llama(vocab_size=32, hidden_size=16, layers=1)
    return trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=char_tokenizer(),
    )


def test_sft_trainer_with_the_callback_gets_noise_and_logs_curvature(tmp_path):
    plain = sft_trainer(tmp_path, "plain")
    plain.train()
    trainer = sft_trainer(tmp_path, "levy")
    callback = LevyCallback(
        LevyArguments(levy_scale=0.5, num_eigenpairs=2, lanczos_num_iters=6, sketch_batch_size=4)
    ).attach(trainer)
    trainer.train()
    assert callback.noise_draws == 3
    sketch = next(h for h in trainer.state.log_history if "curvature/eigenvalue_0" in h)
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert sketch["step"] == sketch["curvature/sketch_step"] == 0 and math.isfinite(
        sketch["curvature/eigenvalue_0"]
    )
    assert 0 < first["levy/noise_to_grad_ratio"] <= 1 + 1e-9
    # The sketch's entry skips SFTTrainer.log, which would move its averaged training metrics into it.
    assert "mean_token_accuracy" not in sketch and "mean_token_accuracy" in first
    moved = [
        not torch.equal(p.detach(), q.detach())
        for p, q in zip(trainer.model.parameters(), plain.model.parameters(), strict=True)
    ]
    assert all(moved), "every parameter differs from the noise-free SFT run"
