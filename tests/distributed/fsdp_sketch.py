"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: raw FSDP2 (`fully_shard`) on CPU.

Compares, on the same global batch, the sketch computed on sharded parameters (finite-difference
products, sharded Lanczos vectors) with the exact sketch of an unsharded copy, the noise added to
sharded gradients with the unsharded noise of the same step, and the calibration's micro-batch
projections on shards with the unsharded ones. Writes ``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_levy import DoubleBackwardError, make_hvp, trainable_parameters
from hf_levy._rng import step_generator
from hf_levy.calibration import microbatch_projections
from hf_levy.noise import noise_coefficients
from hf_levy.params import ParameterSpace, flatten, unflatten
from hf_levy.sketch import HessianSketch, SketchSettings


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 9)  # 9 rows: sharded 5 + 4, uneven on purpose
        self.out = nn.Linear(9, 3)

    def forward(self, x, y):
        return {"loss": ((self.out(torch.tanh(self.hidden(x))) - y) ** 2).mean()}


def settings() -> SketchSettings:
    return SketchSettings(num_eigenpairs=3, num_iters=40, tol=1e-9, seed=0, vector_dtype=torch.float64)


def full_vectors(space: ParameterSpace, vectors_PK: torch.Tensor) -> torch.Tensor:
    """Assemble the global (P, K) vectors from every rank's padded pieces, in parameter order."""
    columns = []
    for k in range(vectors_PK.shape[1]):
        pieces = unflatten(space.unpad(vectors_PK[:, k]), space.params)
        full = [
            DTensor.from_local(
                piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
            for piece, p in zip(pieces, space.params, strict=True)
        ]
        columns.append(torch.cat([f.reshape(-1) for f in full]))
    return torch.stack(columns, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = Regressor().double()
    g = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "y": torch.randn(8, 3, generator=g, dtype=torch.float64),
    }
    share = {k: v[rank::world] for k, v in batch.items()}  # equal shares, as FSDP's averaging assumes

    sharded = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world,))
    for layer in (sharded.hidden, sharded.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    # The sketch: exact products on the unsharded copy vs finite differences on the shards.
    ref_params = trainable_parameters(reference)
    ref_sketch = HessianSketch(settings())
    ref_sketch.refresh(make_hvp(reference, batch, ref_params), sum(p.numel() for p in ref_params), step=0)

    space = ParameterSpace(trainable_parameters(sharded))
    hvp = make_hvp(sharded, share, space.params, method="finite_difference")
    shard_sketch = HessianSketch(settings())
    shard_sketch.refresh(lambda v: space.pad(hvp(space.unpad(v))), space.dim, step=0, reduce=space.reduce)

    try:
        make_hvp(sharded, share, space.params, method="autograd")
        autograd_refused = False
    except DoubleBackwardError:
        autograd_refused = True

    # The noise: same step, same reference eigenvectors, added to sharded vs unsharded gradients.
    reference(**batch)["loss"].backward()
    sharded(**share)["loss"].backward()
    ref_grad = flatten([p.grad for p in ref_params])
    coef = noise_coefficients(
        torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64),
        1.5,
        step_generator(0, 7),
        clip=10.0,
        max_norm=None,
    ).coef_K
    local_vectors = torch.stack(
        [
            space.pad(flatten([local.to_local() for local in _distribute(space, column)]))
            for column in ref_sketch.vectors_PK.T
        ],
        dim=1,
    )
    grad_norm = space.grad_norm()
    space.add_combination_to_grads(local_vectors, coef)  # the trainer's path: no (P,) vector formed
    noisy = torch.cat([p.grad.full_tensor().reshape(-1) for p in space.params])

    # Calibration: projections of M = 5 micro-batch gradients (4 examples, 2 per rank) on the reference
    # eigenvectors; each rank sees its shard of each gradient and of the vectors, the reduce sums the dots.
    micro = [
        {
            "x": torch.randn(4, 6, generator=g, dtype=torch.float64),
            "y": torch.randn(4, 3, generator=g, dtype=torch.float64),
        }
        for _ in range(5)
    ]
    for p in space.params:
        p.grad = None
    ref_projections = microbatch_projections(reference, micro, ref_params, ref_sketch.vectors_PK).values_MK
    shard_projections = microbatch_projections(
        sharded,
        [{k: v[rank::world] for k, v in mb.items()} for mb in micro],
        space.params,
        space.unpad(local_vectors),
        reduce=space.reduce,
    ).values_MK
    grads_untouched = all(p.grad is None for p in space.params)

    torch.save(
        {
            "world": world,
            "ref_projections": ref_projections,
            "shard_projections": shard_projections,
            "grads_untouched": grads_untouched,
            "autograd_refused": autograd_refused,
            "dim": space.dim,
            "local_numel": space.local_numel,
            "ref_values": ref_sketch.values_K,
            "shard_values": shard_sketch.values_K,
            "ref_vectors": ref_sketch.vectors_PK,
            "shard_vectors": full_vectors(space, shard_sketch.vectors_PK),
            "ref_grad_norm": float(ref_grad.norm()),
            "shard_grad_norm": grad_norm,
            "expected_noisy_grad": ref_grad + ref_sketch.vectors_PK @ coef,
            "noisy_grad": noisy,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _distribute(space: ParameterSpace, flat: torch.Tensor) -> list[DTensor]:
    """Shard a global flat vector like the parameters."""
    from torch.distributed.tensor import distribute_tensor

    numels = [p.numel() for p in space.params]
    pieces = torch.split(flat, numels)
    return [
        distribute_tensor(piece.view(p.shape), p.device_mesh, p.placements)
        for piece, p in zip(pieces, space.params, strict=True)
    ]


if __name__ == "__main__":
    main()
