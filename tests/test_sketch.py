"""HessianSketch: refresh schedule, warm start, failure handling and state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from hf_levy.lanczos import Eigenpairs, lanczos
from hf_levy.sketch import HessianSketch, SketchSettings, sketch_metrics


def planted(dim=60, top=(10.0, 8.0, 6.0), seed=0):
    """A symmetric matrix with known top eigenvalues in a random orthogonal basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor(top, dtype=torch.float64), torch.linspace(1.0, -3.0, dim - len(top))])
    return q @ torch.diag(spectrum) @ q.T, torch.sort(spectrum, descending=True).values


def sketch(k=3, iters=40):
    return HessianSketch(
        SketchSettings(num_eigenpairs=k, num_iters=iters, tol=1e-8, seed=0, vector_dtype=torch.float64)
    )


def test_refresh_finds_the_top_eigenpairs_and_reports_metrics():
    A, spectrum = planted()
    s = sketch()
    metrics = s.refresh(lambda v: A @ v, 60, step=0)
    torch.testing.assert_close(s.values_K, spectrum[:3], rtol=1e-8, atol=0)
    assert metrics["curvature/eigenvalue_0"] == pytest.approx(10.0, rel=1e-8)
    assert metrics["curvature/hvp_count"] > 0 and metrics["curvature/sketch_seconds"] >= 0
    torch.testing.assert_close(s.vectors_PK.T @ A @ s.vectors_PK, torch.diag(spectrum[:3]), rtol=0, atol=1e-7)


def test_metrics_report_the_worst_relative_residual_of_the_pairs():
    pairs = Eigenpairs(
        values=torch.tensor([10.0, -4.0, 0.5], dtype=torch.float64),
        vectors=torch.eye(3, dtype=torch.float64),
        residuals=torch.tensor([1e-3, 2e-3, 1e-4], dtype=torch.float64),
        num_matvecs=7,
        converged=False,
    )
    metrics = sketch_metrics(pairs, 1.5)
    assert metrics["curvature/lanczos_residual"] == pytest.approx(max(1e-4, 5e-4, 2e-4), rel=1e-12)
    assert [metrics[f"curvature/eigenvalue_{i}"] for i in range(3)] == [10.0, -4.0, 0.5]
    assert (metrics["curvature/hvp_count"], metrics["curvature/lanczos_converged"]) == (7.0, 0.0)
    assert metrics["curvature/sketch_seconds"] == 1.5


def test_second_refresh_is_warm_started_and_cheaper():
    A, _ = planted()
    s = sketch()
    cold = s.refresh(lambda v: A @ v, 60, step=0)["curvature/hvp_count"]
    B = A + 1e-3 * planted(seed=1)[0]  # the Hessian moved a little
    warm = s.refresh(lambda v: B @ v, 60, step=5)["curvature/hvp_count"]
    assert warm < cold
    torch.testing.assert_close(s.values_K, torch.linalg.eigvalsh(B).flip(0)[:3], rtol=1e-8, atol=0)


def test_an_offloaded_basis_runs_lanczos_on_the_host_and_moves_v_once_in_its_row_layout():
    # No accelerator here: "meta" stands in for the device that keeps V. Lanczos must run where the basis
    # lives (the CPU: a meta basis could not compute eigenvalues) and hand V over as K contiguous rows.
    A, spectrum = planted()
    settings = SketchSettings(
        num_eigenpairs=3, num_iters=40, tol=1e-8, seed=0, vector_dtype=torch.float64, vector_device="meta"
    )
    settings.basis_device = "cpu"
    s = HessianSketch(settings)
    s.refresh(lambda v: A @ v.cpu(), 60, step=0)
    torch.testing.assert_close(s.values_K, spectrum[:3], rtol=1e-8, atol=0)
    assert s.vectors_PK.device.type == "meta" and s.vectors_PK.shape == (60, 3)
    assert s.vectors_PK.stride() == (1, 60)  # the K-row layout the noise's addmv reads


def test_a_non_finite_refresh_is_discarded_and_the_last_good_sketch_kept():
    A, _ = planted()
    s = sketch()
    s.refresh(lambda v: A @ v, 60, step=0)
    good = (s.values_K.clone(), s.vectors_PK.clone())
    with pytest.warns(UserWarning, match="discarded"):
        metrics = s.refresh(lambda v: A @ v * float("nan"), 60, step=5)
    assert metrics == {} and s.step == 0
    assert torch.equal(s.values_K, good[0]) and torch.equal(s.vectors_PK, good[1])


def test_state_round_trip():
    A, _ = planted()
    s = sketch()
    s.refresh(lambda v: A @ v, 60, step=4)
    restored = sketch()
    restored.load_state_dict(s.state_dict())
    assert restored.step == 4 and torch.equal(restored.vectors_PK, s.vectors_PK)
    assert torch.equal(restored.values_K, s.values_K)
    assert sketch().state_dict() == {}


def test_a_state_saved_without_its_attempted_step_takes_the_last_good_one():
    # Files written before refreshes were retried at the period lack "attempted": the last refresh was the
    # good one, so the schedule must wait from that step, not from step 0.
    A, _ = planted()
    s = sketch()
    s.refresh(lambda v: A @ v, 60, step=4)
    old_file = {key: value for key, value in s.state_dict().items() if key != "attempted"}
    restored = sketch()
    restored.load_state_dict(old_file)
    assert (restored.step, restored.attempted) == (4, 4)


