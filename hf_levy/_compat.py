"""The private attributes of transformers, Accelerate and DeepSpeed that hf_levy uses, all in this module.

No public API carries what hf_levy needs at these points: the Trainer methods :class:`hf_levy.LevyTrainer`
overrides (the checkpoint save and load, the gradient clipping), the folder of a hyperparameter trial,
the forward Accelerate wraps in autocast, and DeepSpeed's clipping setting, gradient norm and gradient
fragments. A release of those libraries may rename any of them without notice, so each is declared once
here (:class:`Private`), ``tests/test_compat.py`` checks that each exists in the installed versions, and
the accessors fail with :class:`PrivateAPIError` naming the attribute and the installed version instead of
reading ``None`` or writing an attribute nothing reads.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any


class PrivateAPIError(AttributeError):
    """A private attribute hf_levy uses is missing from the installed library; the message names both."""


@dataclass(frozen=True)
class Private:
    """A private attribute of another library: where it lives, and where its source defines or sets it."""

    library: str  # the distribution: "transformers", "accelerate", "deepspeed"
    owner: str  # what holds it, for messages
    name: str
    defined_in: str  # module.qualname whose source defines or sets it (tests/test_compat.py reads it)

    def error(self) -> PrivateAPIError:
        """The error for an installed version that lacks this attribute."""
        try:
            version = importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        return PrivateAPIError(
            f"hf_levy uses {self.owner}.{self.name}, a private attribute of {self.library}, which the "
            f"installed {self.library} {version} does not have: install the {self.library} version hf_levy "
            "is tested with (pyproject.toml, the Makefile) or report it to hf_levy"
        )


_MISSING = object()

# transformers: the Trainer methods LevyTrainer overrides (each called once where the loop needs it).
SAVE_CHECKPOINT = Private("transformers", "Trainer", "_save_checkpoint", "transformers.trainer.Trainer")
LOAD_OPTIMIZER = Private(
    "transformers", "Trainer", "_load_optimizer_and_scheduler", "transformers.trainer.Trainer"
)
CLIP_GRAD_NORM = Private("transformers", "Trainer", "_clip_grad_norm", "transformers.trainer.Trainer")
TRAINER_OVERRIDES = (SAVE_CHECKPOINT, LOAD_OPTIMIZER, CLIP_GRAD_NORM)
# The run folder of a hyperparameter-search trial, where its checkpoints go.
GET_OUTPUT_DIR = Private("transformers", "Trainer", "_get_output_dir", "transformers.trainer.Trainer")

# Accelerate keeps a mixed-precision model's own forward here when it wraps it in autocast.
ORIGINAL_FORWARD = Private(
    "accelerate",
    "a model prepared by Accelerator",
    "_original_forward",
    "accelerate.Accelerator.prepare_model",
)

# DeepSpeed's ZeRO optimizers (stages 1 and 2; stage 3 sets the same attributes).
# Accelerate keeps one DeepSpeed plugin per process in a shared state and refuses a second Accelerator that
# brings its own: several Trainers in one process (the arms of a recipe) need that state emptied in between.
RESET_ACCELERATOR_STATE = Private(
    "accelerate", "AcceleratorState", "_reset_state", "accelerate.state.AcceleratorState"
)

_ZERO = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
DS_CLIP_GRAD = Private("deepspeed", "DeepSpeedZeroOptimizer", "clip_grad", _ZERO)
DS_GLOBAL_GRAD_NORM = Private("deepspeed", "DeepSpeedZeroOptimizer", "_global_grad_norm", _ZERO)
DS_OVERFLOW = Private("deepspeed", "DeepSpeedZeroOptimizer", "overflow", _ZERO)
# A ZeRO 1/2 parameter's link to the fragment of its gradient this rank owns (None or absent: it owns none).
_LINKAGE = "deepspeed.utils.mixed_precision_linkage"
DS_HP_MAPPING = Private("deepspeed", "a ZeRO 1/2 parameter", "_hp_mapping", _LINKAGE)
DS_INDEX_IN_GROUP = Private("deepspeed", "a ZeRO 1/2 parameter", "_index_in_param_group", _LINKAGE)

EVERY_PRIVATE = (
    *TRAINER_OVERRIDES,
    GET_OUTPUT_DIR,
    ORIGINAL_FORWARD,
    RESET_ACCELERATOR_STATE,
    DS_CLIP_GRAD,
    DS_GLOBAL_GRAD_NORM,
    DS_OVERFLOW,
    DS_HP_MAPPING,
    DS_INDEX_IN_GROUP,
)


def get(obj: Any, private: Private, default: Any = _MISSING) -> Any:
    """``obj``'s ``private`` attribute; ``default`` where it may be absent (else :class:`PrivateAPIError`)."""
    try:
        return getattr(obj, private.name)
    except AttributeError:
        if default is _MISSING:
            raise private.error() from None
        return default


def set_existing(obj: Any, private: Private, value: Any) -> None:
    """Overwrite ``obj``'s ``private`` attribute, which must exist: a new one would be read by nothing."""
    if not hasattr(obj, private.name):
        raise private.error()
    setattr(obj, private.name, value)


def check_overrides(base: type) -> None:
    """Raise :class:`PrivateAPIError` unless ``base`` has every Trainer method that LevyTrainer overrides.

    An override of a method the installed Trainer no longer has would never be called: the sketch would
    silently be neither saved nor restored.
    """
    for private in TRAINER_OVERRIDES:
        get(base, private)


def trainer_output_dir(trainer: Any, trial: Any) -> str:
    """The folder ``trainer`` saves the checkpoints of ``trial`` into (outside a search: ``output_dir``)."""
    return get(trainer, GET_OUTPUT_DIR)(trial=trial)


def accelerate_original_forward(model: Any) -> Any:
    """The forward Accelerate wrapped in autocast for mixed precision; None when it wrapped none.

    Read from the instance's own attributes: a class attribute of that name is not Accelerate's.
    """
    return vars(model).get(ORIGINAL_FORWARD.name)


def reset_accelerator_state() -> None:
    """Forget the Accelerator state of the Trainer built last (its DeepSpeed plugin, mixed precision).

    The next Trainer of this process then builds its own; the process group (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState

    get(AcceleratorState, RESET_ACCELERATOR_STATE)(reset_partial_state=False)
