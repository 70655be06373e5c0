"""The sketch's file inside a Trainer checkpoint: ``levy_state.safetensors``.

Replicated parameters (single process, DDP) give every rank the same vectors, so the main process writes
one file; under FSDP each rank holds its piece of the vectors and writes ``levy_state_rank{r}.safetensors``.

A file that cannot be read, or whose contents do not fit the run, is refused with an error that names it:
its vectors would otherwise reach the gradients (a NaN among them turns every weight into NaN).
"""

from __future__ import annotations

import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_FILE = "levy_state.safetensors"
SHARDED_STATE_FILE = "levy_state_rank{rank}.safetensors"
FIX = "delete it to resume with a fresh sketch"


def state_file(checkpoint_dir: str, *, sharded: bool, rank: int) -> str:
    """The sketch file in ``checkpoint_dir``: this rank's piece when ``sharded``, else the replicated one."""
    name = SHARDED_STATE_FILE.format(rank=rank) if sharded else STATE_FILE
    return os.path.join(checkpoint_dir, name)


def save_levy_state(
    checkpoint_dir: str, tensors: dict[str, Tensor], metadata: dict[str, str], *, sharded: bool, rank: int
) -> None:
    """Write ``tensors`` (moved to host memory, contiguous) with string ``metadata`` into the checkpoint."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(host, state_file(checkpoint_dir, sharded=sharded, rank=rank), metadata=metadata)


def load_levy_state(checkpoint_dir: str, *, rank: int) -> tuple[str, dict[str, Tensor]] | None:
    """This rank's saved sketch and its path; None when absent.

    The rank's own FSDP piece is read if there is one, else the replicated file.

    Raises:
        ValueError: naming the file and the fix, when it is not a readable safetensors file (truncated,
            overwritten, empty).
    """
    for sharded in (True, False):
        path = state_file(checkpoint_dir, sharded=sharded, rank=rank)
        if os.path.isfile(path):
            try:
                return path, load_file(path)
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{path} is not a readable safetensors file ({err}); {FIX}") from err
    return None
