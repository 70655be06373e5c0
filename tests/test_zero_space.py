"""ZeroSpace and the DeepSpeed seam on stand-ins for DeepSpeed's stage-1/2 fragments (one gloo process).

The stand-ins carry what DeepSpeed gives each parameter at stages 1 and 2: ``_hp_mapping`` with the owned
range of the flattened parameter and its gradient fragment, ``None`` where another rank owns it. Expected
values are written out by hand; tests/test_deepspeed.py runs the real engine on two ranks.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hf_levy._zero_space import (
    ZeroSpace,
    clip_zero_grads,
    install_before_step,
    owned_range,
    uses_deepspeed,
    zero_optimizer_of,
)


class DeepSpeedZeroOptimizer:
    """Named like DeepSpeed's stage-1/2 optimizer; its step records the clipping it would apply."""

    def __init__(self, loss_scale: float = 1.0, clip_grad: float = 0.0):
        self.loss_scale, self.clip_grad, self.partition_gradients = loss_scale, clip_grad, True
        self.overflow = False
        self.seen_clip: list[float] = []

    def step(self):
        self.seen_clip.append(self.clip_grad)
        self._global_grad_norm = -1.0  # what DeepSpeed computes itself


class BF16_Optimizer:  # noqa: N801 (DeepSpeed's name and module)
    __module__ = "deepspeed.runtime.bf16_optimizer"
    optimizer = None


def fragmented(numel: int, start: int, owned: int, grad: list[float] | None) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(numel))
    if grad is None:
        p._hp_mapping = None
        return p
    fragment = torch.tensor(grad, dtype=torch.float32)
    assert fragment.numel() == owned
    p._hp_mapping = SimpleNamespace(
        lp_fragment_address=SimpleNamespace(start=start, numel=owned), get_lp_grad_fragment=lambda i: fragment
    )
    p._index_in_param_group = 0
    p.fragment = fragment
    return p


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def space_of(loss_scale: float = 1.0) -> tuple[ZeroSpace, list[nn.Parameter]]:
    # Parameter sizes 6, 4, 5; this rank owns elements 2..4 of the first, none of the second, 0..1 of the third.
    params = [
        fragmented(6, 2, 3, [1.0, 2.0, 2.0]),
        fragmented(4, 0, 0, None),
        fragmented(5, 0, 2, [4.0, 0.0]),
    ]
    return ZeroSpace(params, DeepSpeedZeroOptimizer(loss_scale)), params


def test_owned_ranges_at_stage_3_are_equal_pieces_with_the_last_one_short():
    p = SimpleNamespace(ds_id=0, ds_tensor=torch.zeros(4), ds_numel=7)
    assert [owned_range(p, rank) for rank in range(3)] == [(0, 4), (4, 3), (8, 0)]


def test_pieces_are_the_owned_ranges_and_round_trip_through_the_full_vector(one_process):
    space, _ = space_of()
    assert (space.local_numel, space.dim, space.full_dim, space.offsets) == (5, 5, 15, [0, 6, 10])
    piece = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    full = torch.zeros(15)
    full[2:5] = torch.tensor([1.0, 2.0, 3.0])
    full[10:12] = torch.tensor([4.0, 5.0])
    assert torch.equal(space.full(piece), full)
    assert torch.equal(space.local(torch.arange(15.0)), torch.tensor([2.0, 3.0, 4.0, 10.0, 11.0]))


def test_gradient_norm_and_noise_are_in_unscaled_units_under_a_loss_scale(one_process):
    space, params = space_of(loss_scale=8.0)
    assert space.grad_norm() == pytest.approx(5.0 / 8.0)  # ‖(1, 2, 2, 4, 0)‖ = 5, stored times 8
    space.add_to_grads(torch.tensor([1.0, 0.0, 0.5, 0.0, -1.0]))
    assert params[0].fragment.tolist() == [9.0, 2.0, 6.0]
    assert params[2].fragment.tolist() == [4.0, -8.0]
    assert params[1].grad is None  # a parameter owned by other ranks is not touched


def test_a_combination_of_vectors_is_added_as_one_vector(one_process):
    space, params = space_of()
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    space.add_combination_to_grads(vectors, torch.tensor([0.5, -1.0]))
    assert params[0].fragment.tolist() == [1.5, 1.0, 1.5]
    assert params[2].fragment.tolist() == [5.0, 0.0]


@pytest.mark.parametrize(
    ("max_norm", "factor"),
    [(0.5, 0.5 / (5.0 + 1e-6)), (10.0, 1.0), (0.0, 1.0)],  # DeepSpeed's clip: 1 / max(1, (‖g‖ + 1e-6) / c)
)
def test_clipping_follows_deepspeeds_formula_and_returns_the_norm_before_it(one_process, max_norm, factor):
    space, params = space_of(loss_scale=2.0)
    for p in (params[0], params[2]):
        p.fragment.mul_(2.0)  # stored times the loss scale: the unscaled norm is 5
    assert clip_zero_grads(space, max_norm) == pytest.approx(5.0)
    assert params[0].fragment.tolist() == pytest.approx([2 * factor, 4 * factor, 4 * factor], rel=1e-6)
    assert space.grad_norm() == pytest.approx(5.0 * factor, rel=1e-6)


