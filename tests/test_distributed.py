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


def torchrun(
    out: pathlib.Path, *flags: str, script: pathlib.Path = SCRIPT, env: dict[str, str] | None = None
) -> list[dict]:
    return torchrun_many([(out, flags)], script=script, env=env)[0]


def torchrun_many(
    runs: list[tuple[pathlib.Path, tuple[str, ...]]],
    script: pathlib.Path = SCRIPT,
    env: dict[str, str] | None = None,
) -> list[list[dict]]:
    """Train ``runs`` (output folder, flags) one after the other in one 2-process launch; each run's ranks."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(pathlib.Path(__file__).parents[1]),
        **(env or {}),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    arguments = [arg for out, flags in runs for arg in ("::", "--out", str(out), *flags)][1:]
    for _attempt in range(2):
        result = subprocess.run(
            [*command, str(script), *arguments],
            env=env,
            capture_output=True,
            text=True,
            timeout=300 * len(runs),
        )
        # Seen once (a full-suite run, 2026-11-27): a rank aborting with this C++ message (a thread torn down at
        # exit), not reproduced in 6 reruns of that test. Only that abort is retried, once; other failures fail.
        if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-4000:]
    return [[torch.load(out / f"rank{r}.pt") for r in range(2)] for out, _ in runs]


# The DDP runs of this module, trained in one launch (each launch costs every rank its imports): the noisy run,
# levy_scale 0, the noisy run saving at step 3 and its resume from there, calibration on one step, and last
# the uneven fake clock, which replaces the schedule's clock for the rest of that process.
DDP_RUNS = {
    "noisy": (),
    "quiet": ("--levy_scale", "0"),
    "full": ("--save_steps", "3"),
    "resumed": ("--resume", "{full}/checkpoint-3"),
    "calibrated": ("--levy_virtual_batch_size", "2", "--max_steps", "1"),
    "uneven_clock": ("--uneven_fake_clock", "--max_steps", "12"),
}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("ddp")
    runs = [
        (folder / name, tuple(flag.format(full=folder / "full") for flag in flags))
        for name, flags in DDP_RUNS.items()
    ]
    return dict(zip(DDP_RUNS, torchrun_many(runs), strict=True))


@pytest.fixture(scope="module")
def noisy(ddp):
    return ddp["noisy"]


def test_two_ranks_really_ran(noisy):
    assert [r["world_size"] for r in noisy] == [2, 2]
    assert [r["noise_draws"] for r in noisy] == [6, 6]


def test_parameters_and_eigenvectors_are_identical_on_both_ranks(noisy):
    assert torch.equal(noisy[0]["params"], noisy[1]["params"])
    assert torch.equal(noisy[0]["vectors"], noisy[1]["vectors"])


def test_noise_changes_the_ddp_run(noisy, ddp):
    quiet = ddp["quiet"]
    assert torch.equal(quiet[0]["params"], quiet[1]["params"])
    assert not torch.equal(quiet[0]["params"], noisy[0]["params"])


def test_eigenvalues_equal_the_single_process_ones_on_the_same_sketch_batch(noisy, tmp_path):
    single = run_levy(tmp_path, max_steps=1, logging_steps=1, levy_scale=0.5)
    first = next(h for h in single.state.log_history if "curvature/eigenvalue_0" in h)
    expected = torch.tensor(
        [first["curvature/eigenvalue_0"], first["curvature/eigenvalue_1"]], dtype=torch.float64
    )
    got = torch.tensor(noisy[0]["first_sketch_values"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_resume_under_ddp_equals_the_uninterrupted_run(noisy, ddp):
    full, resumed = ddp["full"], ddp["resumed"]
    assert torch.equal(full[0]["params"], noisy[0]["params"])  # saving checkpoints changes nothing
    assert torch.equal(resumed[0]["params"], full[0]["params"])
    assert torch.equal(resumed[1]["params"], full[1]["params"])


def test_sketch_time_budget_is_decided_once_for_all_ranks(ddp):
    # Uneven fake step times (1 s on rank 0, 4 s on rank 1): each rank alone would defer the second refresh
    # differently (to step 40 vs 10) and their collectives would part; rank 0's decision holds for both.
    ranks = ddp["uneven_clock"]
    assert [r["refreshed"] for r in ranks] == [[0], [0]]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_calibration_under_ddp_gathers_the_single_process_table(ddp, tmp_path):
    # Each rank projects 16 of the 32 micro-batch gradients; the gathered table must give the fit of one
    # process that computed all 32 on the same step-0 eigenvectors. Those agree to rounding (tables within
    # 1e-7, α̂ within 4e-5 measured); one rank's rows missing (zeros) or repeated move α̂_0 by 0.13 here.
    ranks = ddp["calibrated"]
    single = run_levy(
        tmp_path,
        max_steps=1,
        logging_steps=1,
        levy_scale=0.5,
        levy_virtual_batch_size=2,
        calibration_num_microbatches=32,
    )
    first = next(h for h in single.state.log_history if "levy/fitted_alpha_0" in h)
    expected = [first[f"levy/fitted_alpha_{i}"] for i in range(2)]
    for r in ranks:
        (got,) = r["first_fitted_alpha"]
        assert got == pytest.approx(expected, rel=1e-3)
        # the gathered gradient sums give the single-process variance share
        assert r["first_variance_share"] == [pytest.approx(first["levy/noise_variance_share"], rel=1e-5)]
        assert r["physical_batch_size"] == 4 * 2 * 2  # per device x accumulation x ranks, of 64 examples
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


FSDP_SCRIPT = pathlib.Path(__file__).parent / "distributed" / "fsdp_sketch.py"


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("fsdp"), script=FSDP_SCRIPT)


def test_fsdp_shards_are_uneven_and_padded_to_a_common_length(fsdp):
    assert [r["world"] for r in fsdp] == [2, 2]
    assert fsdp[0]["local_numel"] != fsdp[1]["local_numel"]
    assert fsdp[0]["dim"] == fsdp[1]["dim"] == max(r["local_numel"] for r in fsdp)


def test_fsdp_refuses_exact_products_with_a_clear_error(fsdp):
    assert all(r["autograd_refused"] for r in fsdp)


def test_fsdp_sketch_eigenvalues_equal_the_unsharded_ones(fsdp):
    for r in fsdp:
        torch.testing.assert_close(r["shard_values"], r["ref_values"], rtol=1e-6, atol=0)


def test_fsdp_sketch_vectors_assembled_from_shards_match_the_unsharded_ones(fsdp):
    for r in fsdp:
        alignment = (r["ref_vectors"].T @ r["shard_vectors"]).diag().abs()
        assert (alignment > 1 - 1e-6).all(), alignment


def test_fsdp_noise_assembled_from_shards_equals_the_unsharded_noise(fsdp):
    for r in fsdp:
        assert r["shard_grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-12)
        torch.testing.assert_close(r["noisy_grad"], r["expected_noisy_grad"], rtol=1e-10, atol=1e-12)


def test_fsdp_calibration_projections_from_shards_equal_the_unsharded_ones(fsdp):
    for r in fsdp:
        assert r["ref_projections"].shape == (5, 3)
        torch.testing.assert_close(r["shard_projections"], r["ref_projections"], rtol=1e-10, atol=1e-12)
        assert r["grads_untouched"]
