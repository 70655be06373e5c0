"""LevyTrainer through Accelerate's FSDP2 on two GPUs (torchrun): the Trainer + FSDP path.

Accelerate enables FSDP only on GPUs, so on CPU tests/distributed/fsdp_sketch.py drives FSDP2 directly;
this test covers the Trainer path and is skipped without at least two CUDA devices.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).parent / "distributed" / "fsdp_trainer.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="needs CUDA with >= 2 GPUs (Accelerate enables FSDP only on GPUs)",
    ),
]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_trainer")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def test_trainer_runs_under_fsdp_with_sharded_parameters(fsdp_run):
    assert "FSDP" in fsdp_run["distributed_type"]
    assert fsdp_run["params_sharded"]


def test_auto_products_fall_back_to_finite_differences_on_shards(fsdp_run):
    assert fsdp_run["hvp_method"] == "finite_difference"


def test_every_step_gets_noise_and_the_losses_stay_finite(fsdp_run):
    assert fsdp_run["noise_draws"] == 6
    assert fsdp_run["losses_finite"]
    assert fsdp_run["eigenvalues"], "the sketch logged no eigenvalues"


def test_checkpoint_holds_each_ranks_piece_of_the_levy_state(fsdp_run):
    assert fsdp_run["state_files"] == ["levy_state_rank0.safetensors", "levy_state_rank1.safetensors"]
