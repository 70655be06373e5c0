"""LevyRun: what one training run holds, built and checked at train begin."""

from __future__ import annotations

import torch


def test_examples_per_batch_prefers_the_prepared_loader_and_falls_back_to_the_arguments():
    from types import SimpleNamespace

    from hf_levy.run_state import examples_per_batch

    args = SimpleNamespace(per_device_train_batch_size=8, world_size=2)
    # Accelerate's loader knows the batch actually used (auto_find_batch_size may have halved it).
    assert examples_per_batch(SimpleNamespace(total_batch_size=4), args) == 4
    assert examples_per_batch(torch.utils.data.DataLoader(range(10), batch_size=3), args) == 16
    assert examples_per_batch(SimpleNamespace(total_batch_size=None), args) == 16


def _loader(n=16, batch=4):
    from types import SimpleNamespace

    dataset = [{"x": torch.tensor([float(i)])} for i in range(n)]
    return SimpleNamespace(dataset=dataset, collate_fn=lambda rows: rows, total_batch_size=batch)


def _args(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(
        seed=3, gradient_accumulation_steps=1, per_device_train_batch_size=4, world_size=1, **kw
    )


def test_start_run_checks_the_setup_with_messages_that_name_the_fix():
    import pytest

    from hf_levy import LevyArguments
    from hf_levy.run_state import start_run

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sketch_batch_size=32 exceeds the 16 training examples"):
        start_run(LevyArguments(), _args(), model, _loader())
    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        start_run(LevyArguments(sketch_batch_size=4), _args(), frozen, _loader())
    with pytest.raises(
        ValueError, match="levy_virtual_batch_size=4 must be smaller than the physical batch size 4"
    ):
        start_run(LevyArguments(sketch_batch_size=4, levy_virtual_batch_size=4), _args(), model, _loader())
    run = start_run(LevyArguments(sketch_batch_size=4, levy_seed=None), _args(), model, _loader())
    assert run.seed == 3 and run.physical_batch_size == 4 and run.space.dim == 8
    assert (
        start_run(LevyArguments(sketch_batch_size=4), _args(), model, _loader(batch=16)).physical_batch_size
        is None
    )


def test_run_state_round_trips_the_sketch_schedule_and_calibration():
    from hf_levy import LevyArguments
    from hf_levy.calibration import DirectionalNoise
    from hf_levy.run_state import start_run

    levy = LevyArguments(sketch_batch_size=4, num_eigenpairs=2, lanczos_num_iters=4)
    model = torch.nn.Linear(3, 2)
    run = start_run(levy, _args(), model, _loader())
    A = torch.diag(torch.arange(1.0, 9.0))
    run.sketch.refresh(lambda v: A.to(v) @ v, run.space.dim, step=5)
    with run.schedule.refreshing():
        pass
    run.calibration = DirectionalNoise(torch.tensor([1.5, 2.0]), torch.tensor([0.1, 0.2]))
    restored = start_run(levy, _args(), model, _loader())
    restored.load_state_dict(run.state_dict())
    assert restored.sketch.step == 5 and torch.equal(restored.sketch.values_K, run.sketch.values_K)
    assert torch.equal(restored.sketch.vectors_PK, run.sketch.vectors_PK)
    assert torch.equal(restored.calibration.scale_K, run.calibration.scale_K)
    assert restored.schedule.total_seconds == run.schedule.total_seconds
