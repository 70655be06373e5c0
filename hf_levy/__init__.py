"""hf_levy: Hessian-shaped alpha-stable gradient noise for large-batch Hugging Face training."""

from hf_levy.hvp import DoubleBackwardError, make_hvp
from hf_levy.params import trainable_parameters

__version__ = "0.1.0"

__all__ = ["DoubleBackwardError", "make_hvp", "trainable_parameters", "__version__"]