def test_a_discarded_refresh_after_the_last_good_one_is_restored_as_attempted():
    # Good refresh at step 4, discarded one at step 7: a resume must wait a period from step 7 (the schedule
    # reads `attempted`), not retry at once as if step 4 were the last try.
    A, _ = planted()
    s = sketch()
    s.refresh(lambda v: A @ v, 60, step=4)
    with pytest.warns(UserWarning, match="discarded"):
        s.refresh(lambda v: A @ v * float("nan"), 60, step=7)
    restored = sketch()
    restored.load_state_dict(s.state_dict())
    assert (restored.step, restored.attempted) == (4, 7)


@pytest.mark.parametrize("bad", ["values", "vectors"])
def test_non_finite_eigenpairs_from_lanczos_are_discarded_and_the_last_good_sketch_kept(monkeypatch, bad):
    # The last guard before the noise: lanczos already raises on a non-finite product, but should a refresh still
    # return non-finite eigenpairs, they are dropped like a failed refresh, never handed to the noise.
    import hf_levy.sketch

    A, _ = planted()
    s = sketch()
    s.refresh(lambda v: A @ v, 60, step=0)
    good = (s.values_K.clone(), s.vectors_PK.clone())
    real = hf_levy.sketch.lanczos

    def poisoned(*args, **kwargs):
        pairs = real(*args, **kwargs)
        values, vectors = pairs.values.clone(), pairs.vectors.clone()
        (values if bad == "values" else vectors)[0] = float("nan")
        return Eigenpairs(values, vectors, pairs.residuals, pairs.num_matvecs, pairs.converged)

    monkeypatch.setattr(hf_levy.sketch, "lanczos", poisoned)
    with pytest.warns(UserWarning, match="non-finite eigenpairs"):
        assert s.refresh(lambda v: A @ v, 60, step=5) == {}
    assert s.step == 0 and torch.equal(s.values_K, good[0]) and torch.equal(s.vectors_PK, good[1])


def test_vectors_are_kept_in_the_configured_dtype_and_restored_values_in_float64():
    A, spectrum = planted()
    s = HessianSketch(
        SketchSettings(num_eigenpairs=3, num_iters=40, tol=1e-3, seed=0, vector_dtype=torch.bfloat16)
    )
    s.refresh(lambda v: A.to(v.dtype) @ v, 60, step=0)
    assert s.vectors_PK.dtype == torch.bfloat16
    torch.testing.assert_close(s.values_K, spectrum[:3], rtol=3e-2, atol=0)  # bf16 storage: ~1e-2 accuracy
    restored = HessianSketch(s.settings)
    restored.load_state_dict({k: v.float() if k == "values" else v for k, v in s.state_dict().items()})
    assert restored.values_K.dtype == torch.float64 and restored.vectors_PK.dtype == torch.bfloat16


def test_refresh_stops_at_the_configured_tolerance():
    # A loose tolerance stops earlier than a tight one on the same operator and start.
    A, _ = planted()
    loose = HessianSketch(
        SketchSettings(num_eigenpairs=3, num_iters=60, tol=1e-2, seed=0, vector_dtype=torch.float64)
    )
    tight = sketch(iters=60)
    products = [s.refresh(lambda v: A @ v, 60, step=0)["curvature/hvp_count"] for s in (loose, tight)]
    assert products[0] < products[1], products


def test_failure_says_why_the_last_refresh_was_discarded_and_clears_with_a_good_one():
    A, _ = planted()
    s = sketch()
    with pytest.warns(UserWarning, match="discarded"):
        s.refresh(lambda v: A @ v * float("nan"), 60, step=0)
    assert "non-finite" in s.failure and s.attempted == 0 and not s.ready
    s.refresh(lambda v: A @ v, 60, step=3)
    assert s.failure is None and (s.attempted, s.step) == (3, 3)


def test_a_converged_sketch_with_an_eigenvalue_near_zero_reports_a_residual_within_the_tolerance():
    """Convergence is judged against max(|λ|, √eps·‖H‖): the logged residual uses the same scale, so a
    certified pair near λ = 0 does not read as unconverged (dividing by |λ| gave ~16 here before)."""
    spectrum = torch.tensor([10.0, 5.0, 1e-12] + [-1.0 - 0.01 * i for i in range(37)], dtype=torch.float64)
    basis, _ = torch.linalg.qr(
        torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    matrix = basis @ torch.diag(spectrum) @ basis.T
    pairs = lanczos(
        lambda v: matrix @ v, 40, 3, num_iters=40, tol=1e-6, generator=torch.Generator().manual_seed(1)
    )
    assert pairs.converged
    assert abs(pairs.values[2]) < 1e-6  # the near-zero eigenvalue is among the pairs
    assert sketch_metrics(pairs, 0.0)["curvature/lanczos_residual"] <= 1e-6
    floor = math.sqrt(torch.finfo(torch.float64).eps) * float(spectrum.abs().max())
    assert pairs.residual_floor == pytest.approx(floor, rel=0.5)  # the running ‖H‖ estimate is near 10
