"""A run's state inside a Trainer checkpoint: the file ``levy_state.safetensors``, and whether it fits the run.

Replicated parameters (single process, DDP) give every rank the same vectors, so the main process writes
one file; under FSDP each rank holds its piece of the vectors and writes ``levy_state_rank{r}.safetensors``.

A file that cannot be read, or whose contents do not fit the run, is refused with an error that names it:
its vectors would otherwise reach the gradients (a NaN among them turns every weight into NaN).
"""

from __future__ import annotations

import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hf_levy._noise_tally import NoiseTally
from hf_levy._schedule import STATE_KEYS as SCHEDULE_KEYS

STATE_FILE = "levy_state.safetensors"
SHARDED_STATE_FILE = "levy_state_rank{rank}.safetensors"
FIX = "delete it to resume with a fresh sketch"
NOISE_TOTAL = "noise_total"  # the entry of the whole run's NoiseTally
NOISE_SCALE = "noise_scale"  # and of the gradient noise scale's moving averages, in SMOOTHER_KEYS order
SMOOTHER_KEYS = ("beta", "steps", "square_norm_ema", "trace_ema")


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


def saved_state_problem(saved: dict[str, Tensor], dim: int, num_eigenpairs: int) -> str | None:
    """What makes a checkpoint's state unusable for a run, or None when it fits.

    The run sketches ``num_eigenpairs`` eigenpairs over ``dim`` parameters; the answer is a phrase to follow
    the file's name.
    """
    sketch_keys = {"values", "vectors_KP", "step"}
    required = set(SCHEDULE_KEYS) | (
        sketch_keys if sketch_keys & saved.keys() or "attempted" in saved else set()
    )
    missing = sorted(required - saved.keys())
    if missing or ("calibrated_alpha" in saved) != ("calibrated_scale" in saved):
        absent = missing or [k for k in ("calibrated_alpha", "calibrated_scale") if k not in saved]
        return f"lacks the entries {absent}"
    tally = saved.get(NOISE_TOTAL)
    if tally is not None and not (
        tally.shape == NoiseTally().state_tensor().shape
        and torch.isfinite(tally).all()
        and (tally >= 0).all()
    ):
        return f"holds a '{NOISE_TOTAL}' entry that is not {NoiseTally().state_tensor().numel()} finite counts >= 0"
    smoother = saved.get(NOISE_SCALE)
    if smoother is not None and not (
        smoother.shape == (len(SMOOTHER_KEYS),)
        and torch.isfinite(smoother).all()
        and 0 <= float(smoother[0]) < 1
        and float(smoother[1]) >= 0
    ):
        return (
            f"holds a '{NOISE_SCALE}' entry that is not {SMOOTHER_KEYS} (finite, 0 <= beta < 1, steps >= 0)"
        )
    if "vectors_KP" not in saved:
        return _schedule_problem(saved, ("calibrated_alpha" in saved))
    vectors, values = saved["vectors_KP"], saved["values"]
    if vectors.shape != (num_eigenpairs, dim) or values.shape != (num_eigenpairs,):
        return (
            f"holds eigenvectors of shape {tuple(vectors.shape)} and eigenvalues of shape "
            f"{tuple(values.shape)}, but this run sketches num_eigenpairs={num_eigenpairs} directions over "
            f"{dim} trainable parameters (expected ({num_eigenpairs}, {dim}) and ({num_eigenpairs},): another "
            "model, adapter or num_eigenpairs)"
        )
    calibrated = [saved[k] for k in ("calibrated_alpha", "calibrated_scale") if k in saved]
    for name in ("values", "vectors_KP", "calibrated_alpha", "calibrated_scale"):
        tensor = saved.get(name)
        if tensor is not None and not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            return f"has non-finite or non-float entries in '{name}'"
    if calibrated and any(t.shape != (num_eigenpairs,) for t in calibrated):
        return f"holds calibration entries whose shape is not ({num_eigenpairs},)"
    if calibrated and not (((calibrated[0] > 0) & (calibrated[0] <= 2)).all() and (calibrated[1] >= 0).all()):
        return "holds a calibrated alpha outside (0, 2] or a negative calibrated scale"
    if saved["step"].numel() != 1 or int(saved["step"]) < 0:
        return "holds no valid sketch step or schedule"
    return _schedule_problem(saved, False)


def _schedule_problem(saved: dict[str, Tensor], calibrated_without_sketch: bool) -> str | None:
    if calibrated_without_sketch:
        return "holds a calibration without the sketch it was fitted on"
    if any(saved[k].numel() != 1 for k in SCHEDULE_KEYS):
        return "holds no valid sketch step or schedule"
    total, refresh = (float(saved[k]) for k in SCHEDULE_KEYS[:2])  # refresh is NaN before a first refresh
    if not (math.isfinite(total) and total >= 0 and not math.isinf(refresh)):
        return "holds non-finite sketch seconds"
    return None
