"""The sketch's product inside a run: its batch (one seeded draw shared by the ranks) and its precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_levy._run_hvp
from hf_levy import _rng
from hf_levy._rng import step_generator
from hf_levy._run_hvp import count_examples, full_precision_forward, sketch_batch, sketch_matvec
from hf_levy.params import ParameterSpace

DATASET = [{"x": torch.tensor([float(i)])} for i in range(40)]


def ids(batch):
    return [int(row["x"]) for row in batch]


def test_the_sketch_batch_is_the_seeded_permutation_of_its_step():
    batch = sketch_batch(DATASET, list, 12, seed=5, step=3)
    want = torch.randperm(40, generator=step_generator(5 + _rng.SKETCH_BATCH, 3))[:12].tolist()
    assert ids(batch) == want and len(set(ids(batch))) == 12
    assert ids(sketch_batch(DATASET, list, 12, seed=5, step=3)) == want
    assert ids(sketch_batch(DATASET, list, 12, seed=5, step=4)) != want


def test_ranks_take_disjoint_shares_that_make_up_the_whole_sketch_batch(monkeypatch):
    whole = ids(sketch_batch(DATASET, list, 12, seed=5, step=3))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(hf_levy._run_hvp, "rank_and_world", lambda r=rank: (r, 3))
        shares.append(ids(sketch_batch(DATASET, list, 12, seed=5, step=3)))
    assert [len(s) for s in shares] == [4, 4, 4]
    assert sorted(sum(shares, [])) == sorted(whole)
    assert shares[0] == whole[0::3]


def test_count_examples_reads_the_batch_dimension_of_the_first_batched_tensor():
    assert count_examples({"n": 3, "scale": torch.tensor(2.0), "ids": torch.zeros(5, 7)}) == 5
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        count_examples({"scale": torch.tensor(2.0)})


class Quadratic(nn.Module):
    """loss = ½ wᵀAw, whose Hessian is A; ``forward`` can be wrapped the way Accelerate wraps it for autocast."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def forward(self, x):
        return {"loss": 0.5 * self.w @ self.A @ self.w + 0 * x.sum()}


def wrap_forward(model, factor):
    """Mimic Accelerate: keep the plain forward as _original_forward, install a wrapper as the instance's forward.
    The wrapper scales the loss by ``factor`` so that using it shows in the product."""
    original = model.forward
    model._original_forward = original
    model.forward = lambda *a, **k: {"loss": factor * original(*a, **k)["loss"]}


def test_full_precision_forward_swaps_the_wrapper_out_for_the_block_and_back():
    model = Quadratic()
    wrap_forward(model, 10.0)
    wrapped = model.forward
    with full_precision_forward(model):
        assert model.forward == model._original_forward
    assert model.forward is wrapped
    with pytest.raises(RuntimeError), full_precision_forward(model):
        raise RuntimeError("a failing product")
    assert model.forward is wrapped  # put back even when the block raises


def test_finite_difference_products_bypass_the_autocast_wrapper():
    # The wrapper (autocast in training) must not touch the central difference: H v is A v, not 10 A v.
    model = Quadratic()
    wrap_forward(model, 10.0)
    params = [model.w]
    v = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    hvp = sketch_matvec(model, {"x": torch.ones(2)}, params, ParameterSpace(params), "finite_difference")
    torch.testing.assert_close(hvp(v), model.A @ v, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and training goes on through the wrapper
        assert model.forward(torch.ones(2))["loss"].item() == pytest.approx(
            5 * float(model.w @ model.A @ model.w)
        )
