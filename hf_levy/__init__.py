"""hf_levy: Hessian-shaped alpha-stable gradient noise for large-batch Hugging Face training."""

from hf_levy.hvp import DoubleBackwardError, make_hvp
from hf_levy.lanczos import Eigenpairs, lanczos
from hf_levy.noise_scale import NoiseScaleEstimate, gradient_noise_scale
from hf_levy.params import trainable_parameters
from hf_levy.stable import (
    estimate_stable_scale,
    estimate_tail_index,
    estimate_tail_index_log_moments,
    sample_symmetric_stable,
)

__version__ = "0.1.0"

# The Trainer shell imports transformers; load it only when asked for, so the numerical core stays light.
_TRAINER_EXPORTS = {
    "LevyArguments": "hf_levy.config",
    "LevyConfig": "hf_levy.config",
    "LevyCallback": "hf_levy.callback",
    "LevyTrainer": "hf_levy.trainer",
}


def __getattr__(name: str):
    if name in _TRAINER_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_TRAINER_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_levy' has no attribute {name!r}")


__all__ = [
    "DoubleBackwardError",
    "Eigenpairs",
    "LevyArguments",
    "LevyCallback",
    "LevyConfig",
    "LevyTrainer",
    "NoiseScaleEstimate",
    "estimate_stable_scale",
    "estimate_tail_index",
    "estimate_tail_index_log_moments",
    "gradient_noise_scale",
    "lanczos",
    "make_hvp",
    "sample_symmetric_stable",
    "trainable_parameters",
    "__version__",
]
