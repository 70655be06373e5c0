"""A build lock of torch's C++ extension cache left by a killed process is removed before a launch (torch's
own FileBaton would wait on it forever); one a live process holds is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch.utils.file_baton import FileBaton

from hf_levy._extension_locks import clear_stale_build_locks
from hf_levy.recipes.cli import main

# What a process that torch.utils.cpp_extension.load is building in holds: the baton, open.
HOLD_BATON = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
sys.stdin.read()
"""


def stale_lock(root):
    folder = root / "py311_cpu" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    os.close(baton.fd)  # the holder dies before release(): the kernel closes its descriptor, the file stays
    assert not FileBaton(str(lock)).try_acquire()  # every later load would now wait in FileBaton.wait()
    return lock


def test_a_lock_no_process_holds_is_removed_and_a_held_one_is_kept(tmp_path):
    stale = stale_lock(tmp_path)
    held = tmp_path / "py311_cpu" / "other_op" / "lock"
    held.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_BATON, str(held)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.warns(UserWarning, match="stale build lock .*deepspeed_shm_comm"):
            assert clear_stale_build_locks(tmp_path) == [stale]
        assert FileBaton(str(stale)).try_acquire()  # torch's next load takes the baton instead of waiting
        assert held.exists()  # a build in progress keeps its lock
    finally:
        holder.communicate("")


def test_hf_levy_train_and_compare_clear_stale_locks_before_anything_else(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for command in ("train", "compare"):
        lock = stale_lock(tmp_path / "extensions" / command)
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions" / command))
        with pytest.warns(UserWarning, match="stale build lock"):
            assert main([command, "--config", str(tmp_path / "missing.yaml")]) == 2  # ends at once
        assert not lock.exists(), command
    capsys.readouterr()
