"""Two-process gloo DDP through the Trainer (torchrun), as `accelerate launch --multi_gpu` runs it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from trainer_utils import run_levy

SCRIPT = pathlib.Path(__file__).parent / "distributed" / "ddp_train.py"
pytestmark = pytest.mark.slow


def torchrun(out: pathlib.Path, *flags: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), "--out", str(out), *flags], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ddp_noise"))


def test_two_ranks_really_ran(noisy):
    assert [r["world_size"] for r in noisy] == [2, 2]
    assert [r["noise_draws"] for r in noisy] == [6, 6]


def test_parameters_and_eigenvectors_are_identical_on_both_ranks(noisy):
    assert torch.equal(noisy[0]["params"], noisy[1]["params"])
    assert torch.equal(noisy[0]["vectors"], noisy[1]["vectors"])


def test_noise_changes_the_ddp_run(noisy, tmp_path):
    quiet = torchrun(tmp_path, "--levy_scale", "0")
    assert torch.equal(quiet[0]["params"], quiet[1]["params"])
    assert not torch.equal(quiet[0]["params"], noisy[0]["params"])


def test_eigenvalues_equal_the_single_process_ones_on_the_same_sketch_batch(noisy, tmp_path):
    single = run_levy(tmp_path, max_steps=1, levy_scale=0.5)
    first = next(h for h in single.state.log_history if "curvature/eigenvalue_0" in h)
    expected = torch.tensor([first["curvature/eigenvalue_0"], first["curvature/eigenvalue_1"]], dtype=torch.float64)
    got = torch.tensor(noisy[0]["first_sketch_values"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_resume_under_ddp_equals_the_uninterrupted_run(noisy, tmp_path):
    full_dir = tmp_path / "full"
    full = torchrun(full_dir, "--save_steps", "3")
    assert torch.equal(full[0]["params"], noisy[0]["params"])  # saving checkpoints changes nothing
    resumed = torchrun(tmp_path / "resumed", "--resume", str(full_dir / "checkpoint-3"))
    assert torch.equal(resumed[0]["params"], full[0]["params"])
    assert torch.equal(resumed[1]["params"], full[1]["params"])
