"""Shared fixtures: tiny models built from config (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(1)


def tiny_llama(
    vocab_size: int = 16, hidden_size: int = 8, layers: int = 1, attn: str = "eager", seed: int = 0, **kw
):
    """A LlamaForCausalLM small enough for a dense Hessian (about a thousand parameters at the defaults)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
        **kw,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def llama_factory():
    return tiny_llama
