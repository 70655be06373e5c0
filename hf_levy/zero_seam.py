"""Where the noise enters under DeepSpeed: right before the ZeRO optimizer's ``step``.

Under DeepSpeed the optimizer step runs inside the Trainer's ``accelerator.backward`` (the engine's
``step()`` on the last micro-batch of an optimizer step), so ``on_pre_optimizer_step`` comes after the
update. The engine calls its ZeRO optimizer's ``step`` once per optimizer step, after the backward has
averaged the gradients over the ranks into each rank's partition and before that ``step`` checks for
fp16 overflow, unscales, clips and updates. That call is wrapped here.

Clipping moves with it: elsewhere the noise is added after ``max_grad_norm`` clipping and is not
clipped itself (its size is relative to the clipped ‖g‖), but DeepSpeed clips inside ``step``, after
anything added before it. So the ZeRO optimizer's ``clip_grad`` is set to 0 during the call and the wrapper clips first
with DeepSpeed's formula (:func:`hf_levy.zero_space.clip_zero_grads`), then adds the noise. DeepSpeed's
grad norm, which the Trainer logs as ``grad_norm``, is set back to ‖g‖ before clipping and noise, what
the Trainer logs without DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hf_levy import _compat

WRAPPED = "_hf_levy_before_step"  # the ZeRO optimizer attribute holding the current hook


def install_before_step(optimizer: Any, before_step: Callable[[float], float]) -> None:
    """Wrap ``optimizer.step`` (a DeepSpeed ZeRO optimizer) to call ``before_step(max_norm)`` first.

    ``max_norm`` is DeepSpeed's ``gradient_clipping`` (0: none), which the wrapper takes over for the
    call; ``before_step`` returns ‖g‖ before clipping. Installing again (a second ``train()``) only replaces
    the hook.
    """
    if hasattr(optimizer, WRAPPED):
        setattr(optimizer, WRAPPED, before_step)
        return
    setattr(optimizer, WRAPPED, before_step)
    original = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        # Off only for this call: DeepSpeed saves clip_grad in its checkpoints, which must keep the setting.
        max_norm = float(_compat.get(optimizer, _compat.DS_CLIP_GRAD) or 0.0)
        norm = getattr(optimizer, WRAPPED)(max_norm)
        _compat.set_existing(optimizer, _compat.DS_CLIP_GRAD, 0.0)
        try:
            result = original(*args, **kwargs)
        finally:
            _compat.set_existing(optimizer, _compat.DS_CLIP_GRAD, max_norm)
        if math.isfinite(norm) and not _compat.get(optimizer, _compat.DS_OVERFLOW, False):
            _compat.set_existing(optimizer, _compat.DS_GLOBAL_GRAD_NORM, norm)
        return result

    optimizer.step = step
