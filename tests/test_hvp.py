"""make_hvp against a dense Hessian computed a second way (torch.func reverse-over-reverse), and
loss_gradient against torch.func.grad."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from hf_levy import DoubleBackwardError, make_hvp, trainable_parameters
from hf_levy.hvp import finite_difference_step, loss_gradient


class TinyMLP(nn.Module):
    """A regression MLP with dropout, so eval-mode products and mode restoration are visible."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3))

    def forward(self, x, y):
        pred = self.net(x)
        return {"loss": ((pred - y) ** 2).mean()}


def dense_hessian(model, batch, params, loss_of_output=lambda out: out["loss"]):
    """∇²L as a (P, P) matrix via torch.func, on flat parameters, with the model in eval mode."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not any(p is q for q in params)}

    def loss(flat):
        chunks = [c.view(s) for c, s in zip(torch.split(flat, numels), shapes, strict=True)]
        out = functional_call(model, {**fixed, **dict(zip(names, chunks, strict=True))}, kwargs=batch)
        return loss_of_output(out)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    was_training = model.training
    model.eval()
    try:
        return (
            jacrev(jacrev(loss))(flat)
            if model.__class__.__name__.startswith("Llama")
            else hessian(loss)(flat)
        )
    finally:
        model.train(was_training)


def mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = TinyMLP().to(dtype)
    batch = {"x": torch.randn(11, 5, dtype=dtype), "y": torch.randn(11, 3, dtype=dtype)}
    return model, batch, trainable_parameters(model)


def columns(matvec, dim, count, dtype):
    """The first ``count`` columns of the operator, H e_i, as a (dim, count) matrix."""
    eye = torch.eye(dim, dtype=dtype)
    return torch.stack([matvec(eye[i]) for i in range(count)], dim=1)


def test_autograd_hvp_matches_dense_hessian_on_mlp():
    model, batch, params = mlp_problem()
    H = dense_hessian(model, batch, params)
    hvp = make_hvp(model, batch, params)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(columns(hvp, H.shape[0], H.shape[0], torch.float64), H, rtol=1e-10, atol=1e-12)


def test_autograd_hvp_without_graph_reuse_matches_dense_hessian():
    model, batch, params = mlp_problem()
    H = dense_hessian(model, batch, params)
    hvp = make_hvp(model, batch, params, reuse_graph=False)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_autograd_hvp_matches_dense_hessian_on_tiny_causal_lm():
    model = tiny_llama().double()
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    params = trainable_parameters(model)
    H = dense_hessian(model, batch, params, loss_of_output=lambda out: out.loss)
    assert H.shape[0] > 500  # the whole model, not a toy subset
    hvp = make_hvp(model, batch, params)
    # Llama keeps the loss, norms and softmax in float32 internally, so agreement is at float32 level.
    for seed in range(3):
        v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        expected = H @ v
        assert (hvp(v) - expected).norm() / expected.norm() < 1e-5


def test_loss_fn_replaces_model_loss():
    model, batch, params = mlp_problem()
    H = dense_hessian(model, batch, params)
    hvp = make_hvp(model, batch, params, loss_fn=lambda m, b: 3.0 * m(**b)["loss"])
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hvp(v), 3.0 * (H @ v), rtol=1e-10, atol=1e-12)


def test_loss_gradient_matches_torch_func_grad_in_eval_mode():
    model, batch, params = mlp_problem()
    names = [n for n, _ in model.named_parameters()]

    def loss(flat_P):
        chunks = torch.split(flat_P, [p.numel() for p in params])
        weights = {n: c.view(p.shape) for n, c, p in zip(names, chunks, params, strict=True)}
        return functional_call(model, weights, kwargs=batch)["loss"]

    expected = grad(loss)(torch.cat([p.detach().reshape(-1) for p in model.eval().parameters()]))
    model.train()  # dropout would change the loss: the gradient is taken in eval mode
    torch.testing.assert_close(loss_gradient(model, batch, params), expected, rtol=1e-12, atol=1e-14)
    assert model.training


def test_loss_gradient_gives_zeros_for_parameters_the_loss_does_not_reach():
    model, batch, params = mlp_problem()
    unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
    g = loss_gradient(model, batch, [*params, unused])
    assert torch.equal(g[-4:], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(g[:-4], loss_gradient(model, batch, params), rtol=0, atol=0)


def test_loss_gradient_leaves_grad_modes_and_global_rng_untouched():
    model, batch, params = mlp_problem()
    model.train()
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    loss_gradient(model, batch, params)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in params)


def test_loss_fn_replaces_model_loss_in_the_gradient():
    model, batch, params = mlp_problem()
    g = loss_gradient(model, batch, params, loss_fn=lambda m, b: 3.0 * m(**b)["loss"])
    torch.testing.assert_close(g, 3.0 * loss_gradient(model, batch, params), rtol=1e-12, atol=0)


def test_hvp_over_a_parameter_subset_is_the_hessian_block():
    model, batch, params = mlp_problem()
    H = dense_hessian(model, batch, params)
    first = params[0].numel() + params[1].numel()
    sub = params[:2]
    hvp = make_hvp(model, batch, sub)
    v = torch.randn(first, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hvp(v), H[:first, :first] @ v, rtol=1e-10, atol=1e-12)


def test_finite_difference_matches_exact_in_float32():
    model = tiny_llama(vocab_size=32, hidden_size=16)
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    params = trainable_parameters(model)
    exact = make_hvp(model, batch, params)
    approx = make_hvp(model, batch, params, method="finite_difference")
    for seed in range(3):
        v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(seed))
        v = v * 7.0  # the step is taken relative to the norm of v
        e, a = exact(v), approx(v)
        assert (a - e).norm() / e.norm() < 5e-3, f"relative error {((a - e).norm() / e.norm()).item():.2e}"


def test_finite_difference_matches_dense_hessian_in_float64():
    model, batch, params = mlp_problem()
    H = dense_hessian(model, batch, params)
    hvp = make_hvp(model, batch, params, method="finite_difference")
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert ((hvp(v) - H @ v).norm() / (H @ v).norm()).item() < 1e-7


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_model_state_is_left_as_it_was(method):
    model, batch, params = mlp_problem(torch.float32)
    model.train()
    model.net[0].eval()  # a mixed-mode model: every submodule's own mode must come back
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    before_params = [p.detach().clone() for p in params]
    before_grads = [p.grad.clone() for p in params]
    before_modes = [m.training for m in model.modules()]
    before_rng = torch.get_rng_state()
    hvp = make_hvp(model, batch, params, method=method)
    out = hvp(torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out).all()
    assert [m.training for m in model.modules()] == before_modes
    assert torch.equal(torch.get_rng_state(), before_rng)
    for p, b, g in zip(params, before_params, before_grads, strict=True):
        assert torch.equal(p.detach(), b), "parameters must be restored bit for bit"
        assert torch.equal(p.grad, g), ".grad must not be touched"


def test_dropout_is_off_during_products():
    model, batch, params = mlp_problem()
    model.train()
    hvp = make_hvp(model, batch, params, reuse_graph=False)
    v = torch.randn(
        sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(hvp(v), hvp(v), rtol=0, atol=0)
    torch.testing.assert_close(hvp(v), dense_hessian(model, batch, params) @ v, rtol=1e-10, atol=1e-12)


def test_sdpa_model_raises_a_clear_error_for_autograd():
    model = tiny_llama(vocab_size=32, hidden_size=16, attn="sdpa")
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    with pytest.raises(DoubleBackwardError, match="finite_difference"):
        make_hvp(model, batch, trainable_parameters(model))(
            torch.ones(sum(p.numel() for p in model.parameters()))
        )
    # and the finite-difference product works on the very same model
    out = make_hvp(model, batch, trainable_parameters(model), method="finite_difference")(
        torch.ones(sum(p.numel() for p in model.parameters()))
    )
    assert torch.isfinite(out).all()


def test_reentrant_checkpointing_raises_a_clear_error():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))

        def forward(self, x):
            out = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)
            return {"loss": out.pow(2).mean()}

    model = Checkpointed()
    params = trainable_parameters(model)
    with pytest.raises(DoubleBackwardError, match="reentrant"):
        make_hvp(model, {"x": torch.randn(3, 4, requires_grad=True)}, params)(torch.ones(25))


def test_hf_checkpointing_is_off_in_the_eval_mode_products():
    """HF models checkpoint only in training mode, so even reentrant checkpointing allows exact products."""
    model = tiny_llama(vocab_size=32, hidden_size=16, layers=2)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    params = trainable_parameters(model)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    plain = make_hvp(model, batch, params)(v)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    torch.testing.assert_close(make_hvp(model, batch, params)(v), plain, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    model, batch, params = mlp_problem()
    for wrong in ("exact", "fd", "finite-difference", "Autograd"):  # never silently taken for one of the two
        with pytest.raises(ValueError, match="method"):
            make_hvp(model, batch, params, method=wrong)
    with pytest.raises(ValueError, match="params"):
        make_hvp(model, batch, [])
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        make_hvp(model, batch, [frozen])
    with pytest.raises(ValueError, match="labels"):
        make_hvp(nn.Linear(5, 3).double(), {"input": batch["x"]}, params[:1])
    with pytest.raises(ValueError, match="length"):
        make_hvp(model, batch, params)(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_a_float32_model_answers_a_float64_vector_in_float64(method):
    # The documented dtype: the wider of the vector's and the parameters'. Truth: the dense Hessian of a float64
    # copy of the model; the float32 model agrees to float32 accuracy.
    model, batch, params = mlp_problem(torch.float32)
    model64 = copy.deepcopy(model).double()
    H = dense_hessian(model64, {k: t.double() for k, t in batch.items()}, trainable_parameters(model64))
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    hv = make_hvp(model, batch, params, method=method)(v)
    assert hv.dtype == torch.float64
    assert ((hv - H @ v).norm() / (H @ v).norm()).item() < (1e-5 if method == "autograd" else 5e-3)
    assert make_hvp(model, batch, params, method=method)(v.float()).dtype == torch.float32


class PartlyLinear(nn.Module):
    """loss = a·x + (b·x)² + 0·c: linear in a (its gradient is a constant), quadratic in b, and c unused."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
        self.c = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return {"loss": (self.a * x).sum() + (self.b * x).sum() ** 2}


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_parameters_the_loss_is_linear_in_or_does_not_use_have_zero_hessian_rows(method):
    model = PartlyLinear()
    x = torch.tensor([3.0, -2.0], dtype=torch.float64)
    params = trainable_parameters(model)
    # d²/db² (b·x)² = 2 x xᵀ; every other block is zero
    H = torch.zeros(7, 7, dtype=torch.float64)
    H[2:4, 2:4] = 2 * torch.outer(x, x)
    v = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, 3.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        make_hvp(model, {"x": x}, params, method=method)(v), H @ v, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_the_zero_vector_gives_the_zero_product(method):
    model, batch, params = mlp_problem()
    hvp = make_hvp(model, batch, params, method=method)
    out = hvp(torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))
    # in the documented dtype, the wider of the vector's and the parameters' (a float32 zero on float64 params)
    narrow = hvp(torch.zeros(out.numel(), dtype=torch.float32))
    assert narrow.dtype == torch.promote_types(torch.float32, params[0].dtype) == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_difference_step_is_the_documented_formula(dtype):
    # ε = u^(1/3) (1 + ‖θ‖) / √P with u the unit roundoff, eps/2.
    model, _, params = mlp_problem(dtype)
    theta = torch.cat([p.detach().double().reshape(-1) for p in params])
    u = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]
    expected = u ** (1 / 3) * (1 + theta.norm().item()) / theta.numel() ** 0.5
    assert finite_difference_step(params) == pytest.approx(expected, rel=1e-6)


def test_finite_difference_products_are_exact_on_a_quadratic_at_any_step():
    # A quadratic's central difference has no truncation error: only the step (and the 2 in 2ε) decide.
    A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    loss_fn = lambda m, b: 0.5 * w @ A @ w + w.sum() ** 3 * 0  # noqa: E731
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for step in (1e-4, 1e-2, 1.0):
        hvp = make_hvp(nn.Module(), {}, [w], method="finite_difference", loss_fn=loss_fn, fd_step=step)
        torch.testing.assert_close(hvp(v), A @ v, rtol=1e-8, atol=1e-8)
    assert torch.equal(w.detach(), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))


def test_a_non_scalar_loss_or_a_bad_step_is_rejected_naming_it():
    model, batch, params = mlp_problem()
    with pytest.raises(ValueError, match="scalar"):
        make_hvp(model, batch, params, loss_fn=lambda m, b: m(**b)["loss"].expand(2))
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="fd_step"):
            make_hvp(model, batch, params, method="finite_difference", fd_step=bad)
