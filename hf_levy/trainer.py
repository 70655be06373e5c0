"""LevyTrainer: ``transformers.Trainer`` with the hf_levy callback and the few overrides it needs.

The callback does the work on the Trainer's events. Five moments reach no callback, so the trainer
overrides the methods where they happen and hands each to its callback: the checkpoint save (the sketch
file goes into the folder before the Trainer's own files, so a Hub push of it includes the sketch), the
checkpoint load (the exact folder a run resumes from), the gradient clipping (the norm before
``max_grad_norm``, which the calibration needs), the drawing of an optimizer step's micro-batches (the
sub-batch of the 'minibatch' noise bases) and ``log`` (the ``levy/`` metrics join the training entry before
any callback, such as the ``report_to`` loggers, receives it). Each sketch refresh is logged as an entry of its
own at the step it was computed at, so TensorBoard and the other loggers plot it there.

:meth:`hf_levy.LevyCallback.attach` gives another Trainer class (e.g. TRL's SFTTrainer) the same overrides,
by making the instance one of a subclass of its class with :class:`LevyTrainerMixin` in front.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from transformers import Trainer

from hf_levy import _compat
from hf_levy.callback import LevyCallback
from hf_levy.config import LevyArguments, LevyConfig


class LevyTrainerMixin:
    """The Trainer overrides that hand :attr:`levy_callback` what no event carries (see the module docstring).

    Put in front of a ``transformers.Trainer`` class: ``class LevyTrainer(LevyTrainerMixin, Trainer)``.
    """

    levy_callback: LevyCallback

    def _install_levy_callback(self, callback: LevyCallback) -> None:
        """Make ``callback`` this trainer's, first in its callback list (once, even if listed already).

        First, so that on every event it acts before the user's callbacks (they see the noisy gradient at
        ``on_pre_optimizer_step``, as they see the clipped one).
        """
        _compat.check_overrides(Trainer)
        current = getattr(self, "levy_callback", None)
        if current is not None and current is not callback:
            raise ValueError(
                f"{type(self).__name__} already has a LevyCallback: one trainer takes one (its noise "
                "would be added twice)"
            )
        callbacks = self.callback_handler.callbacks
        if any(c is callback for c in callbacks):
            callbacks.remove(callback)
        callbacks.insert(0, callback)
        self.levy_callback = callback
        callback._attached = True
        callback._log_sketch = self._log_levy_sketch

    def _log_levy_sketch(self, metrics: dict[str, float]) -> None:
        """Log a refresh's metrics as their own entry, at the step the sketch was computed at.

        ``Trainer.log`` itself, not this class's ``log``: a subclass's override may fold its own averaged
        training metrics into whatever entry it logs (TRL's does), and this entry is the sketch's alone.
        """
        Trainer.log(self, metrics)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        folder = os.path.join(_compat.trainer_output_dir(self, trial), f"checkpoint-{step}")
        self.levy_callback._saving(folder, self.args, step)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        self.levy_callback.load_state(checkpoint)

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = super()._clip_grad_norm(model)  # the norm before clipping
        self.levy_callback._clipped(norm)
        return norm

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, *rest: Any, **kwargs: Any) -> Any:
        """The Trainer's micro-batches of one optimizer step, shown to the callback (its sub-batch)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, *rest, **kwargs)
        self.levy_callback._step_batches(batches)
        return batches, num_items

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log`` with the ``curvature/`` and ``levy/`` metrics in training logs and the summary."""
        logs.update(self.levy_callback._log_metrics(logs))
        super().log(logs, start_time)


@functools.cache
def with_levy_overrides(trainer_class: type) -> type:
    """The subclass of ``trainer_class`` with :class:`LevyTrainerMixin` in front (one per class)."""
    if issubclass(trainer_class, LevyTrainerMixin):
        return trainer_class
    return type(f"{trainer_class.__name__}WithLevy", (LevyTrainerMixin, trainer_class), {})


def attach(callback: LevyCallback, trainer: Any) -> None:
    """:meth:`LevyCallback.attach`: give ``trainer`` the overrides and ``callback``.

    The instance becomes one of ``with_levy_overrides(type(trainer))``, as ``torch.nn.utils.parametrize``
    does with a module: ``isinstance(trainer, type(trainer))`` still holds and its own methods still run.
    """
    trainer.__class__ = with_levy_overrides(type(trainer))
    trainer._install_levy_callback(callback)


class LevyTrainer(LevyTrainerMixin, Trainer):
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
        self._install_levy_callback(LevyCallback(args, loss_fn=loss_fn))
