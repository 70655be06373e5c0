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


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests (multi-process launches, end-to-end runs) first, each file's order kept.

    ``make test`` hands whole files to one worker per core in collection order: starting the longest
    first keeps one worker from being left with a long file at the end while the others idle.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file stays
