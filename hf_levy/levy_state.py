"""The sketch's file inside a Trainer checkpoint: ``levy_state.safetensors``.

Replicated parameters (single process, DDP) give every rank the same vectors, so the main process writes
one file; under FSDP each rank holds its piece of the vectors and writes ``levy_state_rank{r}.safetensors``.
"""

from __future__ import annotations

import os

from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_FILE = "levy_state.safetensors"
SHARDED_STATE_FILE = "levy_state_rank{rank}.safetensors"


def state_file(checkpoint_dir: str, *, sharded: bool, rank: int) -> str:
    name = SHARDED_STATE_FILE.format(rank=rank) if sharded else STATE_FILE
    return os.path.join(checkpoint_dir, name)


def save_levy_state(
    checkpoint_dir: str, tensors: dict[str, Tensor], metadata: dict[str, str], *, sharded: bool, rank: int
) -> None:
    """Write ``tensors`` (moved to host memory, contiguous) with string ``metadata`` into the checkpoint."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(host, state_file(checkpoint_dir, sharded=sharded, rank=rank), metadata=metadata)


def load_levy_state(checkpoint_dir: str, *, rank: int) -> dict[str, Tensor] | None:
    """This rank's saved sketch (its own FSDP piece first, else the replicated file); None when absent."""
    for sharded in (True, False):
        path = state_file(checkpoint_dir, sharded=sharded, rank=rank)
        if os.path.isfile(path):
            return load_file(path)
    return None
