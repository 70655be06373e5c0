"""Stale build locks in torch's C++ extension cache, where DeepSpeed builds and loads its ops.

``torch.utils.cpp_extension.load`` guards each op's build folder with a ``lock`` file that the builder
creates (``O_CREAT | O_EXCL``) and keeps open while it runs ninja, also when the op is already built and
ninja has nothing to do; every other process waits while that file exists, with no timeout. A process
killed in that window (a Ctrl-C'd rank, a test timeout) leaves the file behind, and every later launch that
uses the op then waits forever. :func:`clear_stale_build_locks` removes the lock files that no live process
holds open; ``hf-levy train``/``compare`` and the DeepSpeed tests call it before they start.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
import warnings

# Without /proc (not Linux) the holder cannot be seen: a lock this old is taken for stale (a build of
# DeepSpeed's CPU communication op takes about two minutes on 2 busy cores).
STALE_AFTER_SECONDS = 1800.0


def extensions_root() -> pathlib.Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else its default cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return pathlib.Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return pathlib.Path(get_default_build_root())


def _open_paths() -> set[str] | None:
    """Every file this user's processes hold open (from ``/proc/*/fd``), or None without ``/proc``."""
    proc = pathlib.Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    paths = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    paths.add(os.readlink(fd))
                except OSError:  # the descriptor closed meanwhile
                    continue
        except OSError:  # the process ended meanwhile, or is another user's
            continue
    return paths


def clear_stale_build_locks(root: str | os.PathLike[str] | None = None) -> list[pathlib.Path]:
    """Remove the build locks under ``root`` that no process holds open; return them, warning naming each.

    ``root`` defaults to :func:`extensions_root`. A lock a live process holds (a build in progress) is left
    alone.

    Call it from one process per machine (local rank 0) before the others can start building.
    """
    root = pathlib.Path(root) if root is not None else extensions_root()
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]  # <op>/lock, or <python_accelerator>/<op>/lock
    if not locks:
        return []
    held = _open_paths()
    removed = []
    for lock in locks:
        if held is not None:
            stale = str(lock.resolve()) not in held and str(lock) not in held
        else:
            try:
                stale = time.time() - lock.stat().st_mtime > STALE_AFTER_SECONDS
            except FileNotFoundError:
                continue
        if stale:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            warnings.warn(
                f"removed a stale build lock of torch's C++ extensions, {lock}: no process holds it (a run "
                f"killed while building or loading the op {lock.parent.name!r} left it), and every launch "
                "using that op would have waited on it forever",
                stacklevel=2,
            )
    return removed


if __name__ == "__main__":  # python -m hf_levy._extension_locks: clear them by hand
    print("\n".join(map(str, clear_stale_build_locks())) or "no stale build locks", file=sys.stderr)