def test_a_non_finite_gradient_is_left_for_deepspeed_to_skip(one_process):
    space, params = space_of()
    params[2].fragment[0] = math.inf
    assert clip_zero_grads(space, 0.5) == math.inf
    assert params[0].fragment.tolist() == [1.0, 2.0, 2.0]


def test_the_zero_optimizer_is_found_inside_the_wrappers_and_others_are_refused_by_name():
    zero = DeepSpeedZeroOptimizer()
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=zero))
    assert zero_optimizer_of(wrapped) is zero
    assert uses_deepspeed(SimpleNamespace(optimizer=BF16_Optimizer()))  # found by its module
    assert not uses_deepspeed(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(
        ValueError, match="found SimpleNamespace -> BF16_Optimizer.*BF16_Optimizer.*use stage 2 or 3"
    ):
        zero_optimizer_of(SimpleNamespace(optimizer=BF16_Optimizer()))


def test_the_seam_clips_before_the_step_and_leaves_deepspeeds_setting_as_it_was():
    zero = DeepSpeedZeroOptimizer(clip_grad=0.7)
    calls: list[float] = []
    install_before_step(zero, lambda max_norm: calls.append(max_norm) or 3.0)
    zero.step()
    assert calls == [0.7]  # the hook clips with DeepSpeed's setting...
    assert zero.seen_clip == [0.0]  # ...so DeepSpeed does not clip again, ...
    assert zero.clip_grad == 0.7  # ...and its checkpoints keep the setting
    assert zero._global_grad_norm == 3.0  # the logged norm: before clipping and noise

    install_before_step(zero, lambda max_norm: calls.append(-max_norm) or 4.0)  # a second train()
    zero.overflow = True
    zero.step()
    assert calls == [0.7, -0.7]  # the new hook, once: the step is wrapped once
    assert zero._global_grad_norm == -1.0  # a skipped (overflowed) step keeps DeepSpeed's own norm


def test_calibration_and_exact_products_at_stage_3_are_refused_with_the_setting_named(one_process):
    from hf_levy._run_setup import _check_sharded
    from hf_levy.config import LevyArguments

    space, _ = space_of()
    with pytest.raises(ValueError, match="levy_virtual_batch_size=8.*DeepSpeed.*DDP or FSDP"):
        _check_sharded(LevyArguments(levy_virtual_batch_size=8), 1, space)
    _check_sharded(LevyArguments(hvp_method="autograd"), 1, space)  # stages 1, 2: whole parameters
    space.stage = 3
    with pytest.raises(ValueError, match="hvp_method='autograd'.*DeepSpeed ZeRO-3.*finite_difference"):
        _check_sharded(LevyArguments(hvp_method="autograd"), 1, space)


def test_eigenvectors_are_oriented_so_that_their_entries_sum_above_zero(one_process):
    space, _ = space_of()
    vectors = torch.tensor([[1.0, 3.0], [-2.0, 0.0], [-1.0, -1.0], [0.5, 0.0], [0.0, -1.0]])
    oriented = space.orient_(vectors.clone())
    assert oriented.tolist() == [
        [-1.0, 3.0],
        [2.0, 0.0],
        [1.0, -1.0],
        [-0.5, 0.0],
        [0.0, -1.0],
    ]  # sums -1.5, 1


class DeepSpeedZeroOptimizer_Stage3(DeepSpeedZeroOptimizer):  # noqa: N801 (DeepSpeed's name)
    """Named like DeepSpeed's stage-3 optimizer."""


def test_stage_3_gradients_handed_out_as_copies_are_written_back(one_process, monkeypatch):
    # With offload on a GPU, DeepSpeed's safe_get_local_grad hands out a device copy of the host partition:
    # changes reach the optimizer only through safe_set_local_grad.
    deepspeed_utils = pytest.importorskip("deepspeed.utils")
    stored = {0: torch.tensor([3.0, 4.0, 0.0]), 1: torch.tensor([12.0, 0.0, 0.0])}  # last piece padded
    monkeypatch.setattr(deepspeed_utils, "safe_get_local_grad", lambda p: stored[p.ds_id].clone())
    monkeypatch.setattr(deepspeed_utils, "safe_set_local_grad", lambda p, v: stored[p.ds_id].copy_(v))
    params = [SimpleNamespace(ds_id=i, ds_tensor=torch.zeros(3), ds_numel=n) for i, n in ((0, 3), (1, 2))]
    space = ZeroSpace(params, DeepSpeedZeroOptimizer_Stage3())
    assert (space.stage, space.ranges, space.exact_products) == (3, [(0, 3), (0, 2)], False)
    assert space.grad_norm() == pytest.approx(13.0)
    space.scale_grads(0.5)
    space.add_to_grads(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]))
    assert stored[0].tolist() == [2.5, 3.0, 1.0]
    assert stored[1].tolist() == [7.0, 1.0, 0.0]  # the padding stays zero
