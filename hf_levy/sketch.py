"""The periodic Hessian sketch: top-K eigenpairs of the loss on a sketch batch, refreshed every N steps.

A refresh runs :func:`hf_levy.lanczos` on a Hessian-vector product, warm-started from the previous
eigenvectors. A refresh that fails (non-finite products, eigenvalues or vectors) is discarded with a
:class:`SketchDiscardedWarning` and the last good sketch is kept, so nothing non-finite ever reaches the
noise; ``failure`` says why, for a caller that reports it its own way.

Legend: P parameters (or this rank's shard), K eigenpairs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_levy._rng import LANCZOS_START, step_generator
from hf_levy.lanczos import Eigenpairs, lanczos


class SketchDiscardedWarning(UserWarning):
    """A refresh whose products or eigenpairs were not finite; the previous sketch is kept."""


@dataclass
class SketchSettings:
    """What a refresh computes: K eigenpairs by :func:`hf_levy.lanczos` at ``tol`` within ``num_iters``.

    ``seed`` seeds the Lanczos start; the dtype and devices say where V and the basis are kept.
    """

    num_eigenpairs: int
    num_iters: int | None
    tol: float
    seed: int
    vector_dtype: torch.dtype | None = None  # None: the dtype of the products
    vector_device: torch.device | str | None = None  # where V is kept; None: the device of the products
    basis_device: torch.device | str | None = None  # where the Lanczos basis lives; None: vector_device


class HessianSketch:
    """Holds the current eigenpairs (``values_K``, ``vectors_PK``) and the step they were computed at."""

    def __init__(self, settings: SketchSettings):
        self.settings = settings
        self.values_K: Tensor | None = None
        self.vectors_PK: Tensor | None = None
        self.step: int | None = None  # optimizer step of the last good refresh
        self.attempted: int | None = None  # optimizer step of the last refresh, good or discarded
        self.failure: str | None = None  # why the last refresh was discarded; None when it succeeded

    @property
    def ready(self) -> bool:
        """Whether a good refresh has given eigenvectors yet."""
        return self.vectors_PK is not None

    def refresh(
        self,
        matvec: Callable[[Tensor], Tensor],
        dim: int,
        step: int,
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """Recompute the eigenpairs at ``step``; returns the ``curvature/`` metrics (empty when discarded)."""
        s = self.settings
        start = time.perf_counter()
        self.attempted, self.failure = step, None
        try:
            pairs = lanczos(
                matvec,
                dim,
                s.num_eigenpairs,
                num_iters=s.num_iters,
                tol=s.tol,
                init=self.vectors_PK,
                generator=step_generator(s.seed + LANCZOS_START, step),
                dtype=s.vector_dtype,
                device=s.basis_device or s.vector_device,
                reduce=reduce,
            )
        except FloatingPointError as err:
            return self._discard(str(err), step)
        if not (torch.isfinite(pairs.values).all() and torch.isfinite(pairs.vectors).all()):
            return self._discard("non-finite eigenpairs", step)
        vectors_PK = pairs.vectors
        if s.basis_device is not None and s.vector_device is not None:
            # moved once per refresh as the K contiguous rows lanczos returns (the same layout as kept)
            vectors_PK = vectors_PK.T.to(s.vector_device).T
        self.values_K, self.vectors_PK, self.step = pairs.values, vectors_PK, step
        return {**sketch_metrics(pairs, time.perf_counter() - start), "curvature/sketch_step": float(step)}

    def _discard(self, reason: str, step: int) -> dict[str, float]:
        self.failure = reason
        warnings.warn(
            f"Hessian sketch at step {step} discarded ({reason}); keeping the sketch of step {self.step}",
            SketchDiscardedWarning,
            stacklevel=3,
        )
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """The eigenpairs and their steps for a checkpoint; empty before the first good refresh."""
        if not self.ready:
            return {}
        # Saved as the K rows that lanczos keeps contiguous, so a restored sketch has the same memory layout
        # (and therefore bitwise the same noise) as the one it replaces.
        return {
            "values": self.values_K,
            "vectors_KP": self.vectors_PK.T.contiguous(),
            "step": torch.tensor(self.step, dtype=torch.int64),
            "attempted": torch.tensor(self.attempted, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved (an empty state leaves the sketch as it is)."""
        if not state:
            return
        self.values_K = state["values"].double().cpu()
        self.vectors_PK = state["vectors_KP"].T
        self.step = int(state["step"])
        # Files written before refreshes were retried at the period lack it: the last good one was the last.
        self.attempted = int(state.get("attempted", self.step))


def sketch_metrics(pairs: Eigenpairs, seconds: float) -> dict[str, float]:
    """``curvature/`` log entries: eigenvalues (descending), worst relative residual, products, seconds."""
    metrics = {f"curvature/eigenvalue_{i}": float(v) for i, v in enumerate(pairs.values)}
    metrics["curvature/lanczos_residual"] = float(pairs.relative_residuals.max())
    metrics["curvature/lanczos_converged"] = float(pairs.converged)
    metrics["curvature/hvp_count"] = float(pairs.num_matvecs)
    metrics["curvature/sketch_seconds"] = seconds
    return metrics
