"""Who writes a run folder: one ``hf-levy`` run at a time, and within a launch one process, the main one.

Two ``compare`` runs on one folder would overwrite each other's arms and report, so each run holds a lock file
in the folder (``filelock``: an OS lock that ends with its process, never left stale) and refuses to start,
naming the holder, while another run holds it. Under ``torchrun`` or ``accelerate launch`` every rank runs
the same recipe code; the main process (rank 0) alone decides what each arm does, empties and writes its
folder, prints and builds the report, and the others follow its decisions (:meth:`Ranks.share`) and wait for
its writes at a barrier.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import shlex
import socket
import sys
from collections.abc import Iterator
from typing import Any

import filelock
import torch

from hf_levy.recipes.arm_files import read_json, write_json
from hf_levy.recipes.recipe import RecipeError

LOCK = ".hf-levy.lock"
# Who holds the lock: written by the holder once it has the lock, read by a run that is refused. (Not the lock
# file itself: filelock truncates that file on every attempt.)
HOLDER = ".hf-levy.holder.json"


class RunFolderBusy(RecipeError):
    """Another run holds the run folder's lock; the message names it."""


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launch (or not launched by torchrun/accelerate/deepspeed at all)."""
    return os.environ.get("RANK", "0") == "0"


class Ranks:
    """The processes of one launch, seen from one of them.

    ``config`` is a ``TrainingArguments`` of the run: reading its ``world_size`` sets up the launch's
    process group (as the Trainer would), so that :meth:`barrier` and :meth:`share` have one to use.
    """

    def __init__(self, config: Any | None = None):
        world_size = config.world_size if config is not None else 1
        self.is_main = config.process_index == 0 if config is not None else True
        self.distributed = (
            world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        )

    def barrier(self) -> None:
        """Wait until every rank of the launch gets here (nothing to wait for in a single process)."""
        if self.distributed:
            torch.distributed.barrier()

    def share(self, value: Any) -> Any:
        """The main process's ``value`` on every rank (a barrier too: every rank waits for the main one)."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def lock_run_folder(run_dir: str | pathlib.Path) -> filelock.BaseFileLock:
    """Create ``run_dir`` if needed and take its lock; returns the held lock (release it when done).

    Re-entrant within a process (``compare`` holds it while its ``train_arm`` takes it again).

    Raises:
        RunFolderBusy: another process holds the lock; the message names its pid, host, start and command.
        RecipeError: the folder cannot be created or written (the message names it and the fix).
    """
    run_dir = pathlib.Path(run_dir)
    lock = filelock.FileLock(run_dir / LOCK, timeout=0, is_singleton=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        raise RunFolderBusy(
            f"{run_dir} is in use by another hf-levy run ({_describe(read_json(run_dir / HOLDER))}); wait for "
            "it to end, or give this run another --output_dir"
        ) from None
    except OSError as err:
        raise RecipeError(
            f"cannot write the run folder {run_dir} ({err.strerror or err}): give a folder you can write to "
            "with --output_dir"
        ) from err
    if lock.lock_counter == 1:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
        }
        write_json(run_dir / HOLDER, holder)
    return lock


def _describe(holder: Any) -> str:
    if not isinstance(holder, dict):
        return "holder not recorded yet"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}: {holder.get('command')}"


@contextlib.contextmanager
def own_run_folder(run_dir: str | pathlib.Path, ranks: Ranks) -> Iterator[None]:
    """The main process holds ``run_dir``'s lock for the block; every rank raises if it could not."""
    lock, error = None, None
    if ranks.is_main:
        try:
            lock = lock_run_folder(run_dir)
        except RecipeError as err:
            error = (type(err).__name__, str(err))
    error = ranks.share(error)
    if error is not None:
        raise (RunFolderBusy if error[0] == RunFolderBusy.__name__ else RecipeError)(error[1])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
