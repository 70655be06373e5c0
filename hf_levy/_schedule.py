"""When the Hessian sketch is refreshed: every N optimizer steps, optionally held back by a time budget.

With ``max_overhead`` (``sketch_max_overhead``) a refresh that N steps made due waits until the training
steps since the last refresh took at least (that refresh's seconds) / max_overhead, so the sketch costs
at most about that share of the training time. A step's cost is the median of the steps timed since the
refresh: evaluations and checkpoints between two steps are outliers, not the step's cost. The schedule's
clock state travels in checkpoints, so a resumed run keeps the refresh steps the budget chose.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# The schedule's entries in the checkpoint's state file.
STATE_KEYS = ("schedule_sketch_seconds_total", "schedule_refresh_seconds", "schedule_deferred_to")


class RefreshSchedule:
    """Decides at each optimizer step whether the sketch is refreshed, and keeps what that costs.

    Args:
        every_n_steps: refresh when this many optimizer steps have passed since the last good refresh.
        max_overhead: the time budget (a share of the training time), or None for no budget.
        agree: maps the deferred refresh step to the value every rank uses (a broadcast from rank 0 under
            data parallelism, so all ranks refresh at the same step although their clocks differ).
    """

    def __init__(
        self,
        every_n_steps: int,
        max_overhead: float | None = None,
        *,
        agree: Callable[[int], int] = lambda step: step,
    ):
        self.every_n_steps, self.max_overhead, self.agree = every_n_steps, max_overhead, agree
        self.refresh_seconds: float | None = None  # the last refresh's wall seconds (calibration included)
        self.total_seconds = 0.0  # all refreshes of this run
        self.deferred_to: int | None = None  # the step the budget holds the next refresh back to
        self._step_seconds: list[float] = []  # training steps timed since the last refresh
        self._step_started: float | None = None

    def due(self, step: int, last_refresh: int | None) -> bool:
        """Whether the sketch is refreshed at ``step``; called once at the start of every optimizer step.

        ``last_refresh`` is the step of the last good sketch (None: there is none yet).
        """
        now = time.perf_counter()
        if self._step_started is not None and self.max_overhead is not None:
            self._step_seconds.append(now - self._step_started)
        self._step_started = now
        if last_refresh is not None and step - last_refresh < self.every_n_steps:
            return False
        if self.max_overhead is None or self.refresh_seconds is None or last_refresh is None:
            return True
        if self.deferred_to is None:
            if not self._step_seconds:  # no step timed since the refresh or the resume: time one first
                return False
            step_seconds = statistics.median(self._step_seconds)
            steps_needed = math.ceil(self.refresh_seconds / (self.max_overhead * max(step_seconds, 1e-9)))
            self.deferred_to = self.agree(last_refresh + steps_needed)
        return step >= self.deferred_to

    @contextlib.contextmanager
    def refreshing(self) -> Iterator[None]:
        """Times the refresh run inside the block; the next step's timing starts when it ends."""
        start = time.perf_counter()
        yield
        self.refresh_seconds = time.perf_counter() - start
        self.total_seconds += self.refresh_seconds
        self._step_seconds, self.deferred_to = [], None
        self._step_started = time.perf_counter()

    def state_dict(self) -> dict[str, Tensor]:
        """The budget's state for a checkpoint, under :data:`STATE_KEYS` (NaN or -1 for None)."""
        refresh = math.nan if self.refresh_seconds is None else self.refresh_seconds
        return {
            STATE_KEYS[0]: torch.tensor(self.total_seconds, dtype=torch.float64),
            STATE_KEYS[1]: torch.tensor(refresh, dtype=torch.float64),
            STATE_KEYS[2]: torch.tensor(-1 if self.deferred_to is None else self.deferred_to),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved, so a resumed run keeps the budget's schedule."""
        total, refresh, deferred = (float(state[key]) for key in STATE_KEYS)
        self.total_seconds = total
        self.refresh_seconds = None if math.isnan(refresh) else refresh
        self.deferred_to = None if deferred < 0 else int(deferred)
