"""The checkpoint's sketch file: a file that cannot be read or does not fit the run is refused by name."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_run_setup import _args, _loader
from trainer_utils import flat_params, run_levy

from hf_levy import LevyArguments
from hf_levy._checkpoint import FIX, load_levy_state, save_levy_state
from hf_levy._run_setup import start_run


def _saved_run(tmp_path):
    """A run over Linear(3, 2) (P = 8) with K = 2 eigenpairs whose state is saved in tmp_path/ckpt."""
    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, lanczos_num_iters=4)
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    A = torch.diag(torch.arange(1.0, 9.0))
    with run.schedule.refreshing():
        run.sketch.refresh(lambda v: A.to(v) @ v, run.space.dim, step=5)
    folder = str(tmp_path / "ckpt")
    save_levy_state(folder, run.state_dict(), {}, sharded=False, rank=0)
    return levy, folder


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"\x00" * 3, lambda b: os.urandom(len(b))],
    ids=["truncated", "empty-header", "garbage"],
)
def test_an_unreadable_state_file_is_named_with_the_fix(tmp_path, damage):
    _, folder = _saved_run(tmp_path)
    path = os.path.join(folder, "levy_state.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + FIX):
        load_levy_state(folder, rank=0)


def _bad(saved, name):
    """One damage per case, applied to a copy of a good state."""
    saved = dict(saved)
    if name == "nan-vectors":
        saved["vectors_KP"] = saved["vectors_KP"].clone()
        saved["vectors_KP"].view(-1)[:4] = float("nan")
    elif name == "inf-eigenvalue":
        saved["values"] = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    elif name == "other-model":
        saved["vectors_KP"] = torch.zeros(2, 9)
    elif name == "other-num-eigenpairs":
        saved["vectors_KP"], saved["values"] = saved["vectors_KP"][:1], saved["values"][:1]
    elif name == "missing-key":
        del saved["schedule_sketch_seconds_total"]
    elif name == "half-calibration":
        saved["calibrated_alpha"] = torch.tensor([1.5, 1.5])
    elif name == "alpha-out-of-range":
        saved["calibrated_alpha"], saved["calibrated_scale"] = torch.tensor([3.0, 1.5]), torch.ones(2)
    return saved


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nan-vectors", "non-finite or non-float entries in 'vectors_KP'"),
        ("inf-eigenvalue", "non-finite or non-float entries in 'values'"),
        ("other-model", r"shape \(2, 9\).*expected \(2, 8\)"),
        ("other-num-eigenpairs", r"shape \(1, 8\).*num_eigenpairs=2"),
        ("missing-key", r"lacks the entries \['schedule_sketch_seconds_total'\]"),
        ("half-calibration", r"lacks the entries \['calibrated_scale'\]"),
        ("alpha-out-of-range", r"calibrated alpha outside \(0, 2\]"),
    ],
)
def test_a_state_that_does_not_fit_the_run_is_refused_by_name(tmp_path, name, message):
    levy, folder = _saved_run(tmp_path)
    path, saved = load_levy_state(folder, rank=0)
    run = start_run(levy, _args(), torch.nn.Linear(3, 2), _loader())
    with pytest.raises(ValueError, match=re.escape(path) + " .*" + message + ".*" + FIX):
        run.load_state_dict(_bad(saved, name), source=path)
    assert run.sketch.vectors_PK is None, "nothing of the refused state was installed"
    run.load_state_dict(saved, source=path)  # the undamaged state fits
    assert run.sketch.step == 5


def test_resuming_from_a_sketch_file_with_nan_vectors_stops_before_any_weight_changes(tmp_path):
    # The reproduction: an intact header and NaN floats among the vectors. The next noise step
    # would write NaN into every weight; the resume must stop at train begin instead, naming the file.
    settings = dict(levy_scale=0.5, sketch_every_n_steps=100, save_strategy="steps", save_steps=3)
    run_levy(tmp_path, name="full", **settings)
    path = str(tmp_path / "full" / "checkpoint-3" / "levy_state.safetensors")
    saved = load_file(path)
    saved["vectors_KP"].view(-1)[:16] = float("nan")
    save_file(saved, path)
    with pytest.raises(ValueError, match=re.escape(path) + ".*delete it to resume with a fresh sketch"):
        run_levy(tmp_path, name="resumed", resume=str(tmp_path / "full" / "checkpoint-3"), **settings)
    os.remove(path)  # the fix the message names
    resumed = run_levy(tmp_path, name="fresh", resume=str(tmp_path / "full" / "checkpoint-3"), **settings)
    assert torch.isfinite(flat_params(resumed)).all()
    assert resumed.levy_callback.run.sketch.step == 3  # a fresh sketch at the resume step


def test_fsdp_ranks_write_their_own_pieces_and_each_reads_back_its_own(tmp_path):
    # Under FSDP every rank writes levy_state_rank{r}; a rank reads its piece before any replicated file.
    folder = str(tmp_path / "ckpt")
    for rank in (0, 1):
        save_levy_state(folder, {"values": torch.full((2,), float(rank))}, {}, sharded=True, rank=rank)
    save_levy_state(folder, {"values": torch.full((2,), 9.0)}, {}, sharded=False, rank=0)
    assert sorted(os.listdir(folder)) == [
        "levy_state.safetensors",
        "levy_state_rank0.safetensors",
        "levy_state_rank1.safetensors",
    ]
    for rank in (0, 1):
        path, saved = load_levy_state(folder, rank=rank)
        assert path.endswith(f"levy_state_rank{rank}.safetensors") and saved["values"].tolist() == [rank] * 2
    path, saved = load_levy_state(folder, rank=2)  # no piece of its own: the replicated file
    assert path.endswith("levy_state.safetensors") and saved["values"].tolist() == [9.0, 9.0]
    assert load_levy_state(str(tmp_path / "empty"), rank=0) is None


def test_saved_tensors_keep_their_dtypes(tmp_path):
    tensors = {"values": torch.tensor([1.0 + 1e-12], dtype=torch.float64), "step": torch.tensor(7)}
    save_levy_state(str(tmp_path), tensors, {}, sharded=False, rank=0)
    _, saved = load_levy_state(str(tmp_path), rank=0)
    assert saved["values"].dtype == torch.float64 and saved["values"].item() == 1.0 + 1e-12
    assert saved["step"].dtype == torch.int64


def test_a_transposed_view_is_saved_as_its_values(tmp_path):
    # save_levy_state takes any tensors (safetensors itself refuses views that are not contiguous).
    matrix = torch.arange(6.0).view(2, 3)
    save_levy_state(str(tmp_path), {"vectors_KP": matrix.T}, {}, sharded=False, rank=0)
    _, saved = load_levy_state(str(tmp_path), rank=0)
    assert torch.equal(saved["vectors_KP"], torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))
