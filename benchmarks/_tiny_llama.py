"""Tiny HF Llamas and their data: the one source of models and tokens for the benchmarks.

Two setups. The Hessian benchmarks (``SIZES``, :func:`trained_setup`): a LlamaForCausalLM built from config
(eager attention, seed 0), trained with AdamW on the first 90% of 2 MB of stdlib ``*.py`` bytes, and a
fixed held-out sketch batch of 8 x 32 tokens from the last 10%; at vocab 64 the tokens are the 63 most
frequent bytes plus one id for all others. The Trainer benchmarks (``TOKEN_SIZES``, :func:`token_model`,
:class:`RandomTokens`): Llamas at vocab 256 on seeded random tokens. Nothing is downloaded. Eager
attention because PyTorch's fused SDPA kernels have no double backward on CPU.

``float64_copy`` makes a copy that really is float64: HF's LlamaRMSNorm casts to float32 and eager
attention runs its softmax in float32, so a plain ``.double()`` model has a float32
Hessian (asymmetric at ~1e-7). The copy uses a dtype-preserving RMSNorm and eager attention, the same
computation for float32 inputs; RoPE's cos/sin stay float32-accurate, but they are constants. Its loss
must be :func:`lm_loss`, since ``model(..., labels=...).loss`` casts the logits to float32 (``lm_loss``
equals it on the float32 model; ``trained_setup`` checks). With both, the float64 Hessian is symmetric to
~1e-14. ``top_eigenpairs_float64`` turns such a product into the ground truth (ARPACK at tol 1e-10) and
``interleaved_medians`` times variants side by side.
"""

from __future__ import annotations

import copy
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm, repeat_kv

# Hessian benchmarks. Columns: vocab, hidden, MLP, layers, heads, AdamW learning rate. 7,248 and 984,000 parameters.
SIZES: dict[str, dict[str, float]] = {
    "small": dict(vocab_size=64, hidden_size=16, intermediate_size=32, layers=2, heads=2, lr=3e-3),
    "large": dict(vocab_size=256, hidden_size=192, intermediate_size=512, layers=2, heads=4, lr=1e-3),
}
# Trainer benchmarks on random tokens (vocab 256). Columns: hidden, MLP, layers, heads. 131,904 / 1,055,104 /
# 4,877,568 parameters.
TOKEN_SIZES = {"0.1M": (64, 172, 2, 4), "1M": (128, 344, 5, 4), "5M": (256, 688, 6, 8)}
TOKEN_VOCAB = 256
CORPUS_BYTES = 2_000_000
SKETCH_BATCH, SKETCH_LEN = 8, 32
TRAIN_BATCH, TRAIN_LEN = 16, 64
_KEEP_DTYPE = "eager_keep_dtype"


def stdlib_bytes(limit: int = CORPUS_BYTES) -> bytes:
    """The first ``limit`` bytes of the stdlib's ``*.py`` files, sorted by path (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    return b"".join(chunks)[:limit]


@dataclass
class Corpus:
    train: Tensor  # (N,) int64 token ids
    heldout: Tensor

    @classmethod
    def build(cls, vocab_size: int) -> Corpus:
        """Raw bytes for vocab 256; else the vocab-1 most frequent bytes plus one id for all the others."""
        ids = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long()
        if vocab_size < 256:
            ranked = torch.bincount(ids, minlength=256).argsort(descending=True, stable=True)
            table = torch.full((256,), vocab_size - 1, dtype=torch.long)
            table[ranked[: vocab_size - 1]] = torch.arange(vocab_size - 1)
            ids = table[ids]
        cut = int(0.9 * len(ids))
        return cls(ids[:cut], ids[cut:])

    def sketch_batch(self) -> dict[str, Tensor]:
        """The fixed held-out batch the Hessian is taken on: SKETCH_BATCH windows of SKETCH_LEN tokens."""
        gen = torch.Generator().manual_seed(1234)
        starts = torch.randint(len(self.heldout) - SKETCH_LEN, (SKETCH_BATCH,), generator=gen)
        ids = torch.stack([self.heldout[s : s + SKETCH_LEN] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids}

    def train_batch(self, gen: torch.Generator) -> Tensor:
        starts = torch.randint(len(self.train) - TRAIN_LEN, (TRAIN_BATCH,), generator=gen)
        return torch.stack([self.train[s : s + TRAIN_LEN] for s in starts.tolist()])


def build_llama(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    *,
    max_positions: int = 128,
    attn: str = "eager",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """A LlamaForCausalLM from config (as many key/value heads as heads), initialized after
    ``torch.manual_seed(seed)`` directly on ``device`` (a CPU init of a 0.5B model takes long)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
    )
    with torch.device(device):
        return LlamaForCausalLM(config)


