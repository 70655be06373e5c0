"""The progress bar of a sketch refresh: Hessian-vector products done out of ``lanczos_num_iters``.

A refresh of a large model takes minutes, between two ticks of the Trainer's step bar: without a bar of
its own it looks like a hang. Shown like the Trainer's evaluation bar (tqdm, below the step bar, removed
when done), on the main process only, and not at all under ``disable_tqdm``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor
from tqdm.auto import tqdm


@contextlib.contextmanager
def sketch_progress(show: bool, total: int, step: int) -> Iterator[tqdm | None]:
    """A bar of ``total`` products for the refresh at optimizer step ``step``; None when not shown."""
    if not show:
        yield None
        return
    # A product is a forward and a double backward of the sketch batch: rendering each one costs nothing.
    bar = tqdm(
        total=total,
        desc=f"Hessian sketch at step {step}",
        unit="product",
        leave=False,
        dynamic_ncols=True,
        mininterval=0,
    )
    try:
        yield bar
    finally:
        bar.close()


def counted(matvec: Callable[[Tensor], Tensor], bar: tqdm | None) -> Callable[[Tensor], Tensor]:
    """``matvec`` that advances ``bar`` by one after each product."""
    if bar is None:
        return matvec

    def matvec_counted(v: Tensor) -> Tensor:
        out = matvec(v)
        bar.update(1)
        return out

    return matvec_counted
