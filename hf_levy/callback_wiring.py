"""What LevyCallback needs from a Trainer beyond the arguments of its events.

A callback in ``Trainer(callbacks=[...])`` or added with ``trainer.add_callback`` sees the arguments, the
state and the model, but not its place in the callback list nor the checkpoint a run resumed from. Both
matter: the reporting callbacks of ``report_to`` (TensorBoard, W&B, ...) come before the user's in that
list and read ``logs`` before a later callback adds the ``curvature/`` and ``levy/`` metrics; and a
resumed run needs the sketch saved in its checkpoint. This module finds both where it can, so that
:class:`hf_levy.LevyCallback` works as HF users write it; where it cannot, the callback warns and names
``LevyCallback(...).attach(trainer)`` or :class:`hf_levy.LevyTrainer`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import CallbackHandler

TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's state in each checkpoint folder


def install_first(callback: Any, trainer: Any) -> None:
    """``LevyCallback.attach``: put ``callback`` first in ``trainer``'s list and wrap four Trainer methods.

    The callback is put there once, even if it was passed in ``callbacks=[...]`` too. The four methods are
    those no public event replaces: the checkpoint save (the sketch file goes in before the Trainer's own
    files, so a Hub push of the folder includes it), the checkpoint load (the exact folder resumed from), the
    gradient clipping (the pre-clip norm) and the drawing of an optimizer step's micro-batches (the sub-batch
    of the 'minibatch' noise bases).
    """
    callbacks = trainer.callback_handler.callbacks
    if any(c is callback for c in callbacks):
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    save_checkpoint, load_optimizer = trainer._save_checkpoint, trainer._load_optimizer_and_scheduler

    def _save_checkpoint(model, trial):
        step = trainer.state.global_step
        folder = os.path.join(trainer._get_output_dir(trial=trial), f"checkpoint-{step}")
        callback._saving(folder, trainer.args, step)
        save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(checkpoint):
        load_optimizer(checkpoint)
        callback.load_state(checkpoint)

    trainer._save_checkpoint = _save_checkpoint
    trainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
    clip_grad_norm = getattr(trainer, "_clip_grad_norm", None)
    if clip_grad_norm is not None:  # transformers 5.x: returns the pre-clip norm

        def _clip_grad_norm(model):
            norm = clip_grad_norm(model)
            callback._clipped(norm)
            return norm

        trainer._clip_grad_norm = _clip_grad_norm

    get_batch_samples = trainer.get_batch_samples

    def _get_batch_samples(epoch_iterator, num_batches, *rest, **kwargs):
        batches, num_items = get_batch_samples(epoch_iterator, num_batches, *rest, **kwargs)
        callback._step_batches(batches)
        return batches, num_items

    trainer.get_batch_samples = _get_batch_samples


def move_to_front(callback: TrainerCallback) -> bool:
    """Move ``callback`` to the head of the list of the Trainer that is running one of its events.

    Call it from inside an event. The Trainer hands callbacks no reference to its ``CallbackHandler``, so
    the handler is found up the call stack (its ``call_event`` loop is the caller). Moving the running
    callback is safe for that loop: the callbacks after it keep their positions. Returns False when no
    handler holding ``callback`` was found.
    """
    frame = sys._getframe(1)
    for _ in range(8):  # the event, call_event, on_<event>: a few frames at most
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
            if handler.callbacks[0] is not callback:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return True
        frame = frame.f_back
    return False


def checkpoint_folder(args: Any, state: TrainerState) -> str | None:
    """The folder ``Trainer._save_checkpoint`` just wrote, as seen in ``on_save``.

    None when it is not ``output_dir/checkpoint-<step>`` (hyperparameter-search trials write into a folder
    of their own).
    """
    folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    return folder if os.path.isdir(folder) else None


def resumed_checkpoint(args: Any, state: TrainerState) -> str | None:
    """The checkpoint a resumed run (``state.global_step > 0`` at ``on_train_begin``) started from.

    ``train(resume_from_checkpoint=...)`` does not reach callbacks, so two folders are tried: the
    arguments' ``resume_from_checkpoint`` (which scripts pass on to ``train``) and
    ``output_dir/checkpoint-<step>`` (where ``resume_from_checkpoint=True`` resumes). A folder is taken only
    when its saved Trainer state is the one the run resumed with (same step and log history), so another
    run's checkpoint of the same step is never mistaken for it. None when neither matches.
    """
    candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.insert(0, args.resume_from_checkpoint)
    for folder in candidates:
        path = os.path.join(folder, TRAINER_STATE_FILE)
        if not os.path.isfile(path):
            continue
        saved = TrainerState.load_from_json(path)
        # compared as JSON text, as saved: a NaN loss in the history is then equal to itself
        same_history = json.dumps(saved.log_history, sort_keys=True) == json.dumps(
            state.log_history, sort_keys=True
        )
        if saved.global_step == state.global_step and same_history:
            return folder
    return None
