"""LevyTrainer: ``transformers.Trainer`` with the hf_levy callback installed. Nothing else changes."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from hf_levy.callback import LevyCallback
from hf_levy.config import LevyArguments, LevyConfig


class LevyTrainer(Trainer):
    """A drop-in ``Trainer`` that adds Hessian-shaped α-stable noise to every optimizer step.

    Same constructor as ``Trainer``; ``args`` must be a :class:`LevyConfig` (default:
    ``LevyConfig("trainer_output")``). The sketch loss is ``model(**batch).loss``, or this trainer's
    ``compute_loss`` when a subclass overrides it or a ``compute_loss_func`` is given.
    """

    def __init__(self, model: Any = None, args: LevyConfig | None = None, *positional: Any, **kwargs: Any):
        if args is None:
            args = LevyConfig(output_dir="trainer_output")
        if not isinstance(args, LevyArguments):
            raise TypeError(
                f"LevyTrainer needs a LevyConfig, got {type(args).__name__}: build it with "
                "hf_levy.LevyConfig(...) (it accepts every TrainingArguments field)"
            )
        super().__init__(model, args, *positional, **kwargs)
        custom_loss = (
            type(self).compute_loss is not Trainer.compute_loss or self.compute_loss_func is not None
        )
        loss_fn = (lambda model, batch: self.compute_loss(model, batch)) if custom_loss else None
        self.levy_callback = LevyCallback(args, loss_fn=loss_fn).attach(self)
