"""gradient_noise_scale on a float64 linear regression small enough to enumerate its per-example gradients.

Imported by tests/test_noise_scale.py (one process) and run there under `torchrun --nproc_per_node 2` (gloo):
``--out DIR`` writes ``rank{r}.pt`` with the estimates of :data:`CASES` (the model wrapped in DDP for the
last one), each batch split across the ranks, and those of a copy sharded by FSDP2 (``fully_shard``: its three
weights split 2 + 1 over the ranks). It also runs the Trainer's measurement, :meth:`hf_levy._run.LevyRun.measure_noise_scale`,
on a step whose batch is the first three examples on rank 0 and the next three on rank 1 (:data:`STEP_ROWS`), for
:data:`MEASURED_STEPS` steps, replicated and FSDP-sharded, and keeps the smoother's state.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_levy.noise_scale import gradient_noise_scale

NUM_EXAMPLES, DIM = 20, 3
STEP_ROWS, MEASURED_STEPS, NOISE_BATCH = 3, 4, 2  # each rank's micro-batch of the step; steps; b
# (small, big, draws, seed): 3 of 8 splits unevenly over two ranks; with 1 the second rank has no small share.
CASES = [(3, 8, 12, 0), (1, 5, 12, 1), (2, 6, 12, 2)]


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, DIM) and targets (N,), float64, with noise: a linear model that cannot fit every example."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, DIM, generator=generator, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = x @ w_true + 0.8 * torch.randn(NUM_EXAMPLES, generator=generator, dtype=torch.float64)
    return x, y


class Regression(torch.nn.Module):
    """Mean squared error of a linear model, ℓ_i(w) = (x_i·w − y_i)², so g_i = 2(x_i·w − y_i) x_i."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.2, -1.0, 1.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((x @ self.w - labels) ** 2).mean()}


def dataset() -> list[dict[str, torch.Tensor]]:
    x, y = regression_data()
    return [{"x": x[i], "labels": y[i]} for i in range(NUM_EXAMPLES)]


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def estimate(model: torch.nn.Module, small: int, big: int, draws: int, seed: int):
    return gradient_noise_scale(
        model,
        dataset(),
        collate_fn=collate,
        small_batch_size=small,
        big_batch_size=big,
        num_draws=draws,
        seed=seed,
        num_bootstrap=200,
    )


def trainer_measurement(model: torch.nn.Module) -> dict[str, float]:
    """The smoother's state after :data:`MEASURED_STEPS` measurements of the same step (other draws), each rank
    holding its rows of the step's batch, ``.grad`` the batch's mean gradient, as after the Trainer's backward."""
    from hf_levy._run import LevyRun
    from hf_levy.config import LevyArguments
    from hf_levy.noise_scale import NoiseScaleSmoother
    from hf_levy.params import ParameterSpace, is_sharded, trainable_parameters

    rank, world = dist.get_rank(), dist.get_world_size()
    data = dataset()
    batch = collate(data[rank * STEP_ROWS : (rank + 1) * STEP_ROWS])
    params = trainable_parameters(model)
    model(**batch)["loss"].backward()  # FSDP averages the ranks' gradients; replicated, average them here
    if not any(is_sharded(p) for p in params):
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
    run = LevyRun(  # no sketch: the measurement reads none
        levy=LevyArguments(levy_noise_batch_size=NOISE_BATCH, gradient_noise_scale_every_n_steps=1),
        model=model,
        space=ParameterSpace(params),
        sketch=None,
        schedule=None,
        seed=0,
        dataset=data,
        collate_fn=None,
        physical_batch_size=None,
        step_batches=[batch],
        noise_scale=NoiseScaleSmoother(),
    )
    for step in range(MEASURED_STEPS):
        assert run.measure_noise_scale(step)
    return run.noise_scale.state_dict()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = Regression()
    results = [estimate(model, *case) for case in CASES[:-1]]
    results.append(estimate(torch.nn.parallel.DistributedDataParallel(model), *CASES[-1]))
    sharded = fully_shard(Regression(), mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    fsdp = [estimate(sharded, *case) for case in CASES]
    measured = {"replicated": trainer_measurement(Regression())}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    measured["fsdp"] = trainer_measurement(fully_shard(Regression(), mesh=mesh))
    torch.save(
        {
            "world_size": dist.get_world_size(),
            "estimates": [r.__dict__ for r in results],
            "fsdp_estimates": [r.__dict__ for r in fsdp],
            "trainer_measurement": measured,
        },
        os.path.join(cli.out, f"rank{dist.get_rank()}.pt"),
    )
    dist.destroy_process_group()
    os._exit(0)  # leave before interpreter teardown (a gloo rank once aborted there)


if __name__ == "__main__":
    main(sys.argv[1:])
