"""ParameterSpace in one process: flat layout, padding, gradient norm and noise add."""

from __future__ import annotations

import torch
from torch import nn

from hf_levy.params import ParameterSpace, flatten, unflatten


def params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))]


def test_flatten_and_unflatten_round_trip_in_order():
    ps = params()
    flat = flatten(ps)
    assert torch.equal(flat, torch.cat([ps[0].detach().reshape(-1), ps[1].detach()]))
    back = unflatten(flat, ps)
    assert all(torch.equal(b, p.detach()) for b, p in zip(back, ps, strict=True))


def test_single_process_space_has_no_padding_and_an_identity_reduce():
    space = ParameterSpace(params())
    assert (space.dim, space.local_numel, space.sharded) == (10, 10, False)
    v = torch.arange(10.0)
    assert torch.equal(space.pad(v), v) and torch.equal(space.unpad(v), v)
    assert torch.equal(space.reduce(torch.tensor(3.0)), torch.tensor(3.0))


def test_grad_norm_and_add_to_grads():
    ps = params()
    ps[0].grad = torch.full((3, 2), 2.0)  # ps[1] has no grad yet
    space = ParameterSpace(ps)
    assert space.grad_norm() == torch.tensor(24.0).sqrt().item()
    space.add_to_grads(torch.arange(10.0))
    assert torch.equal(ps[0].grad, torch.full((3, 2), 2.0) + torch.arange(6.0).view(3, 2))
    assert torch.equal(ps[1].grad, torch.arange(6.0, 10.0))