def build_model(size: str, seed: int = 0) -> LlamaForCausalLM:
    """The Hessian benchmarks' model of ``SIZES[size]``."""
    spec = SIZES[size]
    return build_llama(
        spec["vocab_size"],
        spec["hidden_size"],
        spec["intermediate_size"],
        spec["layers"],
        spec["heads"],
        seed=seed,
    )


def token_model(size: str, seq_len: int) -> LlamaForCausalLM:
    """The Trainer benchmarks' model of ``TOKEN_SIZES[size]`` (seed 0)."""
    hidden, mlp, layers, heads = TOKEN_SIZES[size]
    return build_llama(TOKEN_VOCAB, hidden, mlp, layers, heads, max_positions=seq_len)


class RandomTokens(Dataset):
    """``n`` fixed sequences of seeded random token ids; labels = inputs (map-style, as the sketch needs)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int = TOKEN_VOCAB, seed: int = 0):
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross entropy, in the dtype of the logits."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class Trainer:
    """AdamW on random training windows; keeps its optimizer and data generator so training can go on."""

    def __init__(self, model: nn.Module, corpus: Corpus, lr: float, seed: int = 0):
        self.model, self.corpus = model, corpus
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed)

    def steps(self, n: int) -> None:
        self.model.train()
        for _ in range(n):
            loss = lm_loss(self.model, {"input_ids": self.corpus.train_batch(self.gen)})
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()


def trained_setup(size: str, steps: int) -> tuple[LlamaForCausalLM, Corpus, Trainer, dict[str, Tensor]]:
    """The model after ``steps`` AdamW steps, its corpus, the trainer (to continue) and the sketch batch."""
    model = build_model(size)
    corpus = Corpus.build(model.config.vocab_size)
    trainer = Trainer(model, corpus, SIZES[size]["lr"])
    trainer.steps(steps)
    batch = corpus.sketch_batch()
    with torch.no_grad():
        hf_loss, own_loss = model(**batch).loss, lm_loss(model, batch)
    assert torch.allclose(hf_loss, own_loss, rtol=1e-6), (hf_loss, own_loss)
    return model, corpus, trainer, batch


def _rms_norm_keep_dtype(self: LlamaRMSNorm, hidden: Tensor) -> Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_keep_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # HF's eager_attention_forward with softmax in the query's dtype instead of float32.
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def float64_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A float64 copy whose norms and softmax stay float64 (see the module docstring); eval mode."""
    AttentionInterface.register(_KEEP_DTYPE, _eager_attention_keep_dtype)
    AttentionMaskInterface.register(_KEEP_DTYPE, eager_mask)
    copy64 = copy.deepcopy(model).double().eval()
    copy64.config._attn_implementation = _KEEP_DTYPE
    for module in copy64.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = _rms_norm_keep_dtype.__get__(module)
    for p in copy64.parameters():
        p.grad = None
    return copy64


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each fn, called in turn inside every repeat so machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, lazy imports
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def top_eigenpairs_float64(matvec64: Callable[[Tensor], Tensor], dim: int, k: int) -> tuple[Tensor, Tensor]:
    """Ground truth: ARPACK ``eigsh(which='LA', tol=1e-10)`` on a float64 product; (values_K desc, vectors_PK)."""
    from scipy.sparse.linalg import LinearOperator, eigsh  # here: the scripts without ARPACK need no scipy

    op = LinearOperator(
        (dim, dim),
        matvec=lambda x: matvec64(torch.from_numpy(np.ascontiguousarray(x).reshape(-1))).numpy(),
        dtype=np.float64,
    )
    v0 = np.random.default_rng(0).standard_normal(dim)
    values, vectors = eigsh(op, k=k, which="LA", tol=1e-10, v0=v0)
    order = np.argsort(values)[::-1]
    return torch.from_numpy(values[order].copy()), torch.from_numpy(vectors[:, order].copy())
