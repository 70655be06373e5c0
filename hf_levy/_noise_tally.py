"""What the noise really was over a span of optimizer steps: its mean size and how often truncation acted.

The norm cap and the per-draw clip can override the noise law: when the cap binds on most steps, the
noise norm is ``levy_max_noise_ratio``·‖g‖ whatever α or the scale, so the logs say how often each bound
acted (``levy/capped_fraction``, ``levy/clipped_fraction``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_levy.noise import NoiseDraw


@dataclass
class NoiseTally:
    """Counts over the optimizer steps that received noise (a logging window, or the whole run)."""

    steps: int = 0
    capped_steps: int = 0  # steps whose ‖ξ‖ hit the cap levy_max_noise_ratio·‖g‖
    clipped_draws: int = 0  # α-stable draws z_i that levy_clip cut
    draws: int = 0
    norm_sum: float = 0.0  # Σ ‖ξ‖
    ratio_sum: float = 0.0  # Σ ‖ξ‖/‖g‖
    share_sum: float = 0.0  # Σ of the top-K share ‖Vᵀd‖²/‖d‖² of the sub-batch noise d (minibatch_topk)
    share_steps: int = 0

    def add(self, draw: NoiseDraw, noise_norm: float, grad_norm: float) -> None:
        """Count one step's noise: its draw's truncations, ‖ξ‖ and ‖ξ‖/‖g‖ (0 when ‖g‖ = 0)."""
        self.steps += 1
        self.capped_steps += int(draw.capped)
        self.clipped_draws += draw.num_clipped
        self.draws += draw.num_draws
        self.norm_sum += noise_norm
        self.ratio_sum += noise_norm / grad_norm if grad_norm > 0 else 0.0

    def add_topk_share(self, share: float) -> None:
        """A step's share of the sub-batch noise in the sketch's span (not counted when it is NaN: d = 0)."""
        if share == share:
            self.share_sum += share
            self.share_steps += 1

    @property
    def capped_fraction(self) -> float:
        """The share of the steps whose noise norm the cap set (0 before any step)."""
        return self.capped_steps / self.steps if self.steps else 0.0

    @property
    def clipped_fraction(self) -> float:
        """The share of the α-stable draws that the clip cut (0 before any draw)."""
        return self.clipped_draws / self.draws if self.draws else 0.0

    def metrics(self, prefix: str = "levy/") -> dict[str, float]:
        """Mean ‖ξ‖, mean ‖ξ‖/‖g‖, the two truncation fractions and (minibatch_topk) the mean top-K share.

        Empty when no step had noise.
        """
        if not self.steps:
            return {}
        metrics = {
            f"{prefix}noise_norm": self.norm_sum / self.steps,
            f"{prefix}noise_to_grad_ratio": self.ratio_sum / self.steps,
            f"{prefix}capped_fraction": self.capped_fraction,
            f"{prefix}clipped_fraction": self.clipped_fraction,
        }
        if self.share_steps:
            metrics[f"{prefix}topk_noise_share"] = self.share_sum / self.share_steps
        return metrics

    def state_tensor(self) -> Tensor:
        """The counts and sums as one float64 vector, in field order (a checkpoint entry)."""
        return torch.tensor(
            [float(getattr(self, f.name)) for f in dataclasses.fields(self)], dtype=torch.float64
        )

    @classmethod
    def from_state_tensor(cls, state: Tensor) -> NoiseTally:
        """The inverse of :meth:`state_tensor` (counts back to integers)."""
        values = state.tolist()
        fields = dataclasses.fields(cls)
        if len(values) != len(fields):
            raise ValueError(f"a noise tally has {len(fields)} entries, got {len(values)}")
        return cls(
            **{f.name: (int(v) if f.type in (int, "int") else v) for f, v in zip(fields, values, strict=True)}
        )
