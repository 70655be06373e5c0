"""The random streams: one generator per stage and step, independent of one another and of the global RNG."""

from __future__ import annotations

import torch

from hf_levy import _rng
from hf_levy._rng import step_generator

STREAMS = {
    name: getattr(_rng, name)
    for name in (
        "NOISE",
        "SKETCH_BATCH",
        "LANCZOS_START",
        "ISOTROPIC",
        "CALIBRATION",
        "TAIL_REFERENCE",
        "TAIL_COORDINATE",
        "TAIL_BOOTSTRAP",
        "NOISE_SCALE_DRAWS",
        "NOISE_SCALE_BOOTSTRAP",
    )
}


def test_the_streams_of_a_training_run_differ_even_with_a_rank_added_to_the_isotropic_one():
    # Single process the isotropic stream is ISOTROPIC itself, under FSDP ISOTROPIC + rank + 1: up to 1024 ranks
    # must not reach another stage of the run. The tail-index command's streams are its own, all distinct.
    run = [_rng.NOISE, _rng.SKETCH_BATCH, _rng.LANCZOS_START, _rng.CALIBRATION]
    assert len(set(run)) == len(run)
    assert not {_rng.ISOTROPIC + r for r in range(1025)} & set(run)
    assert len(set(STREAMS.values())) == len(STREAMS), STREAMS


def test_every_step_of_a_long_run_gets_its_own_stream():
    firsts = {
        torch.rand(1, generator=step_generator(7, step), dtype=torch.float64).item() for step in range(3000)
    }
    assert len(firsts) == 3000


def test_seed_and_step_are_not_interchangeable_nor_summed():
    draw = lambda seed, step: torch.rand(4, generator=step_generator(seed, step))  # noqa: E731
    assert not torch.equal(draw(3, 5), draw(5, 3))
    assert not torch.equal(draw(3, 5), draw(4, 4))
    assert torch.equal(draw(3, 5), draw(3, 5))


def test_any_integer_seed_is_accepted():
    for seed in (-1, 0, 2**32 + 5, 2**40):
        torch.rand(2, generator=step_generator(seed, 0))
    assert step_generator(0, 0).device.type == "cpu"


def test_drawing_from_a_stream_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    torch.randn(5, generator=step_generator(1, 2))
    assert torch.equal(torch.get_rng_state(), state)


def test_seeds_that_differ_only_in_their_high_bits_get_their_own_streams():
    # Seeds are 32-bit here (a seed and seed + 2**32 share a stream); below that every bit counts. Stage offsets
    # and user seeds (e.g. a timestamp) differ in high bits too.
    firsts = {
        torch.rand(1, generator=step_generator(seed, 0), dtype=torch.float64).item()
        for seed in [7 + 2**bit for bit in range(31)] + [7]
    }
    assert len(firsts) == 32


def test_steps_that_differ_only_in_their_high_bits_get_their_own_streams():
    # A run past step 65,536 must not replay the noise of its first steps: every bit of the step (below 2**32,
    # further than any run goes) picks its own stream.
    for step in (0, 5):
        firsts = {
            torch.rand(1, generator=step_generator(7, s), dtype=torch.float64).item()
            for s in [step + 2**bit for bit in range(31)] + [step]
        }
        assert len(firsts) == 32, step
