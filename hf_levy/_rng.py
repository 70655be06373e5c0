"""The random streams of hf_levy: every random stage draws from its own CPU generator, never the global RNG.

A stage's generator at optimizer step s is ``step_generator(levy_seed + STREAM, s)``: it depends only on the
seed, the stage and the step, so every data-parallel rank draws the same values without communication and a
resumed run redraws exactly those of the uninterrupted one without saving RNG state. The offsets keep the
stages independent of one another (the noise draws use the seed itself).
"""

from __future__ import annotations

import numpy as np
import torch

NOISE = 0  # the α-stable draws z of the noise
SKETCH_BATCH = 0xBA7C  # which training examples form the sketch batch
LANCZOS_START = 0x5EED  # the random part of the Lanczos start vector
ISOTROPIC = 0x150  # the coordinates of the isotropic ablation (+ rank + 1 under FSDP)
CALIBRATION = 0xCA1  # the micro-batches of the virtual-batch calibration
MINIBATCH = 0x5B5  # which examples of a step's batch form the sub-batch of the 'minibatch' noise
# hf_levy.gradient_noise_scale: the examples of each pair of batches, the bootstrap resamples of the pairs
NOISE_SCALE_DRAWS, NOISE_SCALE_BOOTSTRAP = 0x6A5, 0x6A6
# hf-levy tail-index: mini-batches of size b use (seed, b); these streams the rest
TAIL_REFERENCE, TAIL_COORDINATE, TAIL_BOOTSTRAP = 0x4EF, 0xC00D, 0xB007


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, step), well mixed by NumPy's SeedSequence."""
    mixed = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF]).generate_state(
        2, np.uint32
    )
    return torch.Generator().manual_seed(int(mixed[0]) << 31 ^ int(mixed[1]))
