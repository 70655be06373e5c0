"""What LevyCallback needs from a Trainer beyond the arguments of its events.

A callback in ``Trainer(callbacks=[...])`` or added with ``trainer.add_callback`` sees the arguments, the
state and the model, but not its place in the callback list nor the checkpoint a run resumed from. Both
matter: the reporting callbacks of ``report_to`` (TensorBoard, W&B, ...) come before the user's in that
list and read ``logs`` before a later callback adds the ``curvature/`` and ``levy/`` metrics; and a
resumed run needs the sketch saved in its checkpoint. This module finds both where it can, so that
:class:`hf_levy.LevyCallback` works as HF users write it; where it cannot, the callback warns and names
``LevyCallback(...).attach(trainer)`` or :class:`hf_levy.LevyTrainer`, whose overrides hand it both.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import CallbackHandler

TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's state in each checkpoint folder


def move_to_front(callback: TrainerCallback) -> bool:
    """Move ``callback`` to the head of the callback list of every Trainer that holds it.

    Callbacks get no reference to their Trainer or its ``CallbackHandler``, so the handlers are found among
    the objects that hold ``callback`` (``gc.get_referrers``: a handler's list of callbacks, then the handler
    or its attribute dict). Safe inside an event: the callbacks after the running one keep their positions
    in the handler's loop. Returns False when no handler holds ``callback``.
    """
    lists = [r for r in gc.get_referrers(callback) if type(r) is list]
    handlers = []
    for holder in gc.get_referrers(*lists) if lists else ():
        if isinstance(holder, CallbackHandler):
            handlers.append(holder)
        elif type(holder) is dict and any(holder.get("callbacks") is c for c in lists):  # its __dict__
            handlers += [h for h in gc.get_referrers(holder) if isinstance(h, CallbackHandler)]
    handlers = [h for h in handlers if any(h.callbacks is c for c in lists)]
    for handler in handlers:
        if handler.callbacks[0] is not callback:
            handler.callbacks.remove(callback)
            handler.callbacks.insert(0, callback)
    return bool(handlers)


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
