"""ParameterSpace in one process: flat layout, padding, gradient norm and noise add."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_levy.params import ParameterSpace, flatten, trainable_parameters, unflatten


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


def _orthonormal_columns(rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    return q.to(dtype)


def test_add_combination_to_grads_equals_the_explicit_sum_in_float64():
    # Three parameters (one without a grad, one with a non-contiguous grad), K = 3, vectors in the K-row
    # layout that lanczos returns (a transposed view), plus a float64 truth computed column by column.
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 3))]
    ps[0].grad = torch.randn(3, 4)
    ps[2].grad = torch.randn(3, 2).T  # non-contiguous
    before = [torch.zeros(3, 4).double() + ps[0].grad.double(), torch.zeros(5).double(), ps[2].grad.double()]
    vectors_PK = _orthonormal_columns(23, 3).T.contiguous().T
    coef = torch.tensor([0.5, -2.0, 1.25], dtype=torch.float64)
    truth = sum(c * vectors_PK[:, k].double() for k, c in enumerate(coef))
    ParameterSpace(ps).add_combination_to_grads(vectors_PK, coef)
    got = torch.cat([(p.grad.double() - b).reshape(-1) for p, b in zip(ps, before, strict=True)])
    torch.testing.assert_close(got, truth, rtol=1e-6, atol=1e-6)


def test_add_combination_to_grads_with_bfloat16_vectors_casts_into_the_float32_grad():
    ps = params()
    vectors_PK = _orthonormal_columns(10, 2, torch.bfloat16)
    coef = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ParameterSpace(ps).add_combination_to_grads(vectors_PK, coef)
    truth = vectors_PK.double() @ coef
    assert all(p.grad.dtype == torch.float32 for p in ps)
    got = torch.cat([p.grad.reshape(-1) for p in ps]).double()
    torch.testing.assert_close(got, truth, rtol=1e-2, atol=1e-2)


def test_flatten_casts_to_the_requested_dtype_and_otherwise_keeps_the_tensors_dtype():
    ps = params()
    wide = flatten(ps, dtype=torch.float64)
    assert wide.dtype == torch.float64
    assert torch.equal(wide, torch.cat([p.detach().double().reshape(-1) for p in ps]))
    assert flatten(ps).dtype == torch.float32
    half = [torch.ones(2, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)]
    assert flatten(half).dtype == torch.bfloat16 and flatten(half, dtype=torch.float32).dtype == torch.float32


def test_trainable_parameters_are_the_requires_grad_ones_in_module_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 2))
    model[1].requires_grad_(False)
    expected = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    got = trainable_parameters(model)
    assert len(got) == 4 and all(a is b for a, b in zip(got, expected, strict=True))


def test_unflatten_rejects_a_vector_of_the_wrong_length_naming_the_expected_one():
    with pytest.raises(ValueError, match="length 10"):
        unflatten(torch.zeros(9), params())
    with pytest.raises(ValueError, match="length 10"):
        unflatten(torch.zeros(11), params())


def test_grad_norm_is_the_euclidean_norm_of_all_gradients_together():
    ps = params()
    ps[0].grad = torch.tensor([[3.0, -4.0], [0.0, 0.0], [1.0, 0.0]])
    ps[1].grad = torch.tensor([0.0, -2.0, 0.0, 0.0])
    assert ParameterSpace(ps).grad_norm() == pytest.approx(
        30**0.5, rel=1e-6
    )  # sqrt(9 + 16 + 1 + 4), float32 norms
    assert ParameterSpace(params()).grad_norm() == 0.0  # no gradients yet


def test_add_combination_to_grads_with_bfloat16_grads_adds_in_their_dtype():
    # Vectors and gradients in bfloat16 (a bf16 model): the sum lands in the bf16 grads, to bf16 rounding.
    ps = [
        nn.Parameter(torch.zeros(6, dtype=torch.bfloat16)),
        nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)),
    ]
    for p in ps:
        p.grad = torch.ones_like(p)
    vectors_PK = _orthonormal_columns(10, 2, torch.bfloat16)
    coef = torch.tensor([2.0, -1.0], dtype=torch.float64)
    ParameterSpace(ps).add_combination_to_grads(vectors_PK, coef)
    got = torch.cat([p.grad.reshape(-1) for p in ps]).double()
    truth = 1.0 + vectors_PK.double() @ coef
    assert all(p.grad.dtype == torch.bfloat16 for p in ps)
    torch.testing.assert_close(got, truth, rtol=0, atol=2e-2)
